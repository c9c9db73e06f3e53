"""What turns a structure into speed or savings, behind one interface and registry.

``get_executor(name)`` gives an :class:`Executor` with one verb per act (``convert``, ``save``, ``load``,
``export``); ``list_executors()`` names them: ``compact``, ``blocksparse``, ``packed``, ``onnx`` and any
a plugin registers with ``@register_executor``. See :mod:`admmcompress.executors.base`.

>>> get_executor("packed").acts()
('save', 'load', 'export')
"""

from admmcompress.executors.base import (
    Executor,
    ExecutorError,
    FinishedRun,
    UnsupportedAct,
    get_executor,
    list_executors,
    register_executor,
    unregister_executor,
)
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
    "Executor",
    "ExecutorError",
    "FinishedRun",
    "UnsupportedAct",
    "block_rows_from",
    "get_executor",
    "list_executors",
    "register_executor",
    "to_blocksparse",
    "unregister_executor",
]
