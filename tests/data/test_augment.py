"""Batch augmentation: exact translations, flips, seeded reproducibility, config errors, exact resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from admmcompress.data.augment import Augment, random_translate
from admmcompress.data.datasets import BatchLoader, Split
from admmcompress.train.config import ConfigError, RunConfig


def _images(n=6, c=2, h=9, w=7, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _shift_reference(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = img[clamp(y - dy), clamp(x - dx)]: a shift with the border replicated."""
    h, w = img.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return img[:, rows][:, :, cols]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift=st.integers(1, 3))
def test_each_image_is_an_exact_shift_of_itself(seed, shift):
    x = _images()
    out = random_translate(x, shift, torch.Generator().manual_seed(seed))
    assert out.shape == x.shape
    for img, moved in zip(x, out, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-shift, shift + 1)
            for dx in range(-shift, shift + 1)
            if torch.equal(moved, _shift_reference(img, dy, dx))
        ]
        assert matches, "an output image is not a translation of its input"


def test_shifts_cover_every_offset_and_keep_labels_aligned():
    x = torch.zeros(400, 1, 5, 5)
    x[:, 0, 2, 2] = torch.arange(400, dtype=torch.float32) + 1  # one bright pixel, numbered per image
    out = random_translate(x, 1, torch.Generator().manual_seed(0))
    positions = set()
    for i in range(400):
        (ys, xs) = torch.nonzero(out[i, 0], as_tuple=True)
        assert out[i, 0, ys, xs].item() == i + 1  # image i stayed image i
        positions.add((ys.item(), xs.item()))
    assert positions == {(y, x) for y in (1, 2, 3) for x in (1, 2, 3)}


def test_hflip_mirrors_about_half_the_batch():
    x = _images(n=200)
    out = Augment(hflip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


def test_same_seed_same_batches_different_seed_different_batches():
    data = Split(_images(n=32, c=1, h=12, w=12), torch.arange(32))
    aug = Augment(shift=2, hflip=True)

    def epoch(seed):
        return [b for b in BatchLoader(data, 8, seed=seed, augment=aug)]

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))


def test_loader_state_resumes_the_augmentation_stream():
    data = Split(_images(n=32, c=1, h=12, w=12), torch.arange(32))
    loader = BatchLoader(data, 8, seed=0, augment=Augment(shift=2))
    list(loader)
    state = loader.state_dict()
    expected = list(loader)
    other = BatchLoader(data, 8, seed=5, augment=Augment(shift=2))
    other.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(expected, list(other), strict=True))


def test_inactive_augmentation_leaves_batches_untouched():
    data = Split(_images(n=16, c=1, h=8, w=8), torch.arange(16))
    plain = list(BatchLoader(data, 4, seed=0))
    noop = list(BatchLoader(data, 4, seed=0, augment=Augment()))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(plain, noop, strict=True))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"shift": -1}, r"augment.shift=-1: give a whole number of pixels >= 0"),
        ({"shift": 1.5}, r"augment.shift=1.5"),
        ({"hflip": "yes"}, r"augment.hflip='yes': give true or false"),
        ({"rotate": 10}, r"augment: unknown key\(s\) \['rotate'\]"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"model": {"name": "lenet5"}, "data": {"augment": spec}})


def test_config_builds_the_augmentation_and_round_trips():
    config = RunConfig.from_dict(
        {"model": {"name": "lenet5"}, "pretrain": {"epochs": 1}, "data": {"augment": {"shift": 2}}}
    )
    assert config.data.augment == Augment(shift=2, hflip=False)
    again = RunConfig.from_dict(config.to_dict())
    assert again.data.augment == config.data.augment


def test_shift_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match=r"shift=5 must be smaller than the image \(4x4\)"):
        random_translate(torch.zeros(1, 1, 4, 4), 5, torch.Generator())


def test_non_image_batches_are_refused():
    with pytest.raises(ValueError, match=r"needs image batches \(N, C, H, W\); got shape \(4, 10\)"):
        Augment(shift=1)(torch.zeros(4, 10), torch.Generator())
