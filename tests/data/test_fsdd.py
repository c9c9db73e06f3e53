"""FSDD loader: official split, fixed-length frames, normalised features."""

import numpy as np
import pytest

from admmcompress.data import load_dataset
from admmcompress.data.datasets import find_dataset
from admmcompress.data.fsdd import features, fixed_length, load_fsdd


def test_fixed_length_keeps_the_middle_and_pads_in_front():
    audio = np.arange(1, 11, dtype=np.int16) * 100
    out = fixed_length(audio, np.array([0, 3, 10]), 5)
    np.testing.assert_allclose(out * 32768, [[0, 0, 100, 200, 300], [500, 600, 700, 800, 900]])


@pytest.fixture(scope="module")
def splits():
    try:
        find_dataset("fsdd")
    except FileNotFoundError:
        pytest.skip("fsdd.npz is not available here")
    return load_dataset("fsdd", "train"), load_fsdd("test")  # one feature pass serves both (cached)


def test_official_split_and_shapes(splits):
    train, test = splits
    assert train.x.shape == (2700, 64, 39) and test.x.shape == (300, 64, 39)
    assert train.y.bincount().tolist() == [270] * 10 and test.y.bincount().tolist() == [30] * 10
    mean, std = train.x.mean((0, 1)), train.x.std((0, 1))
    assert float(mean.abs().max()) < 1e-3 and float((std - 1).abs().max()) < 1e-2  # normalised on train


def test_log_mel_features_have_40_bands():
    signal = fixed_length(np.ones(3000, dtype=np.int16), np.array([0, 1000, 3000]), 256 + 128 * 31)
    assert features(signal, "logmel40", 8000).shape == (2, 32, 40)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match=r"features='wav'; choose one of \('mfcc39', 'logmel40'\)"):
        load_fsdd(feature="wav")
    with pytest.raises(ValueError, match=r"frames=0 must be a positive integer"):
        load_fsdd(frames=0)
