"""What the crossbar mapping covers: recurrent weight matrices, transposed convs and grouped convs are mapped
(and noise / SOT-MRAM / costs follow the same layout); what it cannot map or run through the ADC model is
named in the report, never dropped silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from admmcompress.hardware import CrossbarSpec, DeviceNoise, NoiseInjector, add_adc, analyze, map_model, pim_cost
from admmcompress.hardware.crossbar import gemm_weights
from admmcompress.hardware.noise import CellMapping, device_noise
from admmcompress.hardware.pim import PIMSpec
from admmcompress.models import create_model
from admmcompress.report.hardware import render_hardware


def test_every_weight_matrix_of_the_registry_gru_is_mapped_with_its_time_steps():
    model = create_model("gru_fsdd").eval()
    x = torch.randn(2, 50, 39)
    mapping = map_model(model, CrossbarSpec(), x[:1])
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    assert weights == 622_336 and sum(layer.weights for layer in mapping.layers) == weights
    by_name = {layer.name: layer for layer in mapping.layers}
    assert sorted(by_name) == ["fc", "gru.weight_hh_l0", "gru.weight_hh_l1", "gru.weight_ih_l0", "gru.weight_ih_l1"]
    # (768 x 39): 48 blocks of 16 outputs x 1 block of 128 inputs; one pass over the tiles per time step.
    assert (by_name["gru.weight_ih_l0"].dense, by_name["gru.weight_ih_l0"].positions) == (48, 50)
    assert (by_name["gru.weight_hh_l1"].dense, by_name["fc"].positions) == (96, 1)
    assert mapping.total("dense") == 48 + 96 * 3 + 2


def test_gru_costs_count_its_tiles_and_time_steps():
    model = create_model("gru_fsdd").eval()
    result = analyze(model, CrossbarSpec(), torch.randn(1, 50, 39), pim_bits=(2,))
    energy = result.costs["dense"].layer_energy_nj
    assert energy["gru.weight_hh_l0"] == pytest.approx(energy["fc"] / 2 * 96 * 50)  # 96 tiles x 50 steps vs 2 x 1
    assert result.baseline.total("dense") > 600  # 16-bit reference: 8 outputs per tile, every GRU matrix in it
    assert len(result.pim[0].layers) == 5


def test_transposed_conv_is_mapped_as_the_direct_conv_it_equals():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ConvTranspose2d(64, 3, 3))
    mapping = map_model(model, CrossbarSpec(), torch.randn(1, 3, 10, 10))
    conv, deconv = mapping.layers
    assert (deconv.name, deconv.outputs, deconv.inputs, deconv.positions) == ("1", 3, 64 * 9, 100)
    assert (conv.outputs, conv.inputs, conv.positions) == (64, 27, 64)


def test_layers_no_crossbar_computes_are_named_in_the_report():
    model = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 4, 8))
    result = analyze(model, CrossbarSpec(), torch.randint(0, 100, (1, 4)), pim_bits=())
    assert result.mapping.unmapped == {"0.weight": 1600}
    text = render_hardware(result)
    assert "not mapped onto crossbar tiles" in text and "'0.weight' (1,600 weights)" in text


def test_layers_the_adc_model_leaves_exact_are_named_in_the_report():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 3))
    x = torch.randn(5, 2, 8)
    result = add_adc(analyze(model, CrossbarSpec(), x[:1], pim_bits=()), model, lambda m: 50.0, [6], x)
    assert result.adc_exact == ["0"]
    text = render_hardware(result)
    assert "left exact (no ADC on their partial sums): '0'" in text
    assert result.to_dict()["adc_exact"] == ["0"]


def depthwise_and_its_dense_equivalent() -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    dw = nn.Conv2d(64, 64, 3, groups=64, padding=1)
    full = nn.Conv2d(64, 64, 3, padding=1)  # the same function: block-diagonal weights
    with torch.no_grad():
        full.weight.zero_()
        for c in range(64):
            full.weight[c, c] = dw.weight[c, 0]
    return dw, full


def test_a_grouped_conv_takes_the_tiles_of_its_block_diagonal_layout():
    dw, full = depthwise_and_its_dense_equivalent()
    layers = [map_model(nn.Sequential(m), CrossbarSpec()).layers[0] for m in (dw, full)]
    # 16 outputs (144 inputs) per diagonal block row: each crosses one 128-input border -> 2 tiles, 4 rows.
    assert [(lay.outputs, lay.inputs, lay.masked, lay.compact) for lay in layers] == [(64, 576, 8, 8)] * 2
    assert layers[0].dense == 8 and layers[0].weights == 64 * 9  # only tiles the layout instantiates
    spec = PIMSpec(rows=256, cols=256, weight_bits=4)
    assert pim_cost(dw, spec).subarrays == pim_cost(full, spec).subarrays == 3
    assert pim_cost(dw, spec, dense=True).subarrays == 3  # the reference keeps the layout's zeros out


@pytest.mark.parametrize("transposed", [False, True])
def test_noiseless_read_back_of_a_grouped_conv_is_exact_on_the_grid(transposed):
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = kind(6, 4, 3, groups=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-7, 8, conv.weight.shape, generator=g) * 0.25)
        conv.weight.view(-1)[0] = 7 * 0.25
    before = conv.weight.detach().clone()
    spec = CrossbarSpec(rows=8, cols=16, bits_per_cell=2, weight_bits=4)
    with device_noise(nn.Sequential(conv), spec, DeviceNoise()):
        assert torch.equal(conv.weight.detach(), before)
    (gemm,) = gemm_weights(nn.Sequential(conv))
    assert torch.equal(gemm.weight_of(gemm.blocks()), conv.weight)
    assert gemm.blocks().shape == (2, 2, 3 * 9)  # groups x outputs x inputs per group, either kind


def test_the_blocks_of_a_transposed_conv_are_the_direct_conv_it_equals():
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False)
    x = torch.randn(1, 6, 5, 5)
    (gemm,) = gemm_weights(nn.Sequential(deconv))
    # Stride 1: a transposed conv is the direct conv of the flipped kernel over the input padded by k - 1.
    kernel = gemm.blocks().reshape(4, 3, 3, 3).flip(-1, -2)
    direct = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (2, 2, 2, 2)), kernel, groups=2)
    assert torch.allclose(direct, deconv(x), atol=1e-6)


def test_cells_of_a_grouped_conv_exist_only_on_tiles_its_layout_instantiates():
    conv = nn.Conv2d(4, 4, 1, groups=4, bias=False)  # 4 diagonal 1x1 blocks
    with torch.no_grad():
        conv.weight.fill_(1.0)
    spec = CrossbarSpec(rows=2, cols=4, bits_per_cell=2, weight_bits=3)  # 2 outputs x 2 inputs per tile
    (gemm,) = gemm_weights(nn.Sequential(conv))
    cells = CellMapping.of(conv.weight, spec, layout=gemm)
    assert cells.exists.shape == (4, 1, 1) and bool(cells.exists.all())
    assert torch.equal(cells.read(DeviceNoise()), conv.weight.detach().double())


def test_device_noise_and_the_injector_reach_recurrent_matrices():
    torch.manual_seed(0)
    model = nn.GRU(4, 8, batch_first=True)
    x = torch.randn(3, 5, 4)
    before = model.weight_hh_l0.detach().clone()
    with device_noise(model, CrossbarSpec(), DeviceNoise(sigma=0.2), seed=1):
        assert not torch.equal(model.weight_hh_l0.detach(), before)
    assert torch.equal(model.weight_hh_l0.detach(), before)
    injector = NoiseInjector(CrossbarSpec(), DeviceNoise(sigma=0.2), seed=0).install(model)
    model.train()
    out1, out2 = model(x)[0], model(x)[0]
    assert not torch.equal(out1, out2)  # fresh noise in the recurrent matrices at each forward
    out1.sum().backward()
    assert model.weight_ih_l0.grad is not None and model.weight_hh_l0.grad is not None
    injector.remove()
    assert torch.equal(model(x)[0], model(x)[0])


def test_an_attention_out_projection_passes_once_per_position_and_a_dict_example_is_taken():
    """nn.MultiheadAttention runs its out_proj inside F.multi_head_attention_forward (no hook of its own fires);
    a model of keyword inputs gets its example as the plan's tracer passes it."""
    from admmcompress.hardware.crossbar import output_positions

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.fc = nn.MultiheadAttention(16, 2, batch_first=True), nn.Linear(16, 4)

        def forward(self, tokens, scale=1.0):
            y, _ = self.att(tokens, tokens, tokens)
            return self.fc(y * scale)

    model = Attention()
    assert output_positions(model, torch.randn(3, 7, 16)) == {"att.out_proj": 7, "fc": 7}
    assert output_positions(model, {"tokens": torch.randn(3, 5, 16), "scale": 2.0}) == {"att.out_proj": 5, "fc": 5}


class _Tagger(nn.Module):
    """An LSTM tagger, sequence-first or batch-first: the same layers, only the input layout differs."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=batch_first)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def test_a_sequence_first_model_is_counted_per_sample_over_every_time_step():
    """Cutting dim 0 of a (T, B, F) example would cut time: the whole example runs, and the batch comes from
    the recurrent layer's batch axis."""
    from admmcompress.hardware.crossbar import output_positions

    first = output_positions(_Tagger(batch_first=False), torch.randn(12, 3, 8))
    batched = output_positions(_Tagger(batch_first=True), torch.randn(3, 12, 8))
    assert first == batched
    assert "head" in first and set(first.values()) == {12}, first


def test_a_conv_that_folds_time_into_its_batch_is_counted_per_sample():
    """(B*T, C, H, W) through a conv, then an LSTM over T: the LSTM's batch is the model's, so the conv makes
    T x H x W passes per sample."""
    from admmcompress.hardware.crossbar import output_positions

    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.lstm = nn.LSTM(4 * 5 * 5, 6, batch_first=True)

        def forward(self, x):  # (B, T, 1, 5, 5)
            b, t = x.shape[:2]
            y = self.conv(x.flatten(0, 1)).reshape(b, t, -1)
            return self.lstm(y)[0]

    found = output_positions(Video(), torch.randn(2, 7, 1, 5, 5))
    assert found["conv"] == 7 * 5 * 5
    assert all(v == 7 for k, v in found.items() if k.startswith("lstm")), found


def test_positions_do_not_depend_on_the_batch_of_a_batch_first_example():
    from admmcompress.hardware.crossbar import output_positions

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    one, four = output_positions(model, torch.randn(1, 2, 6, 6)), output_positions(model, torch.randn(4, 2, 6, 6))
    assert one == four == {"0": 16, "2": 1}


def test_attention_over_windows_folded_into_the_batch_keeps_the_examples_batch():
    """Swin-style windows: a batch-first attention runs on (B * windows, L, E); the example's dim 0 is still the
    model's batch, so the conv before it makes H x W passes per sample (not H x W / windows)."""
    from admmcompress.drivers.budget import gemm_shapes
    from admmcompress.hardware.crossbar import output_positions

    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):  # (B, 3, 8, 8) -> 4 windows of 4 x 4
            y = self.conv(x)
            b = y.shape[0]
            w = y.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(b * 4, 16, 8)
            return self.fc(self.att(w, w, w)[0])

    x = torch.randn(2, 3, 8, 8)
    assert output_positions(Windows(), x)["conv"] == 64
    assert gemm_shapes(Windows(), x)["conv.weight"].positions == 64
