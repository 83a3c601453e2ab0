"""One process per run folder: ``RUN/.lock`` names the holder (pid, host, process start time, when).

The lock file is created with ``O_CREAT | O_EXCL`` and its content written before it becomes visible
under its name (a temporary file hard-linked into place), so a reader never sees half a lock. A second
``slimray run`` with the same name fails at once, naming the holder. A lock whose holder is gone (its pid
no longer exists, or the pid now belongs to a process that started at another time) is taken over with a
one-line message. The lock is released when the holder exits (``release``, an ``atexit`` hook, and the
signal handlers in ``slimray.console``). Pure python: no ray import.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> list[str] | None:
    """The process's argv from ``/proc/<pid>/cmdline``, or None if it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    start_ticks: int | None
    started_at: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started_at}"

    def alive(self) -> bool:
        """True unless the holder is known gone: same host and (pid gone, or pid reused by a later process)."""
        if self.host != socket.gethostname():
            return True  # cannot tell from here: assume it lives (a shared folder seen by two hosts)
        now = proc_start_time(self.pid)
        if now is None:
            return False
        return self.start_ticks is None or now == self.start_ticks


def _me() -> Holder:
    return Holder(
        pid=os.getpid(), host=socket.gethostname(), start_ticks=proc_start_time(os.getpid()),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def read_holder(run_dir: str | Path) -> Holder | None:
    """The lock's holder, or None when there is no lock. An unreadable lock counts as a dead holder."""
    path = Path(run_dir) / LOCK_NAME
    try:
        data = json.loads(path.read_text())
        return Holder(pid=int(data["pid"]), host=str(data["host"]), start_ticks=data.get("start_ticks"),
                      started_at=str(data.get("started_at", "?")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(pid=-1, host=socket.gethostname(), start_ticks=None, started_at="?")


def live_holder(run_dir: str | Path) -> Holder | None:
    """The holder of the lock in ``run_dir`` if it is a live process other than this one, else None."""
    h = read_holder(run_dir)
    if h is None or (h.pid == os.getpid() and h.host == socket.gethostname()) or not h.alive():
        return None
    return h


class RunLock:
    """The lock on one run folder; ``acquire`` raises RunLockedError when a live process holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def _create(self, me: Holder) -> bool:
        tmp = self.run_dir / f".lock.tmp.{me.pid}"
        tmp.unlink(missing_ok=True)  # a leftover of an earlier process with this pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, json.dumps(asdict(me)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path)  # atomic, fails if the lock exists: the O_EXCL of a complete file
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self, *, log=print) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(3):
            if self._create(me):
                self.held = True
                atexit.register(self.release)
                _HELD.append(self)
                return self
            h = read_holder(self.run_dir)
            if h is None:
                continue  # released between our attempt and the read: try again
            if h.pid == me.pid and h.host == me.host:
                self.held = True
                return self
            if h.alive():
                raise RunLockedError(
                    f"{self.run_dir} is in use by another slimray process ({h.describe()}); "
                    "wait for it to finish, stop it, or choose another run name"
                )
            log(f"taking over the lock of {self.run_dir}: its holder ({h.describe()}) is gone")
            _take_over(self.path, h)
        raise RunLockedError(f"could not lock {self.run_dir}: the lock file keeps changing (another slimray starting?)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        h = read_holder(self.run_dir)
        if h is not None and h.pid == os.getpid() and h.host == socket.gethostname():
            self.path.unlink(missing_ok=True)
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _take_over(path: Path, stale: Holder) -> None:
    """Remove a dead holder's lock, unless it changed meanwhile (another process took it over first)."""
    aside = path.with_name(f".lock.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    try:
        data = json.loads(aside.read_text())
        same = int(data.get("pid", -2)) == stale.pid and data.get("start_ticks") == stale.start_ticks
    except (OSError, ValueError, TypeError):
        same = stale.pid == -1
    if not same:  # someone else's fresh lock: put it back (link fails only if yet another one appeared)
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


_HELD: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds (signal handlers call this before exiting)."""
    for lock in list(_HELD):
        lock.release()


def held_run_dirs() -> list[Path]:
    """The run folders this process holds locks on."""
    return [lock.run_dir for lock in _HELD]
