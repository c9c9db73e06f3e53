"""The docstring examples of the structure, plan and finalize modules run and print what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "admmcompress.structures.base",
    "admmcompress.structures.registry",
    "admmcompress.structures.sparsity",
    "admmcompress.structures.block",
    "admmcompress.structures.quantization",
    "admmcompress.plan",
    "admmcompress.plan.targets",
    "admmcompress.finalize",
    "admmcompress.finalize.masks",
    "admmcompress.finalize.quantized",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
