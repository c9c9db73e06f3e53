"""The docstring examples of the public modules run and print what they show (one list, one runner)."""

import doctest
import importlib

import pytest

MODULES = [
    # structures, plans, finalizer
    "admmcompress.structures.base",
    "admmcompress.structures.registry",
    "admmcompress.structures.sparsity",
    "admmcompress.structures.nm",
    "admmcompress.structures.heads",
    "admmcompress.plan.attention",
    "admmcompress.plan.residual",
    "admmcompress.plan.tp_compat",
    "admmcompress.executors.hf_save",
    "admmcompress.executors.heads",
    "admmcompress.models.conv1d",
    "admmcompress.structures.block",
    "admmcompress.structures.quantization",
    "admmcompress.structures.crossbar",
    "admmcompress.structures.lowrank",
    "admmcompress.structures.groups",
    "admmcompress.plan",
    "admmcompress.plan.targets",
    "admmcompress.strict_yaml",
    "admmcompress.atomic",
    "admmcompress.plan.graph",
    "admmcompress.plan.channel_ops",
    "admmcompress.plan.zero_flow",
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
    "admmcompress.drivers.soft",
    "admmcompress.drivers.budget",
    "admmcompress.drivers.allocation",
    "admmcompress.drivers.factorize",
    "admmcompress.drivers.penni",
    "admmcompress.train.cadence",
    "admmcompress.train.precision",
    "admmcompress.train.loop",
    "admmcompress.train.distributed",  # issue 24
    "admmcompress.train.logging",
    "admmcompress.train.training_state",
    "admmcompress.train.trial_forward",
    "admmcompress.data.imported",
    "admmcompress.data.files",
    "admmcompress.plugins",
    "admmcompress.deprecation",
    "admmcompress.timing",
    "admmcompress.cpu_caches",
    "admmcompress.messages",
    "admmcompress.module_swap",
    # executors, encodings, reports
    "admmcompress.executors",
    "admmcompress.executors.base",
    "admmcompress.executors.blocksparse",
    "admmcompress.executors.blocksparse_choice",  # issue 19
    "admmcompress.executors.blockmatrix",  # issue 19
    "admmcompress.executors.blocksparse_layers",  # issue 19
    "admmcompress.executors.blocksparse_rnn",  # issue 19
    "admmcompress.executors.blocksparse_cpp",  # issue 19 (the doctest does not compile the kernel)
    "admmcompress.executors.compact_run",
    "admmcompress.executors.packed",
    "admmcompress.executors.channels",
    "admmcompress.executors.fold",
    "admmcompress.executors.compact",
    "admmcompress.executors.purify",
    "admmcompress.executors.column",
    "admmcompress.executors.manifest",
    "admmcompress.executors.onnx_export",
    "admmcompress.executors.penni",
    "admmcompress.executors.tucker",
    "admmcompress.executors.factorized",
    "admmcompress.executors.rank_search",
    "admmcompress.encoding",
    "admmcompress.report.storage",
    "admmcompress.report.metrics",
    "admmcompress.report.compare",
    "admmcompress.report.render",
    "admmcompress.report.integrity",
    "admmcompress.config_keys",
    "admmcompress.models.registry",
    "admmcompress.report.rates",
    # modelled hardware (crossbars, SOT-MRAM)
    "admmcompress.hardware.constants",
    "admmcompress.hardware.crossbar",
    "admmcompress.hardware.cost",
    "admmcompress.hardware.noise",
    "admmcompress.hardware.adc",
    "admmcompress.hardware.pim",
    "admmcompress.hardware.variation",
    "admmcompress.hardware.analysis",
    "admmcompress.run_hardware",
    "admmcompress.command_locks",
    "admmcompress.report.hardware",
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
