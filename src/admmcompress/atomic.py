"""Atomic file writes: a crash leaves the old file or the new one, never half of either.

The write goes to a temporary name in the same folder, is flushed to disk, then renamed over the
target (``os.replace`` is atomic on one file system). Checkpoints, reports and packed files use it.
A write that fails (disk full, read-only folder) raises :class:`WriteError` naming the file; the old
file is untouched. A process killed mid-write leaves its temporary file behind: :func:`clean_orphans`
removes those (and only those: names ``.<target>.<8 random characters>.tmp``).

Example::

    atomic_write("out/report.md", lambda tmp: tmp.write_text(text))
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# mkstemp's names: prefix, 8 characters from [a-z0-9_], suffix (see tempfile._RandomNameSequence).
TMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class WriteError(OSError):
    """An atomic write failed (disk full, no permission...); the message names the file, the old one is intact."""

    def __str__(self) -> str:  # the sentence only, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temp file to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as err:
        if isinstance(err, WriteError):
            raise
        raise _write_error(path, err) from err
    except Exception as err:  # torch.save (RuntimeError) and safetensors (SafetensorError) wrap the OSError
        cause = _io_error(err)
        if cause is None:
            raise
        raise _write_error(path, cause) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _io_error(err: BaseException) -> OSError | None:
    """The OSError behind a library's write failure, or None when the failure is not an I/O error.

    torch.save writing through a Python file chains it (``__context__``: its own message is only "unexpected
    pos"); safetensors (Rust) names it in its text: "I/O error: No space left on device (os error 28)".
    """
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    text = str(err)
    match = re.search(r"os error (\d+)\)", text)
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    if "No space left" in text or "file write failed" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _write_error(path: Path, err: OSError) -> WriteError:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space (or write elsewhere) and retry"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable (or write elsewhere) and retry"
    else:
        fix = "check the folder and retry"
    kept = f"; the previous '{path.name}' is intact" if path.exists() else ""
    return WriteError(err.errno or 0, f"cannot write '{path}': {reason}; {fix}{kept}")


def clean_orphans(folder: str | Path, below: Iterable[str] = ()) -> list[Path]:
    """Remove temporary files left by writes killed mid-way in ``folder`` and in its subfolders named in
    ``below`` (and theirs); return them.

    Only names this module makes are touched, and only where the caller writes: another run may live in a
    subfolder of ``folder`` under a lock of its own. Call it only while no other process writes these folders
    (a run holds the folder's lock, see ``admmcompress.train.lock``).
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    candidates = list(folder.glob("*.tmp"))
    for name in below:
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink():
            candidates += sub.rglob("*.tmp")
    for candidate in sorted(candidates):
        if candidate.is_file() and not candidate.is_symlink() and TMP_PATTERN.match(candidate.name):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["TMP_PATTERN", "WriteError", "atomic_write", "clean_orphans"]
