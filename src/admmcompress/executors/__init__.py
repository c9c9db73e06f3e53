"""What turns a structure into speed or savings: the block-sparse CPU executor (more to come)."""

from admmcompress.executors.blocksparse import (
    BlockSparseCell,
    BlockSparseConv2d,
    BlockSparseGRU,
    BlockSparseLinear,
    BlockSparseLSTM,
    BlockSparseMatrix,
    block_rows_from,
    to_blocksparse,
)

__all__ = [
    "BlockSparseCell",
    "BlockSparseConv2d",
    "BlockSparseGRU",
    "BlockSparseLSTM",
    "BlockSparseLinear",
    "BlockSparseMatrix",
    "block_rows_from",
    "to_blocksparse",
]
