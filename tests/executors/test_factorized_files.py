"""Factorized convs (Tucker-2, PENNI shared kernels) through the file formats and compaction: a compacted folder
and a packed file load from their records alone, compaction removes channels through the factors, and a file
that describes them wrongly is refused in one line before anything is built."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from admmcompress.executors import get_executor
from admmcompress.executors.base import ExecutorError
from admmcompress.executors.compact import CompactConfig
from admmcompress.executors.factorized import factorized_spec, rebuild_factorized
from admmcompress.executors.manifest import SELF_CHECKSUM, ManifestError, canonical_sha256, load_compacted
from admmcompress.executors.packed import PackedFormatError, load_packed, save_packed_bytes
from admmcompress.executors.penni import SharedKernelConv, compact_shared
from admmcompress.executors.tucker import Tucker2Conv
from admmcompress.models import create_model

COMPACT = get_executor("compact")


def plain() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    )


def factorized(prune: bool = True) -> nn.Sequential:
    """Conv 0 keeps 5 of 8 filters; conv 3 is shared-kernel (2 of its filters' coefficients zero), conv 6 Tucker-2."""
    torch.manual_seed(0)
    model = plain()
    for bn in (model[1], model[4]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    model[3] = SharedKernelConv.from_conv(model[3], 4)
    model[6] = Tucker2Conv.from_conv(model[6], (3, 4))
    if prune:
        with torch.no_grad():
            for layer in (model[0], model[1]):
                layer.weight[:3] = 0
                layer.bias[:3] = 0
            model[3].coefs[:2] = 0
            model[3].bias[:2] = 0
            model[4].weight[:2] = 0
            model[4].bias[:2] = 0
    return model.eval()


def test_compaction_removes_channels_through_shared_kernel_and_tucker_convs():
    model, x = factorized(), torch.randn(2, 3, 8, 8)
    small = COMPACT.convert(model, example=x).eval()
    assert isinstance(small[3], SharedKernelConv) and isinstance(small[6], Tucker2Conv)
    # conv 0: 3 filters gone, so the shared-kernel conv reads 5 channels; its 2 zero filters go, so Tucker's
    # first 1x1 conv reads 6; its basis is kept and its coefficients solved back (exact up to rounding)
    assert (small[0].out_channels, small[3].in_channels, small[3].out_channels, small[6].first.in_channels) == (
        5, 5, 6, 6)
    assert torch.equal(small[3].basis, model[3].basis) and small[6].ranks == (3, 4)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_compact_shared_keeps_column_executors_off_the_shared_kernel_convs():
    model, x = factorized(), torch.randn(2, 3, 8, 8)
    result = compact_shared(model, x, config=CompactConfig(columns="on"))
    assert isinstance(result.model[3], SharedKernelConv) and result.params_after < result.params_before


def test_a_compacted_factorized_model_loads_from_its_manifest_alone(tmp_path):
    model, x = factorized(), torch.randn(2, 3, 8, 8)
    small = COMPACT.convert(model, example=x).eval()
    COMPACT.save(small, tmp_path)
    layers = json.loads((tmp_path / "manifest.json").read_text())["layers"]
    assert layers["3"] == {"type": "SharedKernelConv", "in_channels": 5, "out_channels": 6, "bases": 4,
                           "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                           "bias": True}
    assert layers["6"]["type"] == "Tucker2Conv" and layers["6"]["ranks"] == [3, 4]
    assert not any(name.startswith("6.") for name in layers)  # its three convs are built from its record
    restored = load_compacted(tmp_path, plain()).eval()  # the skeleton has plain convs there, at full width
    assert type(restored[3]) is SharedKernelConv and type(restored[6]) is Tucker2Conv
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))


def test_a_bias_that_compaction_folded_into_a_tucker_factor_is_recorded(tmp_path):
    model = factorized(prune=False)
    with torch.no_grad():  # a bias on the inner convs (as compaction folds a removed constant channel into)
        model[6].first.bias = nn.Parameter(torch.randn(4))
    COMPACT.save(model, tmp_path)
    layer = json.loads((tmp_path / "manifest.json").read_text())["layers"]["6"]
    assert (layer["bias"], layer["first_bias"], layer["core_bias"]) == (True, True, False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_compacted(tmp_path, plain()).eval()(x), model(x))


def rewrite(folder, change) -> None:
    """Edit the manifest's layers and give it a fresh self-checksum (a crafted, not a damaged, file)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest["layers"])
    manifest = {k: v for k, v in manifest.items() if k != SELF_CHECKSUM}
    (folder / "manifest.json").write_text(json.dumps({**manifest, SELF_CHECKSUM: canonical_sha256(manifest)}))


@pytest.mark.parametrize(("layer", "key", "value", "says"), [
    ("6", "ranks", [3, "4"], "Tucker2Conv) with arguments"),
    ("6", "ranks", [0, 4], "Tucker2Conv) with arguments"),
    ("6", "padding_mode", "mirror", "Tucker2Conv) with arguments"),
    ("6", "first_bias", 1, "Tucker2Conv) with arguments"),
    ("3", "bases", 10, "cannot be built from (ValueError: SharedKernelConv: bases=10 must be in 1..9"),
    ("3", "padding", [-1, 1], "SharedKernelConv) with arguments"),
    ("3", "device", "cuda", "SharedKernelConv) with arguments"),
])
def test_a_manifest_describing_a_factorized_layer_wrongly_is_one_line(tmp_path, layer, key, value, says):
    COMPACT.save(factorized(prune=False), tmp_path)
    rewrite(tmp_path, lambda layers: layers[layer].__setitem__(key, value))
    with pytest.raises(ManifestError, match="manifest.json' has layer") as err:
        load_compacted(tmp_path, plain())
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_packed_factorized_model_loads_from_its_spec_alone():
    torch.manual_seed(0)
    model = create_model("lenet5")
    rebuild_factorized(model, {"conv2": {"structure": "tucker2", "ranks": [10, 5]}})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    data = save_packed_bytes(model, model_spec={"name": "lenet5"})
    restored = load_packed(io.BytesIO(data)).eval()
    assert factorized_spec(restored) == {"conv2": {"structure": "tucker2", "ranks": [10, 5]}}
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("spec", "says"), [
    ({"conv2": {"structure": "tucker2", "ranks": [60, 5]}}, "layer 'conv2': Tucker2Conv: ranks (60, 5)"),
    ({"conv2": {"structure": "tucker2", "rank_ratio": 0.5}}, "only tucker2 with ranks or shared_kernels"),
    ({"conv2": {"structure": "filter", "sparsity": 0.5}}, "only tucker2 with ranks or shared_kernels"),
    ({"conv9": {"structure": "shared_kernels", "bases": 4}}, "layer 'conv9' is not in the model"),
    ({"fc1": {"structure": "shared_kernels", "bases": 4}}, "layer 'fc1' is a Linear, not the Conv2d"),
    ({"conv2": {"structure": "shared_kernels", "bases": 40}}, "bases=40 must be in 1..25"),
    ({"conv2": {"structure": "nope"}}, "unknown structure 'nope'"),
    ({"conv2": [10, 5]}, "needs a structure mapping"),
    ([["conv2", 4]], "must map layer names to structures"),
])
def test_a_wrong_factorized_spec_is_one_line_and_changes_nothing(spec, says):
    model = create_model("lenet5")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ExecutorError, match="^factorized layers: ") as err:
        rebuild_factorized(model, {"conv1": {"structure": "shared_kernels", "bases": 4}, **spec}
                           if isinstance(spec, dict) else spec)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_a_packed_file_with_a_wrong_factorized_spec_is_refused_in_one_line():
    model = create_model("lenet5")
    data = save_packed_bytes(model, model_spec={"name": "lenet5", "factorized_layers": {"fc1": {
        "structure": "tucker2", "ranks": [2, 2]}}})
    with pytest.raises(PackedFormatError, match="layer 'fc1' is a Linear, not the Conv2d it factorized"):
        load_packed(io.BytesIO(data))


def test_a_tucker_conv_compacted_below_its_ranks_saves_and_loads(tmp_path):
    """Filter pruning before a Tucker-2 conv can leave its first 1x1 conv reading fewer channels than its rank: the
    manifest rebuilt it through the factorizing constructor, which refused that (a review's finding)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    model[2] = Tucker2Conv.from_conv(model[2], (12, 12))
    with torch.no_grad():
        model[0].weight[4:] = 0
        model[0].bias[4:] = 0
    x = torch.randn(2, 3, 8, 8)
    small = COMPACT.convert(model, example=x).eval()
    assert small[2].first.in_channels == 4 and small[2].ranks == (12, 12)
    COMPACT.save(small, tmp_path)
    restored = load_compacted(tmp_path, nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                                      nn.Conv2d(16, 16, 3, padding=1)))
    with torch.no_grad():
        assert torch.equal(restored(x), small(x))


def test_compact_itself_refuses_a_shared_kernel_model_in_one_line():
    from admmcompress.executors.compact import CompactionError, compact

    with pytest.raises(CompactionError, match=r"^compact: '3' is a shared-kernel conv, which compact\(\) cannot "):
        compact(factorized(), torch.randn(2, 3, 8, 8))
