"""The examples in examples/ run and do what their docstrings say."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_training_loop_example_prunes_and_keeps_accuracy():
    result = load("own_training_loop").main(limit=2000, epochs=2)
    # fc1 20x, fc2 10x, fc3 4x: 11,760 + 3,000 + 250 = 15,010 of 266,200 weights kept
    assert abs(result["compression"] - 266200 / 15010) < 0.05
    assert result["dense_accuracy"] > 80.0
    assert result["pruned_accuracy"] > result["dense_accuracy"] - 5.0


def test_hf_trainer_example_prunes_ffns_to_2_of_4():
    import pytest

    from admmcompress.data import find_dataset

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    try:
        find_dataset("fashion_mnist")
    except FileNotFoundError:
        pytest.skip("fashion_mnist.npz is not available here (../shared/data or $ADMMCOMPRESS_DATA)")
    result = load("hf_trainer_admm").main(["--limit", "2000", "--dense-epochs", "2", "--admm-epochs", "1",
                                           "--finetune-epochs", "1"])
    assert result["pattern_holds"]
    assert result["dense_accuracy"] > 40.0  # 10 classes: far above chance after 2 short epochs
    assert result["pruned_accuracy"] > result["dense_accuracy"] - 5.0


def test_ss_auto_vit_example_finds_heads_and_ffn_widths_that_compact():
    import pytest

    from admmcompress.data import find_dataset

    pytest.importorskip("transformers")
    try:
        find_dataset("fashion_mnist")
    except FileNotFoundError:
        pytest.skip("fashion_mnist.npz is not available here (../shared/data or $ADMMCOMPRESS_DATA)")
    result = load("ss_auto_vit").main(["--limit", "2000", "--dense-epochs", "2", "--soft-epochs", "1",
                                       "--retrain-epochs", "1"])
    assert result["agree"] and result["share_soft_threshold"] == 1.0
    assert result["mac_reduction"] >= 2.0 / 1.01  # the budget, counted as compaction removes it
    assert "structure: heads" in result["rates"] and "structure: filter" in result["rates"]
    assert all(1 <= heads <= 4 and 1 <= units <= 128 for heads, units in result["blocks"])
    assert result["pruned_accuracy"] > 40.0  # 10 classes: far above chance after the short schedule
