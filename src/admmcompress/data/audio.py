"""Speech features in numpy (FFT by torch): framing, log-mel filterbank energies and MFCCs with deltas.

The recipe follows the usual Kaldi/HTK shape (Hann window, power spectrum, triangular mel
filters on the HTK mel scale, log, DCT-II), written out so no audio library is needed.

>>> import numpy as np
>>> signal = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
>>> log_mel(signal[None], sample_rate=8000).shape        # (batch, frames, mels)
(1, 61, 40)
>>> mfcc(signal[None], sample_rate=8000, with_deltas=True).shape
(1, 61, 39)
"""

from __future__ import annotations

import numpy as np
import torch


def frames(signal: np.ndarray, frame_length: int, hop: int) -> np.ndarray:
    """``(..., samples) -> (..., n_frames, length)``, ``n_frames = 1 + (samples - length) // hop``."""
    samples = signal.shape[-1]
    if samples < frame_length:
        raise ValueError(
            f"frames: {samples} samples are fewer than one frame of {frame_length}; pad the signal"
        )
    return np.lib.stride_tricks.sliding_window_view(signal, frame_length, axis=-1)[..., ::hop, :]  # a view


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """Triangular filters ``(n_mels, n_fft // 2 + 1)`` with peaks evenly spaced on the mel scale."""
    f_max = sample_rate / 2 if f_max is None else f_max
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (center - lower)
    falling = (upper - bins[None]) / (upper - center)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(
    signal: np.ndarray,
    sample_rate: int,
    n_fft: int = 256,
    hop: int = 128,
    n_mels: int = 40,
    floor: float = 1e-10,
) -> np.ndarray:
    """Log mel energies ``(..., frames, n_mels)`` of ``signal (..., samples)`` (Hann window, power)."""
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    framed = frames(np.asarray(signal, dtype=np.float32), n_fft, hop) * window
    # torch's FFT (MKL/pocketfft, vectorised) is ~6x faster than numpy's on the 192k frames of FSDD.
    spectrum = torch.fft.rfft(torch.from_numpy(np.ascontiguousarray(framed)), n=n_fft, dim=-1)
    power = (spectrum.real**2 + spectrum.imag**2).numpy()
    bank = mel_filterbank(n_mels, n_fft, sample_rate).T.astype(power.dtype)
    return np.log(np.maximum(power @ bank, floor))


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II rows ``(n_out, n_in)``, as ``scipy.fft.dct(..., norm='ortho')``."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    basis[0] /= np.sqrt(2.0)
    return basis


def deltas(features: np.ndarray, width: int = 2) -> np.ndarray:
    """Deltas over frames (axis -2): ``sum_n n (c[t+n] - c[t-n]) / (2 sum_n n^2)``, edges repeated."""
    pad = [(0, 0)] * features.ndim
    pad[-2] = (width, width)
    padded = np.pad(features, pad, mode="edge")
    count = features.shape[-2]
    num = sum(
        n * (padded[..., width + n : width + n + count, :] - padded[..., width - n : width - n + count, :])
        for n in range(1, width + 1)
    )
    return num / (2 * sum(n * n for n in range(1, width + 1)))


def mfcc(
    signal: np.ndarray, sample_rate: int, n_mfcc: int = 13, with_deltas: bool = False, **kwargs
) -> np.ndarray:
    """MFCCs ``(..., frames, n_mfcc)``, or ``3 * n_mfcc`` with first and second deltas (39-dim as TIMIT)."""
    mels = log_mel(signal, sample_rate, **kwargs)
    coeffs = mels @ dct_matrix(mels.shape[-1], n_mfcc).T
    if not with_deltas:
        return coeffs
    first = deltas(coeffs)
    return np.concatenate([coeffs, first, deltas(first)], axis=-1)


__all__ = ["dct_matrix", "deltas", "frames", "hz_to_mel", "log_mel", "mel_filterbank", "mel_to_hz", "mfcc"]
