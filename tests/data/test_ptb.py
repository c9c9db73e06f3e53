"""PTB loader: the textbook token and vocabulary counts; batching and BPTT windows."""

import pytest
import torch

from admmcompress.data.datasets import find_dataset
from admmcompress.data.ptb import batchify, bptt_windows, load_ptb, tokens


def test_tokens_end_lines_with_eos():
    assert tokens(" a b \n c \n") == ["a", "b", "<eos>", "c", "<eos>"]


def test_ptb_has_the_textbook_counts():
    try:
        find_dataset("ptb")
    except FileNotFoundError:
        pytest.skip("ptb.npz is not available here")
    corpus = load_ptb()
    assert len(corpus.vocab) == 10000 and "<unk>" in corpus.vocab
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929589, 73760, 82430)
    assert corpus.vocab[corpus.train[0]] == "aer"  # the first word of ptb.train.txt
    assert int(corpus.train.max()) == 9999


def test_batchify_and_windows_cover_the_stream_once():
    data = batchify(torch.arange(23), 4)  # 5 steps x 4 streams, 3 tokens dropped
    assert data.shape == (5, 4) and data[:, 1].tolist() == [5, 6, 7, 8, 9]
    windows = list(bptt_windows(data, 3))
    assert [x.shape[0] for x, _ in windows] == [3, 1]
    assert torch.equal(torch.cat([y for _, y in windows]), data[1:])
    with pytest.raises(ValueError, match="3 tokens are too few for 2 streams"):
        batchify(torch.arange(3), 2)
