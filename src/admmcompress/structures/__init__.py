"""What a layer may look like after compression: structures with exact projections."""

from admmcompress.structures.block import Block, BlockRow
from admmcompress.structures.groups import as_matrix, kept_count, project_groups
from admmcompress.structures.quantization import (
    QUANTIZERS,
    Binary,
    Clustering,
    FixedPoint,
    PowerOfTwo,
    QuantizationStructure,
    Ternary,
    list_quantizers,
)
from admmcompress.structures.sparsity import (
    STRUCTURES,
    Channel,
    Column,
    Filter,
    SparsityStructure,
    Unstructured,
    list_structures,
    structure_from_dict,
)

__all__ = [
    "QUANTIZERS",
    "STRUCTURES",
    "Binary",
    "Clustering",
    "FixedPoint",
    "PowerOfTwo",
    "QuantizationStructure",
    "Ternary",
    "list_quantizers",
    "Block",
    "BlockRow",
    "Channel",
    "Column",
    "Filter",
    "SparsityStructure",
    "Unstructured",
    "as_matrix",
    "kept_count",
    "list_structures",
    "project_groups",
    "structure_from_dict",
]
