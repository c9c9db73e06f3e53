"""Plugins: a run config's ``plugins:`` registers a user's driver and structure from its own module file,
and ``admmcompress run`` / ``report`` use them like built-ins."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from admmcompress.cli import main
from admmcompress.drivers import list_drivers, unregister_driver
from admmcompress.plugins import PluginError, load_plugins
from admmcompress.structures import list_structures
from admmcompress.structures.base import unregister_structure

PLUGIN = textwrap.dedent(
    '''
    """A user's own method and structure, registered on import."""
    from dataclasses import dataclass

    import torch

    from admmcompress.drivers import Driver, register_driver
    from admmcompress.finalize import hard_prune
    from admmcompress.structures import groups
    from admmcompress.structures.base import register_structure
    from admmcompress.structures.sparsity import SparsityStructure


    @register_structure("toy_even_rows")
    @dataclass(frozen=True)
    class EvenRows(SparsityStructure):
        """Rows in pairs (0-1, 2-3, ...): keep the k pairs of largest L2 norm."""

        def group_ids(self, weight):
            rows, cols = groups.as_matrix(weight).shape
            return (groups.row_ids(rows, cols, weight.device) // 2), (rows + 1) // 2


    @dataclass(frozen=True)
    class ShrinkOptions:
        factor: float = 0.5


    @register_driver("toy_shrink", ShrinkOptions)
    class Shrink(Driver):
        """At every update, scale the weights outside the structure's support by `factor`; then hard prune."""

        def __init__(self, model, targets, factor, frozen):
            self.model, self.targets, self.factor, self.frozen = model, targets, factor, frozen
            self.params, self.history = dict(model.named_parameters()), []

        @classmethod
        def from_config(cls, model, targets, config, context):
            return cls(model, targets, config.factor, context.frozen)

        @torch.no_grad()
        def step(self):
            for t in self.targets:
                w = self.params[t.param_name]
                w.mul_(torch.where(t.structure.support(w), 1.0, self.factor))
            self.history.append({"iteration": len(self.history) + 1})

        def finalize(self):
            return hard_prune(self.model, self.targets, self.frozen)

        def state_dict(self):
            return {"history": list(self.history)}

        def load_state_dict(self, state):
            self.history = list(state["history"])
    '''
)


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_methods.py"
    path.write_text(PLUGIN)
    yield path
    unregister_driver("toy_shrink")
    if "toy_even_rows" in list_structures():
        unregister_structure("toy_even_rows")




def test_a_plugin_driver_and_structure_run_through_the_cli(plugin_file, tmp_path, capsys):
    spec = {
        "name": "plugin", "seed": 0, "threads": 1, "plugins": [plugin_file.name],
        "model": {"name": "lenet300100"},
        "data": {"dataset": "mnist", "batch_size": 64, "train_limit": 256, "test_limit": 100},
        "pretrain": {"epochs": 1},
        "stages": [{
            "plan": {"rules": [{"match": "fc2", "structure": "toy_even_rows", "sparsity": 0.5}]},
            "method": "toy_shrink", "options": {"factor": 0.25},
            "admm": {"epochs": 1, "update_every_steps": 2}, "retrain": {"epochs": 1},
        }],
    }
    config = tmp_path / "plugin.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    assert "toy_shrink" in list_drivers() and "toy_even_rows" in list_structures()

    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["stages"][0]["layers"]["fc2"] == pytest.approx(2.0)
    from safetensors.torch import load_file

    weight = load_file(str(out / "model.safetensors"))["fc2.weight"]
    kept_rows = (weight.abs().sum(1) > 0).reshape(-1, 2)
    assert bool((kept_rows[:, 0] == kept_rows[:, 1]).all())  # rows are kept or removed in pairs
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stages"][0]["options"] == {"factor": 0.25}
    assert Path(saved["plugins"][0]).is_absolute()  # the run folder's config finds the plugin from anywhere

    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # the report reads the plugin back from the saved config
    assert "fc2" in capsys.readouterr().out


def test_a_plugin_that_cannot_be_imported_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "lenet300100"}, "pretrain": {"epochs": 1},
                                      "plugins": ["no_such_module_anywhere"]}))
    assert main(["run", str(config), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plugin 'no_such_module_anywhere' cannot be imported" in err[0]


def test_load_plugins_rejects_bad_entries(tmp_path):
    with pytest.raises(PluginError, match="give a list of module names"):
        load_plugins("mypkg.module")
    with pytest.raises(PluginError, match="does not exist"):
        load_plugins(["missing.py"], base_dir=tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match="failed to import: RuntimeError: boom"):
        load_plugins([str(broken)])
