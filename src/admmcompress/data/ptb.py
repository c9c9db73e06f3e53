"""Penn Treebank (Mikolov's word-level LM text, ``ptb.npz``): token ids, batching and BPTT windows.

Words are split on whitespace and every line ends with ``<eos>``; the vocabulary is the 10,000
words of the train text (``<unk>`` included), numbered by decreasing frequency (ties: alphabetical).
Train/valid/test have 929,589 / 73,760 / 82,430 tokens.

>>> corpus = load_ptb()                                   # doctest: +SKIP
>>> len(corpus.vocab), corpus.train.numel()               # doctest: +SKIP
(10000, 929589)
>>> data = batchify(torch.arange(10), 2)                  # two streams, one per column
>>> data.T.tolist()
[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
>>> [(x.T.tolist(), y.T.tolist()) for x, y in bptt_windows(data, 3)][0]
([[0, 1, 2], [5, 6, 7]], [[1, 2, 3], [6, 7, 8]])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from admmcompress.data.files import DataFileError, find_dataset, read_npz

EOS = "<eos>"


@dataclass
class Corpus:
    """Token ids (int64, 1-D) of the three splits and the vocabulary (id -> word)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]


def tokens(text: str) -> list[str]:
    """Whitespace-split words with ``<eos>`` at the end of every line."""
    return [word for line in text.splitlines() for word in (*line.split(), EOS)]


def load_ptb(data_dir: str | Path | None = None) -> Corpus:
    """Read ``ptb.npz`` (raw text bytes of the three files) into token ids."""
    path = find_dataset("ptb", data_dir)
    arrays = read_npz(path, ["train", "valid", "test"], "ptb")
    try:
        texts = {split: array.tobytes().decode() for split, array in arrays.items()}
    except UnicodeDecodeError as err:
        raise DataFileError(f"dataset file '{path}' holds text that is not UTF-8 ({err}); "
                            "replace it with a good copy of ptb.npz") from None
    words = {split: tokens(text) for split, text in texts.items()}
    counts = Counter(words["train"])
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    unknown = index.get("<unk>")
    ids = {}
    for split, seq in words.items():
        missing = [w for w in seq if w not in index]
        if missing and unknown is None:
            raise ValueError(f"ptb: {split} has words outside the train vocabulary, e.g. {missing[:3]}")
        ids[split] = torch.tensor([index.get(w, unknown) for w in seq], dtype=torch.int64)
    return Corpus(ids["train"], ids["valid"], ids["test"], vocab)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(steps, batch_size)``: the token stream cut into ``batch_size`` contiguous streams (tail dropped)."""
    if batch_size < 1:
        raise ValueError(f"batchify: batch_size={batch_size} must be >= 1")
    steps = ids.numel() // batch_size
    if steps < 2:
        raise ValueError(f"batchify: {ids.numel()} tokens are too few for {batch_size} streams")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_windows(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, targets)`` windows of ``bptt`` steps over ``batchify`` output; targets shifted by one."""
    for start in range(0, data.shape[0] - 1, bptt):
        length = min(bptt, data.shape[0] - 1 - start)
        yield data[start : start + length], data[start + 1 : start + 1 + length]


__all__ = ["EOS", "Corpus", "batchify", "bptt_windows", "load_ptb", "tokens"]
