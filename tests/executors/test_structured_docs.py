"""The docstring examples of the structured-pruning modules run and print what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "admmcompress.plan.graph",
    "admmcompress.plan.coupled",
    "admmcompress.plan.rules",
    "admmcompress.executors.channels",
    "admmcompress.executors.fold",
    "admmcompress.executors.compact",
    "admmcompress.executors.purify",
    "admmcompress.executors.column",
    "admmcompress.executors.manifest",
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
