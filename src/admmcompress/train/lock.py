"""The run-folder lock: one ``admmcompress run`` writes a folder at a time.

The lock is an OS-level ``flock`` on ``<folder>/.admmcompress.lock``, which holds the writer's pid so a
refused run can name it. The OS drops the lock when its process dies however it dies (kill -9 included),
so a stale lock file left by a killed run is simply locked again by the next run: no pid guessing, no
time-outs. The file is removed when the run ends; a run that opened it just before then notices the
file it locked is no longer the one at the path, and tries again.

Where ``fcntl`` is missing (Windows) or the file system refuses locks (some network mounts), the run goes
on unlocked after a one-line warning.

Example::

    with RunLock("runs/lenet5"):
        ...  # write the run's files
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from types import TracebackType

from admmcompress.atomic import WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".admmcompress.lock"


class RunLocked(ValueError):
    """Another process holds the folder's lock (a user error: one line naming its pid)."""


class RunLock:
    """Exclusive, non-blocking lock of a run folder (created if missing) for the life of a ``with`` block."""

    def __init__(self, folder: str | Path, elsewhere: str = "choose another --out", keep_stale: bool = False):
        """``elsewhere``: the advice to use another folder, in the caller's words (the CLI's flag by default).
        ``keep_stale``: a lock file found there (a killed run's, which ``run --resume`` reads as "a run started
        here") stays when this lock is released; only the lock is dropped (``report``, ``hardware``)."""
        self.folder = Path(folder)
        self.elsewhere = elsewhere
        self.path = self.folder / LOCK_FILE
        self.keep_stale = keep_stale
        self._fd: int | None = None
        self._found = False  # the lock file was there before acquire

    def acquire(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--out '{self.folder}' is a file, not a folder; choose a folder for the run's outputs")
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - not on POSIX
            _warn(f"no OS file locking on this system; make sure no other run writes '{self.folder}'")
            return self
        for tries in range(1, 11):
            self._found = self.path.exists()
            try:
                fd = take_flock(self.path)
                break
            except HeldElsewhere as held:
                raise RunLocked(
                    f"'{self.folder}' is being written by another admmcompress command ({held.who}); wait for it to "
                    f"end, or {self.elsewhere}"
                ) from None
            except FileNotFoundError:
                if tries == 10:
                    raise RunLocked(f"cannot open the lock file '{self.path}' (the folder keeps disappearing); "
                                    f"{self.elsewhere}") from None
                # a run that failed before writing anything removed its empty folder just now
                self.folder.mkdir(parents=True, exist_ok=True)
            except LockUnsupported as err:
                _warn(f"cannot lock '{self.path}' ({err}); make sure no other run writes '{self.folder}'")
                return self
            except OSError as err:
                raise RunLocked(
                    f"cannot open the lock file '{self.path}' ({err.strerror}); make the folder writable, or "
                    f"{self.elsewhere}"
                ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as err:  # a full disk: one line, and no lock file of ours left behind
            if not self._found:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            raise WriteError(err.errno, f"cannot write the lock file '{self.path}' ({err.strerror}); free some "
                                        f"space there, or {self.elsewhere}") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so a waiter retries on the new file); with
        ``keep_stale``, a file that was there before stays (emptied of this pid: its holder is gone)."""
        if self._fd is None:
            return
        try:
            if self.keep_stale and self._found:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            else:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


class HeldElsewhere(Exception):
    """Another process holds the file's flock; ``pid``: the one it wrote there, if any."""

    def __init__(self, pid: int | None):
        super().__init__(pid)
        self.pid = pid

    @property
    def who(self) -> str:
        """The holder as a refusal names it: ``pid N``, or ``another process`` when it wrote none."""
        return holder_text(self.pid)


class LockUnsupported(OSError):
    """The file system refuses flock (some network mounts): the caller goes on unlocked."""


def take_flock(path: Path) -> int:
    """Open ``path`` (made if missing) and take its exclusive flock without waiting; the open descriptor.

    Raises ``HeldElsewhere`` while another process holds it, ``LockUnsupported`` where the file system has no
    locks, and the ``OSError`` of an open that fails. A holder that removed the file between our open and our
    lock (it does so on release) leaves us the old file: we try again on the one at the path.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise HeldElsewhere(holder) from None
            raise LockUnsupported(err.errno, err.strerror) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def check_unlocked(
    folder: str | Path, consequence: str = "a real run would be refused: wait for it to end, or choose another --out"
) -> None:
    """Raise ``RunLocked`` if a live run holds ``folder``'s lock; writes nothing (what ``--dry-run`` needs).

    The lock file is opened read-only and probed with a non-blocking shared flock that is dropped at once, so
    a stale file left by a killed run passes, as it would for a real run.
    """
    if fcntl is None:  # pragma: no cover - not on POSIX
        return
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable: the real run reports that)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: conflicts with the run's, works read-only
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunLocked(
                f"'{folder}' is being written by another admmcompress command ({holder_text(_read_pid(fd))}); "
                f"{consequence}"
            ) from None
    finally:
        os.close(fd)  # closing drops the probe's flock


def holder_pid(folder: str | Path) -> int | None:
    """The pid written in ``folder``'s lock file, if any (it may be a dead run's: only the flock tells)."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder_text(pid: int | None) -> str:
    """A lock's holder as refusals name it: ``pid N``, or ``another process`` when its file holds no pid."""
    return f"pid {pid}" if pid else "another process"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _warn(message: str) -> None:
    print(f"admmcompress: warning: {message}", file=sys.stderr)


__all__ = [
    "LOCK_FILE", "HeldElsewhere", "LockUnsupported", "RunLock", "RunLocked", "check_unlocked", "holder_pid",
    "holder_text", "take_flock",
]
