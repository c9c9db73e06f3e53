"""``count_macs`` on recurrent layers and cells, ``nn.MultiheadAttention`` and the attention products of the blocks
``attention_layouts`` reads; every expected figure is worked out by hand here from the layer sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from admmcompress.executors.compact import compact
from admmcompress.executors.compact_run import count_macs
from admmcompress.finalize import hard_prune
from admmcompress.plan import Plan, Rule
from admmcompress.structures import Heads

IN, HIDDEN, STEPS = 4, 8, 5
GATES = {nn.RNN: 1, nn.GRU: 3, nn.LSTM: 4, nn.RNNCell: 1, nn.GRUCell: 3, nn.LSTMCell: 4}


class BatchFirst(nn.Module):
    """Feeds a batch-first example (what ``count_macs`` cuts to one sample) to a recurrent layer of either layout."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))[0]


class Packed(BatchFirst):
    """The first ``length`` steps of each sequence, packed."""

    def __init__(self, rnn: nn.RNNBase, length: int) -> None:
        super().__init__(rnn)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((x.shape[0],), self.length)
        return self.rnn(pack_padded_sequence(x, lengths, batch_first=True))[0].data


class Unrolled(nn.Module):
    """A cell run over every step of a batch-first sequence."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state


def sequence(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, STEPS, IN)


@pytest.mark.parametrize("kind", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers_count_every_layer_and_direction_per_step(kind, layers, bidirectional, batch_first):
    rnn = kind(IN, HIDDEN, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    d, g = 2 if bidirectional else 1, GATES[kind]
    first = g * HIDDEN * (IN + HIDDEN)  # one direction of layer 0: gates x hidden x (input + hidden)
    later = g * HIDDEN * (d * HIDDEN + HIDDEN)  # deeper layers read both directions' outputs
    expected = STEPS * d * (first + (layers - 1) * later)
    assert count_macs(BatchFirst(rnn), sequence()) == expected


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_lstm_with_a_projection_reads_proj_size_and_adds_the_projection(batch_first):
    proj = 3
    lstm = nn.LSTM(IN, HIDDEN, num_layers=2, bidirectional=True, proj_size=proj, batch_first=batch_first)
    layer0 = 4 * HIDDEN * (IN + proj) + HIDDEN * proj
    layer1 = 4 * HIDDEN * (2 * proj + proj) + HIDDEN * proj
    assert count_macs(BatchFirst(lstm), sequence()) == STEPS * 2 * (layer0 + layer1)


def test_a_packed_sequence_counts_its_real_length_not_the_padding():
    gru = nn.GRU(IN, HIDDEN, batch_first=True)
    assert count_macs(Packed(gru, length=3), sequence()) == 3 * 3 * HIDDEN * (IN + HIDDEN)


@pytest.mark.parametrize("kind", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_cells_count_one_step_per_call(kind):
    expected = STEPS * GATES[kind] * HIDDEN * (IN + HIDDEN)
    assert count_macs(Unrolled(kind(IN, HIDDEN)), sequence()) == expected


class CrossAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.mha(query, memory, value=memory, need_weights=False)[0]


def test_multihead_attention_counts_projections_products_and_out_proj_once():
    width, q_len, k_len, kdim = 8, 5, 7, 6
    mha = nn.MultiheadAttention(width, num_heads=2, kdim=kdim, vdim=kdim, batch_first=True)
    example = (torch.randn(2, q_len, width), torch.randn(2, k_len, kdim))
    projections = q_len * width * width + 2 * k_len * kdim * width  # query; key and value
    products = 2 * width * q_len * k_len  # Q K^T and A V over all heads
    out = q_len * width * width
    assert count_macs(CrossAttention(mha), example, attention_products=True) == projections + products + out
    assert count_macs(CrossAttention(mha), example) == projections + out  # weights only by default


def test_multihead_attention_sequence_first_self_attention():
    width, length = 8, 5

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(width, num_heads=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.transpose(0, 1)
            return self.mha(x, x, x)[0]

    weights, products = 4 * length * width * width, 2 * width * length * length  # q, k, v, out; Q K^T and A V
    example = torch.randn(2, length, width)
    assert count_macs(SelfAttention(), example, attention_products=True) == weights + products
    assert count_macs(SelfAttention(), example) == weights


class FusedAttention(nn.Module):
    """GPT-2's layout: query, key and value rows stacked in one ``c_attn`` Linear, ``c_proj`` reads the heads."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = heads, width // heads, width
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, self.num_heads, -1).transpose(1, 2) for y in self.c_attn(x).split(self.split_size, 2))
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


def test_a_fused_query_key_value_projection_counts_its_products_once():
    width, length = 12, 5
    linear = length * width * 3 * width + length * width * width
    products = 2 * width * length * length
    model, example = nn.Sequential(FusedAttention(width)), torch.randn(2, length, width)
    assert count_macs(model, example, attention_products=True) == linear + products
    assert count_macs(model, example) == linear


transformers = pytest.importorskip("transformers")
WIDTH, HEADS, HEAD_DIM, FFN, TOKENS = 32, 4, 8, 64, 6
QUERY = "encoder.layer.0.attention.self.query"


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=1,
                                     num_attention_heads=HEADS, intermediate_size=FFN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertModel(config).eval()


def bert_macs(heads: int, products: bool = True) -> int:
    """One layer with ``heads`` heads of HEAD_DIM on TOKENS tokens, and the pooler on the first token."""
    kept = heads * HEAD_DIM
    qkv = 3 * TOKENS * WIDTH * kept
    out = TOKENS * kept * WIDTH
    ffn = TOKENS * WIDTH * FFN + TOKENS * FFN * WIDTH
    pooler = WIDTH * WIDTH
    attention = 2 * heads * HEAD_DIM * TOKENS * TOKENS if products else 0
    return qkv + out + ffn + pooler + attention


def tokens(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 50, (batch, TOKENS), generator=torch.Generator().manual_seed(0))}


def test_bert_counts_its_linear_layers_and_the_attention_products():
    assert count_macs(bert(), tokens(), attention_products=True) == bert_macs(HEADS)
    assert count_macs(bert(), tokens()) == bert_macs(HEADS, products=False)  # the weight MACs budgets count


def test_a_bert_with_two_of_four_heads_compacted_away_counts_their_products_gone():
    model = bert()
    hard_prune(model, Plan([Rule(Heads(sparsity=0.5), match=QUERY)]).resolve(model))
    before = count_macs(model, tokens(), attention_products=True)
    small = compact(model, tokens()).model
    assert small.encoder.layer[0].attention.self.num_attention_heads == HEADS // 2
    assert (before, count_macs(small, tokens(), attention_products=True)) == (bert_macs(HEADS), bert_macs(HEADS // 2))
    products_saved = 2 * (HEADS // 2) * HEAD_DIM * TOKENS * TOKENS
    linear_saved = 4 * TOKENS * WIDTH * (HEADS // 2) * HEAD_DIM
    assert before - count_macs(small, tokens(), attention_products=True) == products_saved + linear_saved
