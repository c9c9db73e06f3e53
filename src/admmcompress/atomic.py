"""Atomic file writes: a crash leaves the old file or the new one, never half of either.

The write goes to a temporary name in the same folder, is flushed to disk, then renamed over the
target (``os.replace`` is atomic on one file system). Checkpoints, reports and packed files use it.
A write that fails (disk full, read-only folder) raises :class:`WriteError` naming the file; the old
file is untouched. A process killed mid-write leaves its temporary file behind: :func:`clean_orphans`
removes those (and only those: names ``.<target>.<8 random characters>.tmp``, files or the private folders of
writers that make temp files of their own). :func:`atomic_folder` writes a new folder whole the same way (built in
a private folder beside it, then renamed into place).

Example::

    atomic_write("out/report.md", lambda tmp: tmp.write_text(text))
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
import string
from collections.abc import Callable, Iterable
from pathlib import Path

# Temporary names: a dot, the target's name, 8 characters from [a-z0-9_], ".tmp" (as mkstemp's were).
TMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_TMP_CHARACTERS = string.ascii_lowercase + string.digits + "_"
_TMP_TAIL = len(".12345678.tmp")  # what follows the target's name in a temporary name


def temp_target(name: str) -> str | None:
    """The name of the file a temporary file ``name`` was written for (``.model.bin.ab12cd34.tmp``: ``model.bin``);
    None for a name this module does not make.

    >>> temp_target(".model.bin.ab12cd34.tmp"), temp_target("model.bin")
    ('model.bin', None)
    """
    return name[1:-_TMP_TAIL] if TMP_PATTERN.match(name) else None


class WriteError(OSError):
    """An atomic write failed (disk full, no permission...); the message names the file, the old one is intact."""

    def __str__(self) -> str:  # the sentence only, without OSError's "[Errno N]" prefix
        return str(self.strerror)


def atomic_write(path: str | Path, write: Callable[[Path], None], *, private_folder: bool = False) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temp file to ``path``.

    ``private_folder``: the temp file lives in a folder of its own (``.<name>.<8 characters>.tmp/<name>``), for
    writers that make temp files of their own beside the name they are given (safetensors' ``save_file`` makes
    ``.tmpXXXXXX``): a kill then leaves them in that folder, which :func:`clean_orphans` removes whole.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp(path, private_folder)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        mode = stat.S_IMODE(tmp_path.stat().st_mode)  # 0666 less the umask (see _create_temp)
        write(tmp_path)
        # safetensors' save_file writes a new file over the name it is given (its own temp, mode 0600, renamed
        # into place): give it back the mode every other output has
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
            os.chmod(tmp_path, mode)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        _sync_folder(path.parent)  # the rename itself survives a power cut only once the folder is on disk
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
        if private_folder:
            shutil.rmtree(tmp_path.parent, ignore_errors=True)
        elif tmp_path.exists():
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


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else its nearest ancestor that does: where a missing folder would be created, so
    whether it can be is judged there (a file on the way, a read-only folder).

    >>> nearest_existing("/")
    PosixPath('/')
    """
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def clean_orphans(folder: str | Path, below: Iterable[str] = (), targets: Iterable[str] | None = None) -> list[Path]:
    """Remove temporary files left by writes killed mid-way in ``folder`` and in its subfolders named in
    ``below`` (and theirs); return them. ``targets``: only those of writes to these names (``.<name>.*.tmp``).

    Only names this module makes are touched, and only where the caller writes: another run may live in a
    subfolder of ``folder`` under a lock of its own. Call it only while no other process writes these folders
    (a run holds the folder's lock, see ``admmcompress.train.lock``), or with ``targets`` that no other process
    writes.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    names = None if targets is None else set(targets)
    candidates = list(folder.glob("*.tmp"))
    for name in below:
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink():
            candidates += sub.rglob("*.tmp")
    for candidate in sorted(candidates):
        target = temp_target(candidate.name)
        if candidate.is_symlink() or target is None or (names is not None and target not in names):
            continue
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
        elif candidate.is_dir() and all(f.is_file() and not f.is_symlink() for f in candidate.iterdir()):
            shutil.rmtree(candidate)  # a private_folder write's: its temp file and the writer's own
            removed.append(candidate)
    return removed


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a new folder whole: ``write(tmp_folder)`` fills a private folder ``.<name>.<8 characters>.tmp``
    beside ``path``, which is then renamed to ``path`` (missing, or an empty folder it replaces).

    A process killed before the rename leaves no ``path`` (or the empty one it had) and that private folder,
    which :func:`clean_orphans` removes; never a half-filled ``path``. A failing write raises :class:`WriteError`
    and leaves nothing behind. Write the files inside with :func:`atomic_write` (flushed to disk).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_folder = _create_temp(path, folder=True)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        write(tmp_folder)
        _sync_folder(tmp_folder)
        try:
            os.replace(tmp_folder, path)  # POSIX renames a folder over an empty one in one step
        except OSError:
            if not (path.is_dir() and not path.is_symlink() and not any(path.iterdir())):
                raise
            path.rmdir()  # where a folder cannot be renamed over another (Windows): the empty one goes first
            os.rename(tmp_folder, path)
        _sync_folder(path.parent)
    except WriteError as err:  # a file inside: named where it was going, not in the private folder
        raise WriteError(err.errno or 0, str(err).replace(str(tmp_folder), str(path))) from err
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp_folder.exists():
            shutil.rmtree(tmp_folder, ignore_errors=True)
    return path


def _create_temp(path: Path, private_folder: bool = False, folder: bool = False) -> Path:
    """A new empty file ``.<name>.<8 random characters>.tmp`` beside ``path`` (TMP_PATTERN's names), or with
    ``private_folder`` a new folder of that name holding an empty file ``<name>``.

    Created with mode 0666 less the umask, as a plain ``open()`` would (mkstemp's 0600 would need a chmod from
    the umask, and reading the umask means setting it: a race with other threads creating files). ``folder``: an
    empty folder of that name (0777 less the umask, as ``mkdir`` makes), for :func:`atomic_folder`.
    """
    for _ in range(100):
        name = "".join(secrets.choice(_TMP_CHARACTERS) for _ in range(8))
        candidate = path.parent / f".{path.name}.{name}.tmp"
        try:
            if folder:
                os.mkdir(candidate)
                return candidate
            if private_folder:
                os.mkdir(candidate)
                candidate = candidate / path.name
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside '{path}'")


def _sync_folder(folder: Path) -> None:
    """fsync a folder (its entries: a rename into it); a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)


__all__ = [
    "TMP_PATTERN", "WriteError", "atomic_folder", "atomic_write", "clean_orphans", "nearest_existing", "temp_target",
]
