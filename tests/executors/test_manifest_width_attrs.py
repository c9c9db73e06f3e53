"""The manifest records the attention layouts' width attributes (DistilBERT's ``dim``) per attention block and
restores them, so ``dim == n_heads * head size`` after a reload (transformers 4's forward reads ``dim``); a ``dim``
elsewhere (``nn.Softmax(dim=-1)``) is neither recorded nor changed, and manifests written without them still load."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from admmcompress.executors import get_executor
from admmcompress.executors.compact import compact
from admmcompress.executors.manifest import ManifestError, canonical_sha256, load_compacted
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.plan.attention import attention_layouts
from admmcompress.structures import Heads

transformers = pytest.importorskip("transformers")

DIM, HEADS, LAYERS = 32, 4, 2
HEAD_DIM = DIM // HEADS
COMPACT = get_executor("compact")


def distilbert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=100, dim=DIM, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64,
                                           max_position_embeddings=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.DistilBertModel(config).eval()


def tokens(b: int, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 31 + t)
    ids = torch.randint(0, 100, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(b, t, dtype=torch.long)}


class LegacyAttention(nn.Module):
    """transformers 4's DistilBERT attention: no head-size attribute, its forward reads ``n_heads`` and ``dim``."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.dim = HEADS, DIM
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, size = x.shape[0], self.dim // self.n_heads

        def shape(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, self.n_heads, size).transpose(1, 2)

        q, k, v = shape(self.q_lin(x)) / math.sqrt(size), shape(self.k_lin(x)), shape(self.v_lin(x))
        context = torch.softmax(q @ k.transpose(2, 3), dim=-1) @ v
        return self.out_lin(context.transpose(1, 2).reshape(b, -1, self.n_heads * size))


def legacy() -> nn.Module:
    """A 4.x-style attention block followed by a softmax over the last dimension (its ``dim`` is -1)."""
    torch.manual_seed(0)
    return nn.Sequential(LegacyAttention(), nn.Softmax(dim=-1)).eval()


def weaken_heads(attention: nn.Module, heads: tuple[int, ...]) -> None:
    """Make ``heads`` the weakest in every projection, so a heads target removes exactly those."""
    with torch.no_grad():
        for head in heads:
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for name in ("q_lin", "k_lin", "v_lin"):
                getattr(attention, name).weight[rows] *= 0.01
            attention.out_lin.weight[:, rows] *= 0.01


def halved(model: nn.Module, x) -> nn.Module:
    """``model`` with half the heads of every attention block pruned and compacted."""
    targets = Plan([Rule(Heads(sparsity=0.5), match="*q_lin")])
    resolved = targets.resolve_coupled(model, x) if isinstance(x, dict) else targets.resolve(model)
    hard_prune(model, resolved)
    return compact(model, x).model


@pytest.fixture
def saved_distilbert(tmp_path):
    small = halved(distilbert(), tokens(2, 5))
    COMPACT.save(small, tmp_path)
    return small, tmp_path


def rewritten(folder, edit) -> None:
    """``folder``'s manifest changed by ``edit``, its own checksum recomputed as the writer computes it."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest.pop("sha256")
    manifest["sha256"] = canonical_sha256(manifest)
    path.write_text(json.dumps(manifest))


def test_distilbert_dim_is_heads_times_head_size_on_every_block_after_a_reload(saved_distilbert):
    small, folder = saved_distilbert
    restored = load_compacted(folder, distilbert())
    blocks = [layer.attention for layer in restored.transformer.layer]
    assert all(b.n_heads == HEADS // 2 for b in blocks)
    assert all(b.dim == b.n_heads * b.attention_head_size == b.q_lin.out_features for b in blocks)
    x = tokens(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(restored(**x).last_hidden_state, small(**x).last_hidden_state, atol=1e-5, rtol=0)


def test_a_legacy_attention_reloads_with_the_same_outputs_and_the_softmax_keeps_its_dim(tmp_path):
    model = legacy()
    weaken_heads(model[0], (0, 2))
    small = halved(model, torch.randn(2, 5, DIM))
    assert (small[0].n_heads, small[0].dim) == (HEADS // 2, DIM // 2)
    COMPACT.save(small, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["width_attributes"] == {"0": {"dim": DIM // 2}}  # the block only, not the softmax "1"
    assert all("dim" not in values for values in manifest["attributes"].values())
    restored = load_compacted(tmp_path, legacy())
    assert (restored[0].n_heads, restored[0].dim) == (HEADS // 2, DIM // 2)
    assert restored[1].dim == -1
    y = torch.randn(3, 4, DIM)
    with torch.no_grad():
        torch.testing.assert_close(restored(y), small(y), atol=1e-6, rtol=0)


def test_a_manifest_written_before_width_attributes_still_loads(saved_distilbert):
    small, folder = saved_distilbert
    rewritten(folder, lambda m: m.pop("width_attributes"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: its checksums are intact
        restored = load_compacted(folder, distilbert())
    attention = restored.transformer.layer[0].attention
    assert (attention.n_heads, attention.dim) == (HEADS // 2, DIM)  # as before: the skeleton's dim
    x = tokens(2, 4)  # transformers 5 does not read dim: the outputs are still the compacted model's
    with torch.no_grad():
        torch.testing.assert_close(restored(**x).last_hidden_state, small(**x).last_hidden_state, atol=1e-5, rtol=0)


TAMPERS = {
    "a dim outside the attention blocks": (lambda m: m["width_attributes"].__setitem__("1", {"dim": 2}),
                                           "reads no attention block there"),
    "a width attribute the layout does not name": (
        lambda m: m["width_attributes"]["0"].__setitem__("n_heads", 2), "reads no attention block there"),
    "a negative dim": (lambda m: m["width_attributes"]["0"].__setitem__("dim", -1), "must be of type int"),
    "a dim that is not an int": (lambda m: m["width_attributes"]["0"].__setitem__("dim", "16"),
                                 "must be of type int"),
    "a block the skeleton lacks": (lambda m: m["width_attributes"].__setitem__("2", {"dim": 16}), "does not have"),
    "not a mapping": (lambda m: m.__setitem__("width_attributes", [16]), "must map attention block names"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_wrong_width_attribute_is_refused_in_one_line_before_anything_changes(tamper, tmp_path):
    model = legacy()
    weaken_heads(model[0], (0, 2))
    COMPACT.save(halved(model, torch.randn(2, 5, DIM)), tmp_path)
    edit, message = TAMPERS[tamper]
    rewritten(tmp_path, edit)
    skeleton = legacy()
    with pytest.raises(ManifestError, match=message) as err:
        load_compacted(tmp_path, skeleton)
    assert "\n" not in str(err.value)
    assert (skeleton[0].n_heads, skeleton[0].dim, skeleton[1].dim) == (HEADS, DIM, -1)


def test_layouts_of_the_reloaded_distilbert_read_the_halved_heads(saved_distilbert):
    _, folder = saved_distilbert
    layouts = attention_layouts(load_compacted(folder, distilbert()))
    assert len(layouts) == LAYERS
    read = {(lay.heads, lay.head_dim, lay.width_attrs) for lay in layouts.values()}
    assert read == {(HEADS // 2, HEAD_DIM, ("dim",))}
