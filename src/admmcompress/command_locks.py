"""Locks and leftovers of the commands that write files (run, report, export, hardware, report --compare).

A kill cuts a write short and leaves its temporary file (``atomic.TMP_PATTERN``); the next command removes
those of the files it writes. Two commands writing the same files at once must not clean away each other's
temporary files, so each holds a lock while it cleans and writes: a run folder's ``RunLock`` (``report``,
``hardware``; a run holds it too), or an OS ``flock`` on a ``.<name>.admmcompress.lock`` file beside an export's
``--out`` (``hold_target``). A second command is refused with one line naming the first's pid, never made to wait
(a run holds its folder for hours). The OS drops a flock however its holder ends, so a killed command's lock
file blocks nothing.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     with hold_target(Path(folder) / "model.onnx", "wait for it to end"):
...         try:
...             with hold_target(Path(folder) / "model.onnx", "wait for it to end"):
...                 pass
...         except RunLocked as err:
...             print(str(err).split("(")[0].endswith("another admmcompress command "))
True
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from admmcompress.atomic import clean_orphans, nearest_existing
from admmcompress.train.lock import HeldElsewhere, RunLock, RunLocked, check_unlocked, take_flock

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

# beside an export's --out while it is written (``.<name>.admmcompress.lock``); not TMP_PATTERN's, so never cleaned
TARGET_LOCK_SUFFIX = ".admmcompress.lock"


def clean_leftovers(folder: str | Path, targets: Iterable[str] | None = None, below: Iterable[str] = ()) -> list[Path]:
    """``atomic.clean_orphans(folder, below, targets)`` for a command: the temporary files of writes a kill cut
    short (only TMP_PATTERN's names; only those of writes to ``targets`` when given). A folder that cannot be
    cleaned (read-only, gone) is left as it is: the write that follows says what is wrong. Call it holding the
    lock of what is cleaned (:class:`RunLock` of a run folder, :func:`hold_target` of an export's ``--out``)."""
    try:
        return clean_orphans(folder, below, targets)
    except OSError:
        return []


def say_removed(removed: Sequence[Path], where: str | Path) -> None:
    """Tell the user, in one stderr line, that the temporary files a killed earlier command left in (or beside)
    ``where`` were removed; nothing when there were none."""
    if removed:
        print(f"admmcompress: removed {len(removed)} unfinished temporary file(s) of a killed write to '{where}'",
              file=sys.stderr)


@contextlib.contextmanager
def hold_run_folder(folder: str | Path, consequence: str, elsewhere: str) -> Iterator[bool]:
    """Hold ``folder``'s run lock (:class:`RunLock`) for the ``with`` block, for a command that cleans and writes
    files there (``report``, ``hardware``); yields whether it is held.

    Another command holding it (a run, a report) is refused with ``check_unlocked``'s line ending in
    ``consequence``: never waited for, since a run holds it for hours. A missing folder is not created (the
    command names it), and a read-only one is only probed: nothing can be written or cleaned there. ``elsewhere``
    ends the line of a lock file that cannot be opened (RunLock's).
    """
    folder = Path(folder)
    if not folder.is_dir():
        yield False
        return
    if not os.access(folder, os.W_OK | os.X_OK):
        check_unlocked(folder, consequence)
        yield False
        return
    lock = _take_run_lock(folder, consequence, elsewhere)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.release()


def _take_run_lock(folder: Path, consequence: str, elsewhere: str) -> RunLock | None:
    """``RunLock(folder)`` taken, or the refusal naming the holder and ``consequence``; None where no lock can be
    taken although no command holds it (a lock file that cannot be opened or written: another user's, a full
    disk), so the command goes on as in a read-only folder and its own writes say what is wrong."""
    for _ in range(3):
        try:  # a killed run's lock file stays: run --resume reads it as "a run started here"
            return RunLock(folder, elsewhere, keep_stale=True).acquire()
        except (RunLocked, OSError):
            check_unlocked(folder, consequence)  # held by a live command: the line with our consequence
            # else its holder ended between the two, or the file cannot be locked: try again
    return None


@contextlib.contextmanager
def hold_target(out: str | Path, advice: str) -> Iterator[None]:
    """Hold the lock of writes to ``out`` for the ``with`` block: an OS ``flock`` on ``.<name>.admmcompress.lock``
    beside it, so that two commands writing ``out`` at once (two exports to one ``--out``) never clean away or
    replace each other's files: the second is refused with one line naming the first's pid, then ``advice``.

    Other names in the folder are not locked (exports side by side into one folder run at once). The OS drops the
    lock however its holder ends, so the file a killed command leaves blocks nothing; the next one takes it over
    and removes it. A missing folder is made for the lock (and removed again if the block leaves it empty); one
    that cannot be made or written (nothing to clean there; the command says what is wrong with ``out``), or a
    system without ``flock``, is not locked.
    """
    path = Path(out)
    made = _make_folder(path.parent)
    lock = path.parent / f".{path.name}{TARGET_LOCK_SUFFIX}"
    writable = path.parent.is_dir() and os.access(path.parent, os.W_OK | os.X_OK)
    named = path.name not in ("", ".", "..")  # check_export_out refuses these: no file of that name is written
    try:
        fd = _lock_target(lock, out, advice) if fcntl is not None and named and writable else None
        try:
            yield
        finally:
            if fd is not None:
                lock.unlink(missing_ok=True)  # before the lock drops: one waiting on this file sees it gone, retries
                os.close(fd)
    finally:
        for folder in made:  # deepest first; one another command writes into now is not empty, so stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents (where possible); the ones made, deepest first.

    The lock must exist before the first command makes the folder for its write: a second one would otherwise
    find the folder, lock it, and clean the first one's temporary file.
    """
    existing = nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return []  # a file on the way, a read-only parent: check_export_out names it, as it judges it here
    missing = []
    while folder != existing:
        missing.append(folder)
        folder = folder.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another command made it just now: not ours to remove
            continue
        except OSError:  # the write that follows names what is wrong
            break
        made.insert(0, path)
    return made


def _lock_target(lock: Path, out: str | Path, advice: str) -> int | None:
    """The open, flocked descriptor of ``lock`` holding this pid; None where it cannot be had though no command
    holds it (a folder by that name, a file system without locks, a full disk): the command goes on unlocked."""
    try:
        fd = take_flock(lock)
    except HeldElsewhere as held:
        raise RunLocked(f"'{out}' is being written by another admmcompress command ({held.who}); {advice}") from None
    except OSError:
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # so that a refused command can name its holder
    except OSError:  # a full disk: go on unlocked, leaving no file; the export's write names the problem
        lock.unlink(missing_ok=True)
        os.close(fd)
        return None
    return fd


def clean_stale_target_locks(folder: str | Path) -> list[Path]:
    """Remove the ``.<name>.admmcompress.lock`` files in ``folder`` that no live command holds (a killed export's:
    the OS dropped its lock); the ones removed. A file another command holds stays, as does any other file.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = (Path(folder) / ".m.onnx.admmcompress.lock").write_text("12345")
    ...     [p.name for p in clean_stale_target_locks(folder)], list(Path(folder).iterdir())
    (['.m.onnx.admmcompress.lock'], [])
    """
    removed = []
    if fcntl is None:  # pragma: no cover - not on POSIX
        return removed
    for path in sorted(Path(folder).glob(f".*{TARGET_LOCK_SUFFIX}")):
        try:
            fd = take_flock(path)
        except (HeldElsewhere, OSError):  # held: a live command's (or a file that cannot be locked: left alone)
            continue
        try:
            path.unlink()  # before the lock drops, as hold_target's own release
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


__all__ = [
    "TARGET_LOCK_SUFFIX", "clean_leftovers", "clean_stale_target_locks", "hold_run_folder", "hold_target",
    "say_removed",
]
