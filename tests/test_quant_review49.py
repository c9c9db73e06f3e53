"""Review 49 of quantization storage accounting: tied weights counted and packed once, the size lines of a model
with nothing to store, and iterative quantization freezing a free weight that trained to exactly 0.0."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
import torch
import torch.nn as nn

from admmcompress.executors.packed import (
    ALIAS_TAG,
    PackedFormatError,
    load_packed,
    packed_size_lines,
    read_manifest,
    save_packed,
    save_packed_bytes,
    tied_names,
)
from admmcompress.finalize import MaskSet, partial_quantize
from admmcompress.plan import Plan
from admmcompress.report.storage import storage
from admmcompress.structures.quantization import FixedPoint, Ternary

pytestmark = pytest.mark.usefixtures("private_rng")


class TiedLM(nn.Module):
    """A language model's shape: the output layer's weight IS the embedding's (``tie=False``: the same names, two
    tensors)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.lm_head = nn.Linear(8, 32, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.body(self.embed(tokens))))


def _quantized(model: nn.Module) -> nn.Module:
    """Every weight matrix on 2-bit fixed-point levels, a few pruned (coded, not raw, in the packed file)."""
    with torch.no_grad():
        for module in (model.embed, model.body):
            weight = module.weight
            weight.mul_((torch.rand_like(weight) > 0.3).to(weight.dtype))
            weight.copy_(FixedPoint(bits=2).project(weight))
    return model


def _untied_copy(model: TiedLM) -> TiedLM:
    copy = TiedLM(tie=False)
    copy.load_state_dict(model.state_dict())
    return copy


# --- 1. tied weights: counted once, packed once -----------------------------------------------------------


def test_a_tied_weight_is_one_row_of_the_storage_report() -> None:
    model = _quantized(TiedLM())
    report, untied = storage(model), storage(_untied_copy(model))
    assert [row.name for row in report.layers] == ["embed.weight", "body.weight"]  # under its first name
    assert report.params == 32 * 8 + 8 * 8 and untied.params == report.params + 32 * 8
    assert report.bits() == untied.bits() - untied.layers[-1].bits[untied.layers[-1].best]
    assert report.other_params == untied.other_params == 8 + 16  # body.bias, norm's weight and bias
    # a tied weight named only through the later module is still counted once: as that layer's, not again as "other"
    only_head = storage(model, layers=["lm_head"])
    assert [row.name for row in only_head.layers] == ["lm_head.weight"]
    assert only_head.other_params == 8 * 8 + 8 + 16  # body's weight and bias, norm: the embedding is the head's row


def test_a_module_registered_twice_is_counted_and_packed_once() -> None:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert tied_names(model) == {"2.weight": "0.weight", "2.bias": "0.bias"}
    report = storage(model)
    summary = save_packed(model, buffer := io.BytesIO())
    assert summary.weight_bits == report.bits() and 8 * summary.other_bytes == report.other_bits
    assert list(summary.schemes) == ["0.weight"] and summary.raw_weights == {}
    restored = load_packed(buffer.getvalue(), nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)))
    assert restored[2] is not restored[0] and restored[2].weight is restored[0].weight
    assert restored[2].bias is restored[0].bias


def test_a_tied_weight_is_packed_once_and_the_size_lines_stay_exact() -> None:
    model = _quantized(TiedLM())
    data = save_packed_bytes(model)
    summary = save_packed(model, io.BytesIO())
    report = storage(model)
    assert data[:4] == b"APK\x04" and summary.aliases == {"lm_head.weight": "embed.weight"}
    assert list(summary.schemes) == ["embed.weight", "body.weight"]
    assert summary.file_bytes == len(data)
    # every byte explained: the report's bits, the header, each weight's padding, nothing else
    assert summary.weight_bits == report.bits()
    assert 8 * summary.other_bytes == report.other_bits + report.buffer_bits
    lines = packed_size_lines(len(data), summary, report)
    assert not any("buffers not in the report" in line for line in lines)
    assert any("1 tied tensor(s) stored once, as alias entries: lm_head.weight = embed.weight" in line
               for line in lines)
    # the untied file holds the head's 32x8 weight a second time: the tied one is that much smaller
    untied = save_packed_bytes(_untied_copy(model))
    assert untied[:4] == b"APK\x03"
    assert len(untied) - len(data) > 32 * 8 * 2 // 8  # at least the 2-bit codes of the second copy
    manifest, _ = read_manifest(data, TiedLM())
    alias = [entry for entry in manifest["tensors"] if entry["kind"] == "alias"]
    assert alias == [{"name": "lm_head.weight", "shape": [32, 8], "kind": "alias", "of": "embed.weight", "bytes": 0}]


def test_loading_restores_the_tie_even_into_an_untied_instance() -> None:
    model = _quantized(TiedLM()).eval()
    data = save_packed_bytes(model)
    for skeleton in (TiedLM(), TiedLM(tie=False)):
        restored = load_packed(data, skeleton)
        assert restored.lm_head.weight is restored.embed.weight
        for name, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[name], value), name
        tokens = torch.randint(0, 32, (5,))
        torch.testing.assert_close(restored(tokens), model(tokens), rtol=0, atol=0)
        with torch.no_grad():  # one tensor: training the head trains the embedding
            restored.lm_head.weight[0, 0] = 7.0
        assert float(restored.embed.weight.detach()[0, 0]) == 7.0


def test_a_format_3_file_of_a_tied_model_written_before_ties_were_stored_once_still_loads() -> None:
    model = _quantized(TiedLM())
    # the old writer stored each name's copy in full, exactly as it writes an untied model with the same values
    old = save_packed_bytes(_untied_copy(model))
    assert old[:4] == b"APK\x03" and len(old) > len(save_packed_bytes(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 3 has a checksum: no warning
        restored = load_packed(old, TiedLM())
    assert restored.lm_head.weight is restored.embed.weight
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name


def test_a_crafted_alias_is_one_packed_format_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    data = bytearray(save_packed_bytes(model))
    header = read_manifest(bytes(data), model)[0]["header_bytes"]
    # state dict: 0.weight, 0.bias, 1.weight (the alias of tensor 0), 1.bias (raw); the alias's bytes come just
    # before 1.bias's raw tag, the header's last byte
    assert data[header - 3 : header] == bytes([ALIAS_TAG, 0, 0xFF])

    def reload(index: int, magic: bytes = b"APK\x04") -> None:
        crafted = bytearray(data)
        crafted[:4], crafted[header - 2] = magic, index
        crafted[4:8] = struct.pack("<I", zlib.crc32(bytes(crafted[8:])))
        load_packed(bytes(crafted), model)

    with pytest.raises(PackedFormatError, match=r"'1\.weight' is tied to tensor 2, which is not an earlier stored"):
        reload(2)
    with pytest.raises(PackedFormatError, match=r"'1\.weight' is tied to '0\.bias', which is float32 \[4\]"):
        reload(1)
    with pytest.raises(PackedFormatError, match=r"is corrupt \(tensor '1\.weight': tag 0xfe\)"):
        reload(0, b"APK\x03")  # format 3 has no alias entries
    with pytest.raises(PackedFormatError, match=r"is format 5; this admmcompress reads formats 1 to 4 "):
        reload(0, b"APK\x05")


# --- 2. nothing to store: no ratio ------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: nn.Linear(0, 3, bias=False), lambda: nn.Embedding(0, 4), nn.Sequential])
def test_size_lines_of_a_model_with_nothing_to_store_say_not_applicable(make) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        model = make()
    report = storage(model)
    buffer = io.BytesIO()
    summary = save_packed(model, buffer)
    size = len(buffer.getvalue())
    lines = packed_size_lines(size, summary, report)  # ZeroDivisionError before
    assert lines[-1].endswith(
        "file / report = n/a (the report counts 0 B: no weight, other parameter or buffer holds a value)"
    )
    assert f"packed file: {size:,} B = {summary.header_bytes:,} header + 0 weights + 0 other tensors" in lines[-1]


def test_an_empty_weight_beside_a_bias_still_gives_a_ratio() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Linear(0, 3)
    buffer = io.BytesIO()
    summary = save_packed(model, buffer)
    lines = packed_size_lines(len(buffer.getvalue()), summary, storage(model))
    assert "file / report = " in lines[-1] and "n/a" not in lines[-1]


# --- 3. iterative quantization: pruned comes from the masks, not from a value of 0.0 ------------------------


def _targets(model: nn.Module, structure=None):
    return Plan({"": structure or FixedPoint(bits=2)}).resolve(model)


def _train_step(model: nn.Linear, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(32, model.in_features)).pow(2).sum().backward()
    optimizer.step()


def test_a_free_weight_at_exactly_zero_stays_free_in_the_first_round() -> None:
    model = nn.Linear(8, 8, bias=False)
    pruned = torch.rand(8, 8) < 0.25
    pruned[0, 0], pruned[1, 1] = False, True
    with torch.no_grad():
        model.weight.mul_(~pruned)
        model.weight[0, 0] = 0.0  # kept by the mask, trained to 0.0
    state = partial_quantize(model, _targets(model), 0.3, MaskSet({"weight": ~pruned}))
    held = state.held["weight"]
    assert not bool(held.frozen[0, 0]) and int(held.codes[0, 0]) >= 0 and bool(state.masks["weight"][0, 0])
    assert bool(held.frozen[pruned].all()) and bool((held.codes[pruned] == -1).all())  # truly pruned: frozen, zero
    assert torch.equal(state.masks["weight"], ~pruned)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state.attach(model, optimizer)
    _train_step(model, optimizer)
    assert float(model.weight[0, 0]) != 0.0  # trains
    assert bool((model.weight.detach()[pruned] == 0).all())  # pruned stay zero
    state.detach()


def test_a_free_weight_that_trains_to_zero_between_rounds_stays_free_then_takes_a_level() -> None:
    model = nn.Linear(8, 8, bias=False)
    targets = _targets(model)
    state = partial_quantize(model, targets, 0.3)
    free = (~state.held["weight"].frozen).nonzero()[0].tolist()
    with torch.no_grad():
        model.weight[free[0], free[1]] = 0.0
    state = partial_quantize(model, targets, 0.3, state)
    held = state.held["weight"]
    assert not bool(held.frozen[free[0], free[1]]) and int(held.codes[free[0], free[1]]) >= 0
    assert bool(state.masks["weight"].all())  # nothing pruned
    final = partial_quantize(model, targets, 1.0, state)
    held = final.held["weight"]
    assert bool(held.frozen.all()) and bool((held.codes >= 0).all())
    assert float(model.weight[free[0], free[1]]) in held.levels.tolist()  # on a level: kept, not pruned


def test_frozen_codes_carry_over_from_a_set_saved_before_the_fix() -> None:
    """A round written by the old code held a free zero at code -1: its value stays 0, it does not jump to a level."""
    model = nn.Linear(6, 6, bias=False)
    targets = _targets(model)
    state = partial_quantize(model, targets, 0.3)
    held = state.held["weight"]
    spot = (~held.frozen).nonzero()[0].tolist()
    with torch.no_grad():
        model.weight[spot[0], spot[1]] = 0.0
    held.frozen[spot[0], spot[1]], held.codes[spot[0], spot[1]] = True, -1
    again = partial_quantize(model, targets, 0.3, state)
    assert int(again.held["weight"].codes[spot[0], spot[1]]) == -1 and float(model.weight[spot[0], spot[1]]) == 0.0


def test_ternary_still_prunes_its_dead_zone_and_its_exact_zeros_in_the_first_round() -> None:
    model = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    targets = _targets(model, Ternary())
    dead = Ternary().quantize(model.weight.detach()).codes < 0  # the dead zone, the exact zero in it
    state = partial_quantize(model, targets, 0.3)
    assert bool(dead[0, 0]) and torch.equal(state.masks["weight"], ~dead)
    assert bool(state.held["weight"].frozen[dead].all())
