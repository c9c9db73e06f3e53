"""Structured (coupled) pruning from a run config, and `compact: true`: a checked, saved, reported compact model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from admmcompress.cli import main
from admmcompress.data.datasets import Split
from admmcompress.executors import compact_run
from admmcompress.executors.compact import CompactionError
from admmcompress.executors.manifest import load_compacted
from admmcompress.finalize import hard_prune
from admmcompress.models import create_model
from admmcompress.plan import CoupledTarget, Plan, Rule
from admmcompress.structures import Filter
from admmcompress.train.config import CompactRunConfig, ConfigError, RunConfig
from admmcompress.train.runner import Runner

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

READY = Path(__file__).resolve().parents[2] / "configs" / "resnet20_cifar_filter_admm.yaml"
FILTERS = {"rules": [{"type": "Conv2d", "structure": "filter", "sparsity": 0.5}]}




def spec(plan=None, coupling: str = "strict", compact=True, method: str = "admm") -> dict:
    stage = {
        "plan": plan or FILTERS,
        "method": method,
        "coupling": coupling,
        "admm": {"epochs": 1, "update_every_steps": 1, "rho": 1.0, "rho_max": 1.0},
        "retrain": {"epochs": 1},
    }
    out = {"model": {"name": "resnet20"}, "pretrain": {"epochs": 0}, "data": {"batch_size": 8}, "stages": [stage]}
    if compact is not None:
        out["compact"] = compact
    return out


def random_split(n: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# --- configuration ---------------------------------------------------------------------------
def test_coupling_and_compact_options_are_validated():
    config = RunConfig.from_dict(spec())
    assert config.stages[0].coupling == "strict" and config.compact == CompactRunConfig()
    assert RunConfig.from_dict(spec(compact=False)).compact is None
    assert RunConfig.from_dict(spec(compact={"atol": 1e-5})).compact.atol == 1e-5
    assert RunConfig.from_dict(spec(coupling="none", compact=None)).stages[0].coupling == "none"
    with pytest.raises(ConfigError, match=r"coupling='loose'; choose one of \('none', 'strict', 'extend'\)"):
        RunConfig.from_dict(spec(coupling="loose"))
    with pytest.raises(ConfigError, match=r"coupling needs a method that drives coupled targets, one of \[.admm"):
        RunConfig.from_dict(spec(method="reweighted"))
    with pytest.raises(ConfigError, match=r"compact: unknown key\(s\) \['atoll'\]"):
        RunConfig.from_dict(spec(compact={"atoll": 1e-4}))
    with pytest.raises(ConfigError, match="columns='fast'"):
        RunConfig.from_dict(spec(compact={"columns": "fast"}))
    for text, mode in (("off", "off"), ("on", "on"), ('"off"', "off")):  # YAML 1.1 reads bare off/on as booleans
        read = yaml.safe_load(f"compact: {{columns: {text}}}")["compact"]
        assert RunConfig.from_dict(spec(compact=read)).compact.columns == mode
    with pytest.raises(ConfigError, match="compact=1 must be true, false or a mapping"):
        RunConfig.from_dict(spec(compact=1))
    with pytest.raises(ConfigError, match="compact: true needs at least one stage"):
        RunConfig.from_dict({**spec(), "stages": []})


def test_config_round_trips_through_its_saved_yaml():
    config = RunConfig.from_dict(spec(compact={"samples": 3}))
    again = RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(json.loads(json.dumps(config.to_dict())))))
    assert again.compact == config.compact and again.stages[0].coupling == "strict"


def test_the_ready_config_validates_and_couples_every_conv_of_resnet20():
    config = RunConfig.from_yaml(READY)
    assert config.model == {"name": "resnet20"} and config.data.dataset == "cifar10"
    assert config.compact is not None and config.stages[0].coupling == "strict"
    runner = Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)
    targets = runner.stage_targets[0]
    assert targets and all(isinstance(t, CoupledTarget) for t in targets)
    convs = {n for n, m in runner.model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs <= set(runner.layers())


# --- the runner ---------------------------------------------------------------------------
def test_coupled_admm_run_ends_with_a_checked_saved_compact_model(tmp_path):
    torch.manual_seed(0)
    config = RunConfig.from_dict(spec())
    model = create_model("resnet20")
    runner = Runner(config, model, random_split(16), random_split(8, seed=1), out_dir=tmp_path, progress=False)
    metrics = runner.run()
    figures = metrics["compaction"]
    assert figures["params_after"] < figures["params_before"] and figures["macs_after"] < figures["macs_before"]
    assert figures["max_abs_diff"] <= 1e-4 and figures["folder"] == "compact"
    # uniform 50% coupled filter pruning gives exactly the half-width ResNet-20
    ideal = create_model("resnet20", width_mult=0.5)
    assert figures["params_after"] == sum(p.numel() for p in ideal.parameters())
    restored = load_compacted(tmp_path / "compact")
    fresh = torch.randn(3, 3, 32, 32)
    assert (outputs(restored, fresh) - outputs(model, fresh)).abs().max() <= 1e-4
    assert runner.compacted is not None
    assert set(runner.layers()) <= {n for n, _ in model.named_modules()}


def test_an_uncoupled_plan_that_cannot_be_compacted_fails_before_training():
    plan = {"rules": [{"match": "layers.0.0.conv2", "structure": "filter", "sparsity": 0.5}]}
    config = RunConfig.from_dict(spec(plan, coupling="none"))
    # the fix first, then the first reason (one per channel group made lines of thousands of characters)
    with pytest.raises(ConfigError, match=r"compact: the plan prunes channels .*coupling: strict.*First: .*"
                                          r"layers.0.0.conv2"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_compact_with_a_plan_that_removes_no_width_is_said_before_training():
    plan = {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.5}]}
    config = RunConfig.from_dict(spec(plan, coupling="none"))
    with pytest.warns(UserWarning, match="compact: the plans prune no whole filter, channel or column"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_pretrain_of_zero_epochs_says_it_prunes_an_untrained_model_once_at_the_runs_start():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = RunConfig.from_dict(spec(compact=None))  # reading the config (report, export): nothing said
    with pytest.warns(UserWarning, match=r"pretrain: \{epochs: 0\} prunes the randomly initialised model"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_a_strict_coupled_plan_naming_part_of_a_group_is_a_plan_error():
    plan = {"rules": [{"match": "layers.0.0.conv2", "structure": "filter", "sparsity": 0.5}]}
    config = RunConfig.from_dict(spec(plan, compact=None))
    with pytest.raises(ValueError, match="share channels .* with 'conv1'"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_a_compacted_model_that_differs_fails_loudly(monkeypatch):
    model = create_model("resnet20").eval()
    real = compact_run.compact

    def wrong(*args, **kwargs):
        result = real(*args, **kwargs)
        with torch.no_grad():
            result.model.linear.bias.add_(1.0)
        return result

    monkeypatch.setattr(compact_run, "compact", wrong)
    with pytest.raises(CompactionError, match=r"differs from the masked model by 1 \(> atol=0.0001\)"):
        compact_run.compact_checked(model, torch.randn(2, 3, 32, 32), samples=2)


# --- the command line ------------------------------------------------------------------------
def tiny_ready_config(tmp_path: Path) -> Path:
    ready = yaml.safe_load(READY.read_text())
    ready["threads"] = 1
    ready["data"].update(train_limit=16, test_limit=8, batch_size=8, eval_batch_size=8)
    ready.pop("pretrained", None)  # the shipped dense model's file sits beside the config; train one epoch instead
    ready["pretrain"] = {"epochs": 1}
    stage = ready["stages"][0]
    stage["admm"].update(epochs=1, update_every_steps=1)
    stage["retrain"]["epochs"] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(ready, sort_keys=False))
    return path


@pytest.fixture()
def small_cifar(tmp_path_factory, monkeypatch):
    """A 24-image stand-in for cifar10_jpeg.npz (same layout), so the CLI tests run where the real file is absent."""
    import io

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    arrays = {"classes": np.array([f"c{i}" for i in range(10)])}
    for split in ("train", "test"):
        blobs = []
        for _ in range(24):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        arrays[f"x_{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"y_{split}"] = rng.integers(0, 10, 24).astype(np.int64)
    np.savez(folder / "cifar10_jpeg.npz", **arrays)
    monkeypatch.setenv("ADMMCOMPRESS_DATA", str(folder))
    return folder


def test_cli_run_of_the_ready_config_compacts_reports_and_exports(tmp_path, capsys, small_cifar):
    out = tmp_path / "run"
    assert main(["run", str(tiny_ready_config(tmp_path)), "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "## Compacted model" in report and "MACs per sample" in report and "Parameters: 272,474 ->" in report
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["compaction"]
    assert {"params_before", "params_after", "macs_before", "macs_after", "max_abs_diff"} <= set(metrics)
    assert (out / "compact" / "manifest.json").is_file() and (out / "compact" / "model.safetensors").is_file()
    assert main(["report", str(out)]) == 0 and "## Compacted model" in capsys.readouterr().out
    assert main(["export", "--compact", str(out), "--out", str(tmp_path / "exported")]) == 0
    printed = capsys.readouterr().out
    assert "Reloaded from" in printed and (tmp_path / "exported" / "manifest.json").is_file()
    small = load_compacted(tmp_path / "exported")
    assert sum(p.numel() for p in small.parameters()) == metrics["params_after"]


def test_filters_zeroed_by_chance_under_unstructured_rules_are_kept_by_the_run_and_its_export(
    tmp_path, capsys, small_cifar
):
    # at 90% some 16-filter convs lose whole filters; the residual add ties them to live ones, so they stay
    plan = {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.9}]}
    config = {**spec(plan, coupling="none"), "seed": 0, "threads": 1}
    config["data"] = {"dataset": "cifar10", "train_limit": 8, "test_limit": 8, "batch_size": 8}
    path, out = tmp_path / "unstructured.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    figures = json.loads((out / "metrics.json").read_text())["metrics"]["compaction"]
    assert figures["max_abs_diff"] <= figures["atol"]
    assert main(["export", "--compact", str(out), "--out", str(tmp_path / "exported")]) == 0
    small = load_compacted(tmp_path / "exported")
    assert sum(p.numel() for p in small.parameters()) == figures["params_after"]


def test_a_filter_stage_then_an_unstructured_stage_compacts_keeping_chance_zero_filters(tmp_path, small_cifar):
    # stage 2's 90% unstructured sparsity zeroes whole filters by chance in residual-tied convs; only stage 1's
    # coupled filters must go, so the run compacts instead of failing over the others
    filters = spec(coupling="strict")["stages"][0]
    unstructured = {**filters, "coupling": "none",
                    "plan": {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.9}]}}
    config = {**spec(), "seed": 0, "threads": 1, "stages": [filters, unstructured]}
    config["data"] = {"dataset": "cifar10", "train_limit": 8, "test_limit": 8, "batch_size": 8}
    path, out = tmp_path / "mixed.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    figures = json.loads((out / "metrics.json").read_text())["metrics"]["compaction"]
    assert figures["max_abs_diff"] <= figures["atol"] and figures["params_after"] < figures["params_before"] / 2
    assert main(["export", "--compact", str(out), "--out", str(tmp_path / "exported")]) == 0
    small = load_compacted(tmp_path / "exported")
    assert sum(p.numel() for p in small.parameters()) == figures["params_after"]


def test_filter_rules_that_cannot_be_compacted_fail_before_training_also_beside_an_unstructured_stage():
    # two residual-tied convs, each with its own uncoupled filter rule: their pruned channels differ, so neither
    # can go; the unstructured stage beside them must not hide that
    filters = spec({"rules": [{"match": "layers.0.0.conv2", "structure": "filter", "sparsity": 0.5},
                              {"match": "layers.0.1.conv2", "structure": "filter", "sparsity": 0.5}]},
                   coupling="none")["stages"][0]
    unstructured = {**filters, "plan": {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.9}]}}
    config = RunConfig.from_dict({**spec(), "seed": 0, "stages": [filters, unstructured]})
    with pytest.raises(ConfigError, match="compaction cannot remove.*coupling: strict"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_a_tucker2_stage_with_coupled_filter_rules_compacts_to_a_folder_that_loads_alone(tmp_path):
    # the compacted model holds its Tucker-2 convs, recorded whole in the manifest (until 2026-12-07 such a run was
    # refused before training: the manifest could not describe them); the filter rules' channels still go
    plan = {"rules": [{"match": "layers.2.*.conv*", "structure": "tucker2", "rank_ratio": 0.5},
                      {"match": "layers.0.*.conv1", "structure": "filter", "sparsity": 0.5}]}
    config = RunConfig.from_dict({**spec(plan, coupling="strict", compact={"samples": 2}), "seed": 0})
    data = random_split(8)
    runner = Runner(config, create_model("resnet20"), data, data, out_dir=tmp_path, progress=False)
    figures = runner.run()["compaction"]
    assert figures["params_after"] < figures["params_before"] and figures["macs_after"] < figures["macs_before"]
    restored = load_compacted(tmp_path / compact_run.COMPACT_DIR)
    block = restored.layers[2][0].conv1
    assert type(block).__name__ == "Tucker2Conv" and block.ranks == (32, 16)  # half of (64, 32)
    assert restored.layers[0][0].conv1.out_channels == 8  # half of the 16 filters
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(outputs(restored, x), outputs(runner.model, x), atol=1e-4)


def test_a_zero_filter_of_the_pretrained_model_does_not_fail_the_preflight():
    # a checkpoint from an earlier unstructured run may hold a zero filter in a residual-tied conv: training
    # revives it, and no rule of this plan made it, so it is not the plan's mistake
    model = create_model("resnet20")
    with torch.no_grad():
        model.layers[0][0].conv2.weight[3] = 0
    filters = spec({"rules": [{"match": "layers.2.*.conv1", "structure": "filter", "sparsity": 0.5}]})["stages"][0]
    unstructured = {**filters, "coupling": "none",
                    "plan": {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.5}]}}
    config = RunConfig.from_dict({**spec(), "seed": 0, "stages": [filters, unstructured]})
    Runner(config, model, random_split(4), random_split(4), progress=False)  # no ConfigError


def test_chance_zero_filters_are_kept_at_the_end_of_a_mixed_plan_and_fail_a_channel_only_one():
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    plan = Plan([Rule(Filter(sparsity=0.5), match="layers.2.*.conv1")])
    masks = hard_prune(model, plan.resolve_coupled(model, x))
    with torch.no_grad():  # a filter an unstructured rule zeroed by chance, tied to live ones by the residual add
        model.layers[0][0].conv2.weight[3] = 0
    filters = {"plan": {"rules": [{"match": "layers.2.*.conv1", "structure": "filter", "sparsity": 0.5}]}}
    mixed = [filters, {"plan": {"rules": [{"type": "Conv2d", "structure": "unstructured", "sparsity": 0.9}]}}]
    with pytest.warns(RuntimeWarning, match=r"channels \[3\] of .*still compute them"):
        result, figures = compact_run.compact_checked(model, x, masks, samples=2,
                                                      strict=compact_run.strict_compaction(mixed))
    assert figures["params_after"] < figures["params_before"] and result.kept
    with pytest.raises(CompactionError, match="still compute them"):
        compact_run.compact_checked(model, x, masks, samples=2, strict=compact_run.strict_compaction([filters]))


def test_a_column_plan_with_columns_off_is_told_to_switch_them_on():
    plan = {"rules": [{"match": "layers.*.conv1", "structure": "column", "sparsity": 0.5},
                      {"match": "layers.*.conv2", "structure": "unstructured", "sparsity": 0.5}]}
    config = RunConfig.from_dict({**spec(plan, coupling="none", compact={"columns": "off"}), "seed": 0})
    with pytest.warns(UserWarning, match=r"compact.columns is off.*columns: on"):
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def test_strict_compaction_only_for_plans_of_channel_and_column_rules():
    filters = {"plan": {"rules": [{"type": "Conv2d", "structure": "filter", "sparsity": 0.5}]}}
    columns = {"plan": {"rules": [{"type": "Conv2d", "structure": "column", "sparsity": 0.5}]}}
    chance = {"plan": {"rules": [{"type": "Conv2d", "structure": "tucker2", "ranks": 0.5}]}}
    assert compact_run.strict_compaction([filters, columns])
    assert not compact_run.strict_compaction([columns])  # nothing pruned on purpose to hold it to
    assert not compact_run.strict_compaction([filters, chance])
    assert not compact_run.strict_compaction([{"plan": {"rules": [{"structure": "my_plugin"}]}}, filters])


def test_compact_of_a_column_plan_is_not_told_it_removes_no_width():
    plan = {"rules": [{"match": "layers.*.conv1", "structure": "column", "sparsity": 0.5}]}
    config = RunConfig.from_dict({**spec(plan, coupling="none", compact={"columns": "on"}), "seed": 0})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "compact: the plans prune no whole", UserWarning)
        Runner(config, create_model("resnet20"), random_split(4), random_split(4), progress=False)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0]


def test_cli_errors_of_compaction_are_one_line(tmp_path, capsys, small_cifar):
    bad = spec({"rules": [{"match": "layers.0.0.conv2", "structure": "filter", "sparsity": 0.5}]}, coupling="none")
    bad["data"] = {"dataset": "cifar10", "train_limit": 4, "test_limit": 4}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    message = one_line_error(capsys, ["run", str(path), "--out", str(tmp_path / "o")])
    assert "compaction cannot remove" in message and "coupling: strict" in message
    message = one_line_error(capsys, ["export", "--compact", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert "none' does not exist; give the --out folder of a finished" in message
    path.write_text(yaml.safe_dump({**spec(coupling="tight"), "data": {"dataset": "cifar10"}}))
    assert "coupling='tight'" in one_line_error(capsys, ["run", str(path), "--out", str(tmp_path / "p")])


def test_resuming_a_finished_compact_run_gives_the_same_compact_model(tmp_path):
    torch.manual_seed(0)
    config = RunConfig.from_dict(spec(compact={"samples": 2}))
    data = random_split(8)
    first = Runner(config, create_model("resnet20"), data, data, out_dir=tmp_path, progress=False).run()
    saved = load_compacted(tmp_path / "compact").state_dict()
    again = Runner(config, create_model("resnet20"), data, data, out_dir=tmp_path, progress=False).run(resume=True)
    assert again["compaction"] == first["compaction"]
    assert all(torch.equal(v, saved[k]) for k, v in load_compacted(tmp_path / "compact").state_dict().items())
