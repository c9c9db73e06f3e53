"""Where dataset files are found (no downloads), how they are read, and the labelled split every loader returns.

An explicit ``data_dir`` (argument or config key) is the only place looked at: a folder without the
dataset is an error naming it, never a silent fall-back to another copy. Without one, files are looked
for, in order:
1. the ``ADMMCOMPRESS_DATA`` environment variable;
2. the repository's own ``data/`` folder (MNIST is bundled there);
3. ``../shared/data`` next to the repository.
A missing file raises ``FileNotFoundError`` naming every place searched and how to fix it; a file that
cannot be read (truncated, random bytes, another dataset's arrays) raises :class:`DataFileError` naming it.
Every ``Split`` a loader returns carries the file it came from (``Split.source``).
"""

from __future__ import annotations

import operator
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from admmcompress.messages import first_line

REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_VAR = "ADMMCOMPRESS_DATA"

FILES = {"mnist": "mnist.npz", "fashion_mnist": "fashion_mnist.npz", "cifar10": "cifar10_jpeg.npz"}
FILES.update({"fsdd": "fsdd.npz", "ptb": "ptb.npz"})  # speech digits (data/fsdd.py), PTB text (data/ptb.py)


class DataFileError(ValueError):
    """A dataset file that cannot be read as its dataset; the message names the file and the fix."""


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The folders a dataset is looked for in: ``data_dir`` alone when given, else the default places."""
    if data_dir:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs += [REPO_ROOT / "data", REPO_ROOT.parent / "shared" / "data"]
    unique: list[Path] = []
    for d in dirs:  # the variable may name a default place: search (and list) it once
        if not any(_same_place(d, u) for u in unique):
            unique.append(d)
    return unique


def _same_place(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def find_dataset(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of a dataset file, or a FileNotFoundError that says where to put it."""
    if name not in FILES:
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(sorted(FILES))}")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):  # Path(5) would be a TypeError
        raise ValueError(f"data_dir must be a folder's path, not {type(data_dir).__name__}; give e.g. "
                         "data_dir='/data/mnist', or leave it out")
    if data_dir:
        return _in_data_dir(name, Path(data_dir))
    dirs = search_dirs()
    for d in dirs:
        if (d / FILES[name]).is_file():
            return d / FILES[name]
    searched = "\n  ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"dataset '{name}' ({FILES[name]}) not found; searched:\n  {searched}\n"
        f"Put {FILES[name]} in one of these folders, pass data_dir=..., or set {ENV_VAR}=/path/to/folder"
    )


def _in_data_dir(name: str, folder: Path) -> Path:
    """The dataset file in an explicitly given folder, or an error naming that folder (no fall-back)."""
    path = folder / FILES[name]
    if path.is_file():
        return path
    if folder.is_file():
        problem = "is a file, not a folder; give the folder that holds it"
    elif not folder.is_dir():
        problem = "does not exist"
    else:
        problem = f"has no {FILES[name]}"
    where = f"'{folder}'" if folder.is_absolute() else f"'{folder}' ({folder.resolve()})"
    raise FileNotFoundError(
        f"dataset '{name}': data_dir {where} {problem}; put {FILES[name]} there, "
        f"or remove data_dir to search the default places ({', '.join(str(d) for d in search_dirs())})"
    )


def read_npz(path: str | Path, keys: Sequence[str], name: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of dataset ``name``'s ``.npz`` file, read in full (no pickles).

    Raises :class:`DataFileError` naming the file when it is not a readable ``.npz`` archive (truncated,
    random bytes, a plain ``.npy``), lacks one of the arrays, or an array is damaged.
    """
    path = Path(path)
    fix = f"replace it with a good copy of {FILES.get(name, path.name)}"
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as err:
        raise DataFileError(
            f"dataset file '{path}' cannot be read ({_reason(err)}): it is truncated, damaged or not a .npz "
            f"archive; {fix}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataFileError(f"dataset file '{path}' holds a single array, not the .npz archive of '{name}'; {fix}")
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise DataFileError(
                f"dataset file '{path}' lacks the array(s) {missing} of '{name}' (it has {archive.files}); {fix}"
            )
        try:
            for k in keys:
                _check_member_size(archive, k)
            return {k: archive[k] for k in keys}
        except _READ_ERRORS as err:
            raise DataFileError(f"dataset file '{path}' is damaged ({_reason(err)}); {fix}") from None


def _check_member_size(archive: np.lib.npyio.NpzFile, key: str) -> None:
    """A damaged ``.npy`` header can claim any shape: compare the bytes it claims with the member's size before
    numpy allocates them (730 GiB for one flipped byte)."""
    member = archive.zip.getinfo(f"{key}.npy")
    with archive.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names) is checked by numpy's read alone
            return
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # numpy's own header parser
        header = f.tell()
    claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if claimed != member.file_size - header:
        raise ValueError(f"array '{key}' claims shape {shape} of {dtype} ({claimed:,} bytes) but holds "
                         f"{member.file_size - header:,} bytes")


# What numpy/zipfile raise on a damaged archive: a bad zip, CRC or deflate stream, a short read, a bad
# .npy header, an object array (allow_pickle=False), a member listed but unreadable, a compression method
# zipfile lacks (NotImplementedError), an encrypted member (RuntimeError), a header claiming too much memory.
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError, MemoryError)


def _reason(err: BaseException) -> str:
    return first_line(err, 120)


def check_arrays(path: Path, name: str, condition: bool, what: str) -> None:
    """Raise :class:`DataFileError` naming the file unless ``condition`` (its arrays look like ``what``)."""
    if not condition:
        raise DataFileError(
            f"dataset file '{path}' does not hold {what} as '{name}' needs; replace it with a good copy of "
            f"{FILES.get(name, path.name)}"
        )


def whole_number(value: Any) -> Any:
    """A numpy or 0-d torch integer as a Python ``int``; anything else (booleans too) unchanged."""
    if isinstance(value, (bool, int)) or str(getattr(value, "dtype", "bool")) in ("bool", "torch.bool"):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


@dataclass
class Split:
    """Normalised inputs (N, C, H, W float32) and integer labels; ``source``: the file they were read from."""

    x: torch.Tensor
    y: torch.Tensor
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n], self.source)

    def hold_out(self, n: int, seed: int = 0) -> tuple[Split, Split]:
        """``(rest, held)``: ``n`` samples drawn at random (seeded, whatever the run's seed, so every recipe is
        chosen on the same validation set) and the others, both in their original order.

        >>> split = Split(torch.arange(10.0).view(10, 1), torch.arange(10))
        >>> rest, held = split.hold_out(3)
        >>> len(rest), len(held), sorted(rest.y.tolist() + held.y.tolist()) == list(range(10))
        (7, 3, True)
        """
        if not 0 < n < len(self):
            raise ValueError(
                f"validation={n}: hold out between 1 and {len(self) - 1} of the {len(self)} training samples"
            )
        held = torch.zeros(len(self), dtype=torch.bool)
        held[torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]] = True
        return Split(self.x[~held], self.y[~held], self.source), Split(self.x[held], self.y[held], self.source)
