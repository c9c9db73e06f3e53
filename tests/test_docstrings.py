"""The docstring examples of the public modules run and print what they show (one list, one runner)."""

import doctest
import importlib

import pytest

MODULES = [
    # structures, plans, finalizer
    "admmcompress.structures.base",
    "admmcompress.structures.registry",
    "admmcompress.structures.sparsity",
    "admmcompress.structures.block",
    "admmcompress.structures.quantization",
    "admmcompress.plan",
    "admmcompress.plan.targets",
    "admmcompress.plan.graph",
    "admmcompress.plan.coupled",
    "admmcompress.plan.rules",
    "admmcompress.finalize",
    "admmcompress.finalize.masks",
    "admmcompress.finalize.quantized",
    # drivers and the loop
    "admmcompress.drivers.base",
    "admmcompress.drivers.admm",
    "admmcompress.drivers.magnitude",
    "admmcompress.drivers.iterative_quantization",
    "admmcompress.drivers.reweighted",
    "admmcompress.train.cadence",
    "admmcompress.train.loop",
    "admmcompress.plugins",
    "admmcompress.deprecation",
    "admmcompress.timing",
    # executors, encodings, reports
    "admmcompress.executors",
    "admmcompress.executors.base",
    "admmcompress.executors.blocksparse",
    "admmcompress.executors.compact_run",
    "admmcompress.executors.packed",
    "admmcompress.executors.channels",
    "admmcompress.executors.fold",
    "admmcompress.executors.compact",
    "admmcompress.executors.purify",
    "admmcompress.executors.column",
    "admmcompress.executors.manifest",
    "admmcompress.encoding",
    "admmcompress.report.storage",
    "admmcompress.report.compare",
    # models
    "admmcompress.models.widths",
    "admmcompress.models.cifar_resnet",
    "admmcompress.models.vgg",
    "admmcompress.models.mobilenetv2",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
