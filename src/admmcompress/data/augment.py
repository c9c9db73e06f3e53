"""Batch-wise image augmentation on in-memory tensors: random translation and horizontal flip.

Runs on whole mini-batches with the loader's own generator, so a seeded run sees the same
augmented batches again after ``--resume`` (the generator state is checkpointed with the loader).

Example::

    aug = Augment(shift=2)                 # MNIST: translate by up to 2 pixels each way
    x_aug = aug(x, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from admmcompress.data.files import whole_number


@dataclass(frozen=True)
class Augment:
    """Random translation by up to ``shift`` pixels per axis and, if ``hflip``, mirror half the images.

    Translation pads by replicating the border (the background for MNIST-like digits, a plain
    edge for natural images) and crops back to the original size at a random offset per image.
    """

    shift: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shift", whole_number(self.shift))  # np.int64(2) is 2
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"augment.shift={self.shift!r}: give a whole number of pixels >= 0 (e.g. 2)")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"augment.hflip={self.hflip!r}: give true or false")

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.hflip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"augmentation needs image batches (N, C, H, W); got shape {tuple(x.shape)}")
        if self.shift > 0:
            x = random_translate(x, self.shift, generator)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


def random_translate(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x`` by its own random (dy, dx) in [-shift, shift], same size out."""
    n, c, h, w = x.shape
    if shift >= min(h, w):
        raise ValueError(f"shift={shift} must be smaller than the image ({h}x{w})")
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = offsets[0].view(n, 1) + torch.arange(h).view(1, h)  # (n, h) source rows
    cols = offsets[1].view(n, 1) + torch.arange(w).view(1, w)  # (n, w) source columns
    batch = torch.arange(n).view(n, 1, 1, 1)
    channel = torch.arange(c).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
