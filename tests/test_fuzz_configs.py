"""Fuzzed configs never give a traceback: random mutations of the ready configs in configs/ (keys dropped, added
or retyped, bad values) end in exit 2 with one ``admmcompress: error:`` line, or pass ``run --dry-run`` (exit 0)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import admmcompress.cli as cli
from admmcompress.data.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PATH_KEYS = ("pretrained", "teacher", "plugins")
# Values of the wrong type or out of range, as a hand-edited YAML file may hold them.
BAD_VALUES = [None, "text", "1e-3", -1, 0, 1, 2.5, -0.5, 1.0e30, 10**40, True, False, [], {}, [1, "a"],
              {"x": 1}, math.nan, math.inf, "", "none", "conv*", 0.999999]
UNKNOWN_KEYS = ["epoch", "lr", "extra", "sparsity", "name", "rho", "structure", "rules", "dataset"]

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _absolute(spec: dict[str, Any]) -> dict[str, Any]:
    """Paths in a ready config are relative to configs/; the mutant is written elsewhere."""

    def resolve(value: Any, key: str) -> Any:
        if isinstance(value, list):
            return [resolve(v, key) for v in value]
        if not isinstance(value, str) or (key == "plugins" and not value.endswith(".py")):
            return value  # a plugin module name
        return str((ROOT / "configs" / value).resolve())

    for key in PATH_KEYS:
        if key in spec:
            spec[key] = resolve(spec[key], key)
    return spec


READY = {path.name: _absolute(yaml.safe_load(path.read_text())) for path in CONFIGS}


def _places(value: Any, where: tuple = ()) -> list[tuple]:
    """Every key path in a nested config (mapping keys and list indexes)."""
    found = [where]
    if isinstance(value, dict):
        for key, sub in value.items():
            found += _places(sub, (*where, key))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            found += _places(sub, (*where, i))
    return found


def _get(value: Any, where: tuple) -> Any:
    for key in where:
        value = value[key]
    return value


def bad_value(draw) -> Any:
    return copy.deepcopy(draw(st.sampled_from(BAD_VALUES)))  # a fresh copy: later mutations may change it


@st.composite
def mutants(draw) -> dict[str, Any] | Any:
    name = draw(st.sampled_from(sorted(READY)))
    spec: Any = yaml.safe_load(yaml.safe_dump(READY[name]))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        places = _places(spec)
        where = draw(st.sampled_from(places))
        kind = draw(st.sampled_from(["drop", "add", "retype", "retype", "number"]))
        if where == ():
            if kind == "retype":
                return draw(st.sampled_from([None, [], "text", 3, [spec]]))
            continue
        parent, key = _get(spec, where[:-1]), where[-1]
        if kind == "drop":
            del parent[key]
        elif kind == "add":
            target = _get(spec, where)
            if isinstance(target, dict):
                target[draw(st.sampled_from(UNKNOWN_KEYS))] = bad_value(draw)
            elif isinstance(target, list):
                target.append(bad_value(draw))
        elif kind == "retype":
            parent[key] = bad_value(draw)
        else:
            old = parent[key]
            if isinstance(old, (int, float)) and not isinstance(old, bool) and math.isfinite(old):
                parent[key] = draw(st.sampled_from([-old, 0, old * 1000, old / 1000, int(old) + 1, float("nan")]))
            else:
                parent[key] = bad_value(draw)
    return spec


@pytest.fixture(scope="module")
def small_data():
    """Dry runs read the dataset files as a run would, but only a few samples of each (time)."""
    def load(name, split="train", data_dir=None, limit=None):
        return load_dataset(name, split, data_dir, min(limit or 64, 64) if isinstance(limit, int) or limit is None
                            else limit)

    original = cli.load_dataset
    cli.load_dataset = load
    yield
    cli.load_dataset = original


@settings(max_examples=100, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=mutants())
def test_mutated_ready_configs_never_give_a_traceback(spec, small_data, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "mutant.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    threads = torch.get_num_threads()
    try:
        code = cli.main(["run", str(path), "--dry-run", "--out", str(folder / "out")])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (folder / "out").exists()  # a dry run writes nothing
    if code == 0:
        return
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("admmcompress: error: ")]
    assert len(errors) == 1 and err.startswith("admmcompress: error: "), err


def test_every_ready_config_passes_its_dry_run_or_names_a_missing_file(small_data, capsys):
    for path in CONFIGS:
        code = cli.main(["run", str(path), "--dry-run"])
        err = capsys.readouterr().err
        assert code == 0 or ("does not exist" in err or "not found" in err or "no " in err), (path.name, err)
