"""admmcompress: compress PyTorch models with ADMM and turn the structure into measured savings.

Three lines in your own loop::

    from admmcompress import ADMM, Plan, Unstructured
    admm = ADMM(model, Plan({"fc*": Unstructured(compression=50)}))
    loss = loss_fn(model(x), y) + admm.penalty()   # every batch
    admm.step()                                      # every epoch (or N steps)
    masks = admm.finalize(); masks.attach(model, fresh_optimizer)   # hard prune, retrain

Or one call: ``compress(model, plan, train, test, admm={"epochs": 10}, retrain={"epochs": 5})``.
"""

from admmcompress.api import CompressionResult, OutputFolderError, compress
from admmcompress.drivers import (
    ADMM,
    Driver,
    GradualMagnitude,
    IterativeQuantization,
    ModuleTransform,
    Reweighted,
    RhoSchedule,
    get_driver,
    list_drivers,
    one_shot,
    register_driver,
)
from admmcompress.executors import Executor, get_executor, list_executors, register_executor
from admmcompress.executors.compact import CompactConfig, CompactionError, compact
from admmcompress.executors.purify import purify, remove_unused_paths
from admmcompress.finalize import MaskSet, QuantizedMaskSet, hard_prune, hard_quantize
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.report import measure
from admmcompress.report.storage import storage
from admmcompress.structures import Block, BlockRow, Channel, Column, Filter, Unstructured, list_structures
from admmcompress.structures.base import Structure, register_structure
from admmcompress.structures.quantization import Binary, Clustering, FixedPoint, PowerOfTwo, Ternary

__version__ = "0.1.0"

__all__ = [
    "Driver",
    "Executor",
    "ModuleTransform",
    "Structure",
    "get_driver",
    "get_executor",
    "list_drivers",
    "list_executors",
    "register_driver",
    "register_executor",
    "register_structure",
    "ADMM",
    "Binary",
    "Clustering",
    "FixedPoint",
    "PowerOfTwo",
    "QuantizedMaskSet",
    "Ternary",
    "hard_quantize",
    "storage",
    "Block",
    "BlockRow",
    "Channel",
    "Column",
    "CompactConfig",
    "CompactionError",
    "CompressionResult",
    "OutputFolderError",
    "Filter",
    "GradualMagnitude",
    "IterativeQuantization",
    "MaskSet",
    "Plan",
    "PlanError",
    "Reweighted",
    "RhoSchedule",
    "Rule",
    "Unstructured",
    "compact",
    "compress",
    "hard_prune",
    "list_structures",
    "measure",
    "one_shot",
    "purify",
    "remove_unused_paths",
]
