"""Free Spoken Digit Dataset (``fsdd.npz``): 3,000 8 kHz recordings of the digits 0-9, as feature frames.

Every recording is cut or padded to one fixed length so a batch is one tensor: the middle
``frames`` frames are kept (recordings longer than ~1 s are rare: 99% are under 0.92 s) and shorter
ones are padded with silence *in front*, so the utterance always ends at the last frame, where a
GRU classifier reads its state. Features are 13 MFCCs with deltas and double deltas (39, as the
RTMobile TIMIT input) or 40 log-mel energies, normalised per coefficient with the train split's
mean and standard deviation. The split is the dataset's own: recordings 0-4 of every speaker and
digit are the 300 test recordings.

>>> train = load_fsdd("train")            # doctest: +SKIP
>>> train.x.shape, train.y.shape           # doctest: +SKIP
(torch.Size([2700, 64, 39]), torch.Size([2700]))
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from admmcompress.data.audio import log_mel, mfcc
from admmcompress.data.files import Split, check_arrays, find_dataset, read_npz, whole_number

FEATURES = ("mfcc39", "logmel40")
N_FFT, HOP = 256, 128  # 32 ms windows every 16 ms at 8 kHz


def fixed_length(audio: np.ndarray, offsets: np.ndarray, samples: int) -> np.ndarray:
    """``(recordings, samples)`` float array: the middle ``samples`` of each, left-padded with zeros."""
    out = np.zeros((len(offsets) - 1, samples), dtype=np.float32)
    for i in range(len(offsets) - 1):
        clip = audio[offsets[i] : offsets[i + 1]]
        if len(clip) > samples:
            start = (len(clip) - samples) // 2
            clip = clip[start : start + samples]
        out[i, samples - len(clip) :] = clip
    return out / 32768.0


def features(signal: np.ndarray, kind: str, sample_rate: int) -> np.ndarray:
    if kind == "mfcc39":
        return mfcc(signal, sample_rate, n_mfcc=13, with_deltas=True, n_fft=N_FFT, hop=HOP)
    if kind == "logmel40":
        return log_mel(signal, sample_rate, n_fft=N_FFT, hop=HOP, n_mels=40)
    raise ValueError(f"fsdd: features={kind!r}; choose one of {FEATURES}")


@functools.lru_cache(maxsize=2)  # train and test come from one pass over all 3,000 recordings
def _normalised_features(path: str, frames: int, feature: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = read_npz(path, ["audio", "offsets", "labels", "is_test", "sample_rate"], "fsdd")
    audio, offsets, labels, is_test = arrays["audio"], arrays["offsets"], arrays["labels"], arrays["is_test"]
    check_arrays(
        Path(path), "fsdd",
        audio.ndim == labels.ndim == is_test.ndim == 1 and len(offsets) == len(labels) + 1 == len(is_test) + 1
        and arrays["sample_rate"].size == 1 and is_test.dtype == bool and offsets.dtype.kind in "iu"
        and labels.dtype.kind in "iu",
        "audio samples with integer offsets, labels and is_test per recording and one sample_rate",
    )
    rate = int(arrays["sample_rate"])
    signal = fixed_length(audio, offsets, N_FFT + HOP * (frames - 1))
    feats = features(signal, feature, rate)
    train = feats[~is_test]
    mean, std = train.mean(axis=(0, 1), dtype=np.float64), train.std(axis=(0, 1), dtype=np.float64) + 1e-5
    return ((feats - mean) / std).astype(np.float32), labels, is_test


def load_fsdd(
    split: str = "train",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    frames: int = 64,
    feature: str = "mfcc39",
) -> Split:
    """``Split`` with ``x (N, frames, F)`` float32 features and digit labels ``y (N,)``.

    ``limit`` keeps the first N recordings in file order (sorted by speaker, then digit): a quick subset,
    not a balanced one.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if feature not in FEATURES:
        raise ValueError(f"fsdd: features={feature!r}; choose one of {FEATURES}")
    frames = whole_number(frames)  # np.int64(64) is 64
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"fsdd: frames={frames!r} must be a positive integer (64 frames = 1.04 s)")
    path = find_dataset("fsdd", data_dir)
    feats, labels, is_test = _normalised_features(str(path), frames, feature)
    chosen = is_test if split == "test" else ~is_test
    x = feats[chosen]
    y = labels[chosen]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)), path)


__all__ = ["FEATURES", "fixed_length", "load_fsdd"]
