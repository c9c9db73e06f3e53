"""The executor interface and registry: lookups, registration errors, unsupported acts, the deprecated
aliases, and a toy executor from a plugin file run through the real `admmcompress export` command."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from admmcompress.cli import main
from admmcompress.executors import (
    Executor,
    ExecutorError,
    FinishedRun,
    UnsupportedAct,
    get_executor,
    list_executors,
    register_executor,
    unregister_executor,
)
from admmcompress.executors.compact_run import CompactExecutor
from admmcompress.executors.manifest import load_compacted
from admmcompress.executors.packed import PackedExecutor, save_packed_bytes
from admmcompress.models import create_model
from admmcompress.report.integrity import record_output_checksums
from admmcompress.structures.quantization import Ternary
from admmcompress.train import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore:ADMM residual:RuntimeWarning")

TOY = '''
"""A toy executor from a plugin file: the run's nonzero weights per parameter, as JSON."""

import json
from pathlib import Path

import torch

from admmcompress.executors import Executor, register_executor


@register_executor("NAME")
class ToyJson(Executor):
    summary = "nonzero weights per parameter, as JSON"
    export_options = {"indent": {"default": "0", "help": "toy: JSON indent"}}

    def save(self, model, path, indent=0):
        counts = {n: int(torch.count_nonzero(p)) for n, p in model.named_parameters()}
        Path(path).write_text(json.dumps(counts, indent=int(indent)))
        return counts

    def export(self, run, out, indent="0"):
        counts = self.save(run.model, out, indent=indent)
        with torch.no_grad():
            shape = tuple(run.model(run.example(4)).shape)
        return f"NAME: {sum(counts.values())} nonzero parameters in {len(counts)} tensors -> {out}; outputs {shape}"
'''


def write_toy(folder: Path, name: str) -> Path:
    path = folder / f"{name}_plugin.py"
    path.write_text(textwrap.dedent(TOY).replace("NAME", name))
    return path


@pytest.fixture
def registry_guard():
    """Names registered by a test are removed afterwards (the registry is process-wide)."""
    before = set(list_executors())
    yield
    for name in set(list_executors()) - before:
        unregister_executor(name)




# --- registry --------------------------------------------------------------------------------


def test_the_built_ins_are_listed_with_their_acts():
    assert list_executors() == ["blocksparse", "compact", "onnx", "packed", "penni", "tucker"]
    assert list_executors("export") == ["compact", "onnx", "packed"]
    assert list_executors("convert") == ["blocksparse", "compact", "penni", "tucker"]
    assert get_executor("compact").acts() == ("convert", "save", "load", "export")
    assert get_executor("blocksparse").acts() == ("convert",)
    assert isinstance(get_executor("packed"), PackedExecutor) and get_executor("packed").name == "packed"
    with pytest.raises(ExecutorError, match="unknown act 'zip'"):
        list_executors("zip")


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ExecutorError) as err:
        get_executor("tflite")
    message = str(err.value)
    assert "unknown executor 'tflite'" in message and "blocksparse, compact, onnx, packed" in message
    assert "--plugin" in message and "\n" not in message


def test_a_duplicate_name_a_bad_name_or_a_non_executor_is_refused(registry_guard):
    with pytest.raises(ExecutorError, match=r"'packed' already names admmcompress\.executors\.packed\.PackedExecutor"):

        @register_executor("packed")
        class Other(Executor):
            pass

    register_executor("packed")(PackedExecutor)  # the same class again (a re-imported module) is fine
    assert get_executor("packed").acts() == ("save", "load", "export")
    for bad in ("Bad-Name", "out", "", "9x"):
        with pytest.raises(ExecutorError, match="must be lowercase letters"):
            register_executor(bad)
    with pytest.raises(TypeError, match="is not an Executor"):
        register_executor("plain")(object)
    with pytest.raises(ExecutorError, match=r"export option\(s\) \['compact'\] clash"):

        @register_executor("clashing")
        class Clashing(Executor):
            export_options = {"compact": {}}

    with pytest.raises(ExecutorError, match=r"export option\(s\) \['overwrite'\] clash .* export_run's keywords"):

        @register_executor("shadowing")  # export_run(..., overwrite=...) would take it for its own
        class Shadowing(Executor):
            export_options = {"overwrite": {}}

    with pytest.raises(ExecutorError, match="--scheme is already an export option of 'packed'"):

        @register_executor("scheme")
        class Scheme(Executor):
            pass

    with pytest.raises(ExecutorError, match="no executor is registered as 'never'"):
        unregister_executor("never")


def test_unsupported_acts_say_what_the_executor_can_do():
    with pytest.raises(UnsupportedAct) as err:
        get_executor("blocksparse").save(nn.Linear(2, 2), "x")
    assert isinstance(err.value, NotImplementedError)
    assert str(err.value).startswith("executor 'blocksparse' cannot save; it can: convert (")
    with pytest.raises(NotImplementedError, match="executor 'onnx' cannot load; it can: save, export"):
        get_executor("onnx").load("model.onnx")
    with pytest.raises(NotImplementedError, match="executor 'packed' cannot convert"):
        get_executor("packed").convert(nn.Linear(2, 2))
    # the factorizing executors point to the formats that record their layers (the compact manifest, packed)
    with pytest.raises(UnsupportedAct, match=r"'penni' cannot save; it can: convert \(save the shared-kernel model "
                                             r"with get_executor\('compact'\)\.save"):
        get_executor("penni").save(nn.Linear(2, 2), "x")
    with pytest.raises(UnsupportedAct, match=r"'tucker' cannot load; it can: convert \(load it with "
                                             r"get_executor\('compact'\)\.load"):
        get_executor("tucker").load("x")


def test_convert_returns_a_new_model_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[0].weight[:16] = 0
        model[0].bias[:16] = 0
    x = torch.randn(3, 64)
    small = get_executor("compact").convert(model, example=x)
    assert small[0].out_features == 16 and model[0].out_features == 32
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
    fast = get_executor("blocksparse").convert(model, block_rows=8, min_sparsity=0.4)
    assert type(fast[0]).__name__ == "BlockSparseLinear" and isinstance(model[0], nn.Linear)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="compact.convert needs example="):
        get_executor("compact").convert(model)
    with pytest.raises(ExecutorError, match=r"blocksparse.convert: unknown option\(s\) \['rows'\]"):
        get_executor("blocksparse").convert(model, rows=8)


def test_save_and_load_through_the_executors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.copy_(Ternary().project(model[0].weight))
    packed = get_executor("packed")
    summary = packed.save(model, tmp_path / "m.admmpk", index_bits="3")  # the command line gives strings
    assert (tmp_path / "m.admmpk").read_bytes() == save_packed_bytes(model, index_bits=3)
    restored = packed.load(tmp_path / "m.admmpk", nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    assert torch.equal(restored[0].weight, model[0].weight) and summary.file_bytes > 0
    with pytest.raises(ValueError, match="index_bits='x': give a positive integer"):
        packed.save(model, tmp_path / "n.admmpk", index_bits="x")
    compact = get_executor("compact")
    folder = compact.save(model, tmp_path / "compact")
    assert torch.equal(compact.load(folder, model)[2].weight, model[2].weight)


# --- deprecated aliases ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    """A run folder written by hand (as the packed/ONNX CLI tests do): a ternary fc1, no training."""
    torch.manual_seed(0)
    model = create_model("lenet300100")
    with torch.no_grad():
        model.fc1.weight.copy_(Ternary().project(model.fc1.weight))
    run = tmp_path_factory.mktemp("hand") / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        "model: {name: lenet300100}\ndata: {dataset: mnist}\npretrained: dense.safetensors\nstages: []\n"
    )
    ckpt.save_tensors(run / "model.safetensors", model.state_dict())
    ckpt.save_tensors(run / "masks.safetensors", {})  # a run without pruning stages writes no masks, but the file
    (run / "metrics.json").write_text('{"metrics": {}, "history": []}')  # a finished run's: export verifies it
    record_output_checksums(run)
    return run, model


def test_the_old_save_names_warn_and_still_work(tmp_path):
    from admmcompress.executors.compact import compact
    from admmcompress.executors.compact_run import save_compact
    from admmcompress.executors.export import export_compacted
    from admmcompress.executors.manifest import save_compacted

    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.warns(DeprecationWarning, match=r"get_executor\('compact'\)\.save\(model, folder"):
        save_compacted(model, tmp_path / "a")
    assert torch.equal(load_compacted(tmp_path / "a", model)[0].weight, model[0].weight)
    result = compact(model, torch.randn(2, 6))
    with pytest.warns(DeprecationWarning, match=r"get_executor\('compact'\)\.save\(result\.model, folder"):
        figures = save_compact(result, {"params_after": 1}, tmp_path / "b", {"name": "x", "kwargs": {}})
    assert figures == {"params_after": 1, "folder": str(tmp_path / "b")}
    assert (tmp_path / "b" / "manifest.json").is_file()
    with pytest.warns(DeprecationWarning, match=r"export_compacted\(model, x, folder, spec\) is deprecated"):
        summary = export_compacted(model, torch.randn(2, 6), tmp_path / "c", onnx=False)
    assert summary["reload_max_abs_diff"] == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_old_run_export_names_warn_and_print_the_same(hand_run, tmp_path):
    from admmcompress import run_export

    run, _ = hand_run
    new = run_export.export_run("packed", run, tmp_path / "new.admmpk", index_bits=3)
    with pytest.warns(DeprecationWarning, match=r"use export_run\('packed', run_dir, out"):
        old = run_export.export_packed_run(run, tmp_path / "old.admmpk", index_bits=3)
    assert old.replace("old.admmpk", "new.admmpk") == new
    assert (tmp_path / "old.admmpk").read_bytes() == (tmp_path / "new.admmpk").read_bytes()
    with pytest.warns(DeprecationWarning, match=r"use export_run\('compact', run_dir, out"):
        old = run_export.export_compact_run(run, tmp_path / "old_compact")
    new = run_export.export_run("compact", run, tmp_path / "new_compact")
    assert old.replace("old_compact", "new_compact") == new
    pytest.importorskip("onnxscript")
    with pytest.warns(DeprecationWarning, match=r"use export_run\('onnx', run_dir, out\)"):
        assert run_export.export_onnx_run(run, tmp_path / "m.onnx").startswith("onnx: ")


def test_export_run_never_replaces_a_file_unless_told(hand_run, tmp_path):
    from admmcompress import run_export

    run, _ = hand_run
    out = tmp_path / "mine.admmpk"
    out.write_bytes(b"the user's file")
    with pytest.raises(ValueError, match="exists; export does not overwrite"):
        run_export.export_run("packed", run, out)
    assert out.read_bytes() == b"the user's file"
    assert "round trip: state dict bit-identical" in run_export.export_run("packed", run, out, overwrite=True)
    assert out.read_bytes() != b"the user's file"
    with pytest.raises(ValueError, match="is a folder; --packed writes a file"):  # overwrite replaces files only
        run_export.export_run("packed", run, tmp_path, overwrite=True)


def test_an_opened_run_is_what_export_takes(hand_run, tmp_path):
    from admmcompress.run_export import open_run

    run, model = hand_run
    opened = open_run(run)
    assert opened.model_config == {"name": "lenet300100"} and opened.example(3).shape == (3, 1, 28, 28)
    assert opened.settings["compact"] is None and opened.storage().bits("best") > 0
    text = CompactExecutor().export(opened, tmp_path / "c", samples=2)
    assert "Reloaded from" in text and load_compacted(tmp_path / "c") is not None
    bare = FinishedRun(run, model, {"name": "lenet300100"})  # built by hand: no inputs, no storage report
    with pytest.raises(ExecutorError, match="opened without example inputs; open it with"):
        get_executor("onnx").export(bare, tmp_path / "x.onnx")
    with pytest.raises(ExecutorError, match="opened without a storage report"):
        bare.storage()


# --- the command line, with a plugin's executor -----------------------------------------------


@pytest.fixture
def finished_run(tiny_finished_run):
    """The session's tiny real run (tests/conftest.py: MNIST, 256 images, one epoch per phase)."""
    return tiny_finished_run


def test_a_plugin_executor_gets_its_own_export_flag(finished_run, tmp_path, capsys, registry_guard):
    toy = write_toy(tmp_path, "toy_json")
    out = tmp_path / "counts.json"
    argv = ["export", "--toy-json", str(finished_run), "--out", str(out), "--indent", "2", "--plugin", str(toy)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("toy_json: ") and "outputs (4, 10)" in printed
    counts = yaml.safe_load(out.read_text())  # JSON is YAML
    assert counts["fc1.weight"] == 23520 and out.read_text().startswith('{\n  "')
    assert "toy_json" in list_executors("export")
    # The built-in flags still work beside it, with their own options.
    assert main(["export", "--packed", str(finished_run), "--out", str(tmp_path / "m.admmpk"), "--scheme", "csr"]) == 0
    assert "outputs identical (eval mode)" in capsys.readouterr().out


def test_a_run_configs_plugins_are_imported_before_the_flags_are_built(finished_run, tmp_path, capsys, registry_guard):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    write_toy(run, "toy_cfg")
    spec = yaml.safe_load((run / "config.yaml").read_text())
    spec["plugins"] = ["toy_cfg_plugin.py"]  # relative to the run folder's config.yaml
    (run / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    # code shipped inside a run folder runs only when the user says they trust the folder
    with pytest.raises(SystemExit) as code:
        main(["export", str(run), "--toy-cfg", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and "names plugins ['toy_cfg_plugin.py'] from inside" in err[0]
    assert "--trust-plugins" in err[0] and "toy_cfg" not in list_executors("export")
    assert main(["export", str(run), "--toy-cfg", "--out", str(tmp_path / "c.json"), "--trust-plugins"]) == 0
    assert capsys.readouterr().out.startswith("toy_cfg: ")


def test_a_run_folders_own_plugins_are_refused_by_report_export_and_hardware(finished_run, tmp_path, capsys):
    """A shared run folder's config.yaml naming a .py file inside it (or a module found there) would run its code
    on report / export / hardware: one line, nothing imported, unless --trust-plugins. A plugin outside the folder
    (the absolute path a real run records) needs no flag."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "ran"
    (run / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    spec = yaml.safe_load((run / "config.yaml").read_text())
    spec["plugins"] = ["evil.py"]
    (run / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for argv in (["report", str(run)], ["hardware", str(run), "--no-save", "--samples", "20"],
                 ["export", "--packed", str(run), "--out", str(tmp_path / "m.admmpk")]):
        if argv[0] == "export":
            with pytest.raises(SystemExit) as code:
                main(argv)
            assert code.value.code == 2
        else:
            assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "names plugins ['evil.py'] from inside the run folder" in err[0], (argv, err)
        assert not marker.exists()
    from admmcompress.run_export import check_run_plugins, read_run_config

    with pytest.raises(ValueError, match="--trust-plugins"):
        read_run_config(run)
    outside = tmp_path / "mine" / "own_plugin.py"
    outside.parent.mkdir()
    outside.write_text("")
    spec["plugins"] = [str(outside)]
    (run / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    check_run_plugins(run)  # the user's own plugin, outside the folder: no flag needed
    spec["plugins"] = ["evil.py"]
    (run / "config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert read_run_config(run, trust_plugins=True).plugins == [str((run / "evil.py").resolve())]
    assert marker.exists()  # trusted: imported


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admmcompress: error: "), err
    return err[0]


def test_export_errors_are_one_line(hand_run, tmp_path, capsys):
    run, _ = hand_run
    with pytest.raises(SystemExit) as code:  # its flags cannot be parsed without it: ends like a usage error
        main(["export", "--toy", str(run), "--out", "x", "--plugin", str(tmp_path / "no.py")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("admmcompress: error: plugin file")
    assert "does not exist" in err[0]
    message = one_line_error(capsys, ["export", "--onnx", str(run), "--out", "x.onnx", "--scheme", "csr"])
    assert "--scheme is an option of --packed, not of --onnx; drop it" in message
    message = one_line_error(capsys, ["export", "--packed", str(run), "--out", "x", "--index-bits", "many"])
    assert "index_bits='many': give a positive integer" in message
    with pytest.raises(SystemExit) as code:  # a flag no registered executor has: argparse's usage error
        main(["export", "--toy", str(run), "--out", "x"])
    assert code.value.code == 2 and "--toy" not in capsys.readouterr().out


def test_export_help_lists_every_registered_flag(capsys):
    with pytest.raises(SystemExit) as code:
        main(["export", "--help"])
    assert code.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--compact", "--onnx", "--packed", "--scheme", "--index-bits", "--plugin", "--out"):
        assert flag in text, flag
    assert "--blocksparse" not in text  # it cannot export
