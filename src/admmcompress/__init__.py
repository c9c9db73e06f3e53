"""admmcompress: compress PyTorch models with ADMM and turn the structure into measured savings.

Three lines in your own loop::

    from admmcompress import ADMM, Plan, Unstructured
    admm = ADMM(model, Plan({"fc*": Unstructured(compression=50)}))
    loss = loss_fn(model(x), y) + admm.penalty()   # every batch
    admm.step()                                      # every epoch (or N steps)
    masks = admm.finalize(); masks.attach(model, fresh_optimizer)   # hard prune, retrain

Or one call: ``compress(model, plan, train, test, admm={"epochs": 10}, retrain={"epochs": 5})``.
"""

from admmcompress.api import CompressionResult, compress
from admmcompress.drivers import ADMM, GradualMagnitude, IterativeQuantization, Reweighted, RhoSchedule, one_shot
from admmcompress.executors.compact import CompactConfig, CompactionError, compact
from admmcompress.executors.purify import purify, remove_unused_paths
from admmcompress.finalize import hard_prune
from admmcompress.masks import MaskSet
from admmcompress.plan import Plan, PlanError, Rule
from admmcompress.quantize import QuantizedMaskSet, hard_quantize
from admmcompress.report import measure
from admmcompress.report.storage import storage
from admmcompress.structures import Block, BlockRow, Channel, Column, Filter, Unstructured, list_structures
from admmcompress.structures.quantization import Binary, Clustering, FixedPoint, PowerOfTwo, Ternary

__version__ = "0.1.0"

__all__ = [
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
