"""PENNI's two-stage executor (depthwise basis conv + 1x1 coefficient conv) and the cross-layer shrink."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from admmcompress.executors import ExecutorError, get_executor
from admmcompress.executors.penni import (
    SharedKernelConv,
    TwoStageConv,
    decompose_shared_kernels,
    shrink,
    to_two_stage,
)


def shared(in_ch: int = 5, out_ch: int = 7, bases: int = 4, seed: int = 0, **geometry) -> SharedKernelConv:
    torch.manual_seed(seed)
    return SharedKernelConv.from_conv(nn.Conv2d(in_ch, out_ch, 3, **geometry), bases)


def reference(module: SharedKernelConv, x: torch.Tensor) -> torch.Tensor:
    """The decomposed conv computed by brute force: one conv with sum_j coefs[o, i, j] basis[j]."""
    weight = torch.einsum("oij,jhw->oihw", module.coefs, module.basis)
    return F.conv2d(x, weight, module.bias, module.stride, module.padding, module.dilation)


@pytest.mark.parametrize("geometry", [{"padding": 1}, {"stride": 2, "padding": 1, "bias": False}, {"dilation": 2}])
@pytest.mark.parametrize("bases", [1, 4, 9])
def test_two_stage_equals_the_decomposed_conv(geometry, bases):
    module = shared(bases=bases, **geometry)
    x = torch.randn(2, 5, 11, 11)
    with torch.no_grad():
        out = TwoStageConv.from_shared(module)(x)
        assert torch.allclose(out, reference(module, x), atol=1e-5)
        assert torch.allclose(module(x), reference(module, x), atol=1e-5)


def test_d_equal_k_squared_reproduces_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        assert torch.allclose(TwoStageConv.from_shared(SharedKernelConv.from_conv(conv, 9))(x), conv(x), atol=1e-5)


def test_pruned_coefficients_drop_maps_and_input_channels_exactly():
    module = shared(bases=4, padding=1)
    with torch.no_grad():
        module.coefs[:, 1] = 0  # input channel 1 unused: gathered away
        module.coefs[:, :, 2] = 0  # basis 2 unused by every channel
        module.coefs[module.coefs.abs() < 0.05] = 0
    fast = TwoStageConv.from_shared(module)
    used = module.coefs.ne(0).any(dim=0)
    assert len(fast.maps) == int(used.sum()) and all(i != 1 and j != 2 for i, j in fast.maps)
    assert fast.index is not None
    x = torch.randn(3, 5, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fast(x), reference(module, x), atol=1e-5)
    assert fast.macs((9, 9)) == 81 * (len(fast.maps) * 9 + int(module.coefs.count_nonzero()))


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity shortcut: the residual channels are one coupled group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(x + y))


def test_shrink_removes_dead_channels_and_keeps_the_union_across_a_residual_add():
    torch.manual_seed(0)
    model = decompose_shared_kernels(Block().eval(), {"stem": 5, "conv1": 5, "conv2": 5})
    with torch.no_grad():
        model.conv1.coefs[:3] = 0  # 3 inner filters dead: removable (their BN shift folded or zeroed)
        model.bn1.bias[:3] = 0
        model.conv2.coefs[:2] = 0  # residual channels 0-1 dead in conv2 only: the stem still writes them
        model.bn2.bias[:2] = 0
    x = torch.randn(2, 3, 8, 8)
    small = shrink(model, x)
    assert isinstance(small.conv1, TwoStageConv) and small.conv1.out_channels == 3
    assert small.conv2.out_channels == 8 and small.conv2.in_channels == 3
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_shrink_keeps_the_pruned_zeros_and_refuses_coefficients_that_fill_them(monkeypatch):
    torch.manual_seed(0)
    model = decompose_shared_kernels(Block().eval(), {"stem": 5, "conv1": 5, "conv2": 5})
    with torch.no_grad():
        for name in ("stem", "conv1", "conv2"):
            coefs = getattr(model, name).coefs
            coefs[torch.rand_like(coefs) < 0.5] = 0
    x = torch.randn(2, 3, 8, 8)
    small = shrink(model, x)
    for name in ("stem", "conv1", "conv2"):  # solved back on the same basis: no pruned zero becomes nonzero
        kept = int(getattr(small, name).stage2.weight.count_nonzero())
        assert kept <= int(getattr(model, name).coefs.count_nonzero())

    solve = torch.linalg.lstsq

    def smeared(*args, **kwargs):  # a solver that fills pruned zeros with small values must be caught
        found = solve(*args, **kwargs)
        return type(found)((found.solution + 1e-3, *found[1:]))

    monkeypatch.setattr(torch.linalg, "lstsq", smeared)
    with pytest.raises(ExecutorError, match="layer 'stem' has .* nonzero coefficients after shrinking"):
        shrink(model, x)


def test_executor_converts_and_leaves_its_input_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    fast = get_executor("penni").convert(model, bases=9)
    assert isinstance(model[0], nn.Conv2d) and isinstance(fast[0], TwoStageConv) and isinstance(fast[2], nn.Conv2d)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="no shared-kernel conv"):
        get_executor("penni").convert(model)


def test_onnx_export_of_a_two_stage_model_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from admmcompress.executors.onnx_export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = decompose_shared_kernels(Block().eval(), {"stem": 5, "conv1": 5, "conv2": 5})
    with torch.no_grad():
        model.conv1.coefs[:, 2] = 0  # a gathered stage 1 as well as a plain depthwise one
    fast = to_two_stage(model).eval()
    x = torch.randn(2, 3, 8, 8)
    export_onnx(fast, (x,), tmp_path / "penni.onnx")
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(run_onnx(tmp_path / "penni.onnx", x)[0]), fast(x), atol=1e-5)


def test_onnx_export_of_the_training_form_saves_bases_and_coefficients_not_dense_kernels(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from admmcompress.executors.onnx_export import export_onnx, run_onnx

    torch.manual_seed(0)
    model = decompose_shared_kernels(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)).eval(), {"0": 2})
    with torch.no_grad():
        model[0].coefs[:, :8] = 0  # half the input channels unused: their maps are dropped too
    x = torch.randn(2, 16, 8, 8)
    summary = export_onnx(model, (x,), tmp_path / "shared.onnx")
    assert summary.two_stage == ["0"] and isinstance(model[0], SharedKernelConv)  # the model itself unchanged
    sizes = sorted(tuple(init.dims) for init in onnx.load(str(tmp_path / "shared.onnx")).graph.initializer)
    assert (32, 16, 3, 3) not in sizes  # no rebuilt dense kernel
    weights = sum(math.prod(dims) for dims in sizes if len(dims) == 4)
    assert weights == 16 * 9 + 32 * 16  # 16 used maps of 3x3 + a 1x1 conv over them, against 4,608 dense
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(run_onnx(tmp_path / "shared.onnx", x)[0]), model(x), atol=1e-5)
    dense = export_onnx(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), (x,), tmp_path / "dense.onnx")
    assert dense.two_stage == []
    alone = model[0].eval()  # the layer itself as the model
    assert export_onnx(alone, (x,), tmp_path / "alone.onnx").two_stage == [""]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(run_onnx(tmp_path / "alone.onnx", x)[0]), alone(x), atol=1e-5)


@pytest.mark.parametrize("geometry", [{"padding": 1, "padding_mode": "reflect"}, {"padding": "same"}])
def test_a_plan_refuses_convs_the_two_stage_form_cannot_express_before_training(geometry):
    from admmcompress.plan import Plan, PlanError
    from admmcompress.structures import SharedKernels

    model = nn.Sequential(nn.Conv2d(3, 4, 3, **geometry))
    with pytest.raises(PlanError, match="layer '0': only ungrouped convs with numeric zero padding share kernels"):
        Plan({"0": SharedKernels(bases=5)}).resolve(model)


def test_bases_for_every_conv_skip_the_convs_the_two_stage_form_cannot_express():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")).eval()
    fast = get_executor("penni").convert(model, bases=9)
    assert isinstance(fast[0], TwoStageConv) and type(fast[1]) is nn.Conv2d
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


@pytest.mark.parametrize("bases", [8.9, "5", 0, {"0": 4.5}])
def test_malformed_bases_are_refused_never_truncated(bases):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ExecutorError, match=r"penni: layer .*bases=.* must be a positive integer"):
        get_executor("penni").convert(model, bases=bases)


def test_factors_and_inference_forms_stay_on_the_weights_device():
    from admmcompress.executors.penni import materialize
    from admmcompress.structures.lowrank import shared_kernel_factors

    coefs, basis = shared_kernel_factors(torch.randn(4, 3, 3, 3, device="meta"), bases=4)
    assert coefs.device.type == basis.device.type == "meta"
    module = shared().to("meta")
    assert {p.device.type for p in TwoStageConv.from_shared(module, drop_dead=False).parameters()} == {"meta"}
    assert {p.device.type for p in materialize(nn.Sequential(module)).parameters()} == {"meta"}
