"""examples/structured_compaction.py runs and gives a 4x smaller ResNet-20 with the same outputs."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "structured_compaction.py"


@pytest.mark.filterwarnings("ignore:ADMM residual")
def test_structured_compaction_example():
    spec = importlib.util.spec_from_file_location("structured_compaction", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(steps=4)
    assert (result["params_before"], result["params_after"]) == (272_474, 68_786)
    assert result["max_abs_diff"] <= 1e-4
