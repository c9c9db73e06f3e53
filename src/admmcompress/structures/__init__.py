"""What a layer may look like after compression: structures with exact projections.

Every structure derives from :class:`Structure` and is registered by name with
:func:`register_structure`; :func:`structure_from_dict` and :func:`list_structures` cover pruning and
quantization alike, and ``structure.quantizes`` tells them apart.
"""

from admmcompress.structures.base import Structure, register_structure, unregister_structure
from admmcompress.structures.block import Block, BlockFilter, BlockRow
from admmcompress.structures.groups import as_matrix, kept_count, project_groups
from admmcompress.structures.heads import Heads
from admmcompress.structures.lowrank import SharedKernels, Tucker2
from admmcompress.structures.nm import NM
from admmcompress.structures.quantization import (
    Binary,
    Clustering,
    FixedPoint,
    PowerOfTwo,
    QuantizationStructure,
    Ternary,
)
from admmcompress.structures.registry import (
    QUANTIZERS,
    STRUCTURES,
    list_quantizers,
    list_structures,
    structure_class,
    structure_from_dict,
)
from admmcompress.structures.sparsity import Channel, Column, Filter, SparsityStructure, Unstructured

__all__ = [
    "Heads",
    "NM",
    "QUANTIZERS",
    "STRUCTURES",
    "Binary",
    "Block",
    "BlockFilter",
    "BlockRow",
    "Channel",
    "Clustering",
    "Column",
    "Filter",
    "FixedPoint",
    "PowerOfTwo",
    "QuantizationStructure",
    "SharedKernels",
    "SparsityStructure",
    "Structure",
    "Ternary",
    "Tucker2",
    "Unstructured",
    "as_matrix",
    "kept_count",
    "list_quantizers",
    "list_structures",
    "project_groups",
    "register_structure",
    "structure_class",
    "structure_from_dict",
    "unregister_structure",
]
