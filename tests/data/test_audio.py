"""numpy speech features: framing, mel filters, DCT, deltas."""

import numpy as np
import pytest

from admmcompress.data.audio import (
    dct_matrix,
    deltas,
    frames,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    mfcc,
)


def test_frames_count_and_content():
    signal = np.arange(10)
    out = frames(signal, 4, 3)
    assert out.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="3 samples are fewer than one frame of 4; pad the signal"):
        frames(np.arange(3), 4, 1)


def test_mel_scale_round_trip_and_filters_cover_the_band():
    hz = np.array([0.0, 700.0, 4000.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(hz)), hz, atol=1e-9)
    assert hz_to_mel(700.0) == pytest.approx(2595 * np.log10(2))
    bank = mel_filterbank(40, 256, 8000)
    assert bank.shape == (40, 129) and bank.min() >= 0 and bank.max() <= 1
    assert (bank.argmax(1)[1:] >= bank.argmax(1)[:-1]).all()  # peaks rise with the filter index
    assert (bank.sum(0)[1:-1] > 0).all()  # every inner bin is covered by some filter


def test_dct_is_orthonormal():
    basis = dct_matrix(40, 40)
    np.testing.assert_allclose(basis @ basis.T, np.eye(40), atol=1e-12)


def test_deltas_of_a_ramp_are_its_slope_inside():
    ramp = np.arange(10, dtype=float)[:, None] * 2.0
    d = deltas(ramp)
    np.testing.assert_allclose(d[2:-2, 0], 2.0)


def test_tone_energy_lands_in_the_right_mel_band():
    rate = 8000
    tone = np.sin(2 * np.pi * 1000 * np.arange(rate) / rate)
    mels = log_mel(tone[None], rate)[0]
    centers = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(rate / 2), 42))[1:-1]
    assert abs(centers[mels.mean(0).argmax()] - 1000) < 120
    assert mfcc(tone[None], rate, with_deltas=True).shape == (1, mels.shape[0], 39)
