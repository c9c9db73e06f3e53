"""Recurrent benchmark models: a GRU speech classifier (FSDD) and an LSTM word language model (PTB).

>>> model = GRUClassifier()
>>> model(torch.randn(2, 64, 39)).shape
torch.Size([2, 10])
>>> lm = LSTMLanguageModel(vocab_size=50, embed=16, hidden=16)
>>> log_probs, state = lm(torch.zeros(7, 3, dtype=torch.long))      # (steps, batch) token ids
>>> log_probs.shape, state[0].shape
(torch.Size([7, 3, 50]), torch.Size([2, 3, 16]))
"""

from __future__ import annotations

import torch
from torch import nn

from admmcompress.models.registry import register_model


class GRUClassifier(nn.Module):
    """Stacked GRU over feature frames ``(batch, frames, features)``; the last step's state -> logits.

    The shape of RTMobile's speech GRU (SPEC 8.1: 39 MFCC inputs, unidirectional GRU layers, dropout 0.2),
    scaled down for the 2,700-recording FSDD: 2 x 256 by default. The pruned weights are the
    ``gru.weight_ih_l{k}``/``weight_hh_l{k}`` gate matrices (plan rule ``{match: gru, ...}``).
    """

    def __init__(
        self,
        input_size: int = 39,
        hidden: int = 256,
        num_layers: int = 2,
        num_classes: int = 10,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.gru = nn.GRU(
            input_size, hidden, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(self.dropout(out[:, -1]))


class LSTMLanguageModel(nn.Module):
    """Embedding -> stacked LSTM -> decoder over the vocabulary (Zaremba et al.'s "small" shape by default).

    Input ``(steps, batch)`` token ids; ``forward`` returns log-probabilities ``(steps, batch, vocab)``
    and the final ``(h, c)`` state, which the caller carries (detached) across BPTT windows;
    ``nll(tokens, targets, state)`` returns the mean negative log-likelihood (perplexity = exp).
    With ``cutoffs`` the decoder is an adaptive softmax (``nn.AdaptiveLogSoftmaxWithLoss``): exact
    normalised probabilities at a fraction of the cost of a full 10,000-way softmax on CPU.
    """

    def __init__(
        self,
        vocab_size: int = 10000,
        embed: int = 200,
        hidden: int = 200,
        num_layers: int = 2,
        dropout: float = 0.2,
        cutoffs: list[int] | None = None,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if cutoffs:
            self.decoder: nn.Module = nn.AdaptiveLogSoftmaxWithLoss(
                hidden, vocab_size, list(cutoffs), div_value=4.0
            )
        else:
            self.decoder = nn.Linear(hidden, vocab_size)
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

    def features(
        self, tokens: torch.Tensor, state=None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.lstm(self.dropout(self.embedding(tokens)), state)
        return self.dropout(out), state

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        out, state = self.features(tokens, state)
        flat = out.reshape(-1, out.shape[-1])
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            scores = self.decoder.log_prob(flat)
        else:
            scores = torch.log_softmax(self.decoder(flat), dim=-1)
        return scores.view(*out.shape[:2], -1), state

    def nll(self, tokens: torch.Tensor, targets: torch.Tensor, state=None):
        """Mean negative log-likelihood of ``targets`` (same shape as ``tokens``) and the final state."""
        out, state = self.features(tokens, state)
        flat, goal = out.reshape(-1, out.shape[-1]), targets.reshape(-1)
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            return self.decoder(flat, goal).loss, state
        return nn.functional.cross_entropy(self.decoder(flat), goal), state


register_model("gru_fsdd", GRUClassifier)
register_model("lstm_ptb", LSTMLanguageModel)

__all__ = ["GRUClassifier", "LSTMLanguageModel"]
