"""One runner per board: an exclusive `flock` on `work_dir/runner.lock` while a runner times.

The lock file holds its holder as JSON (`host`, `pid`, `started`, `job`, `out`), rewritten by each
new holder. The lock itself is the kernel's: it dies with its process, so a crashed or killed
runner never blocks the board, and a stale holder record is told apart by trying the lock
(`lock_status`). A second runner waits (and says for whom) or, with `wait=False`, stops at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable, Dict, Optional

from .errors import RunnerError

LOCK_FILE = "runner.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - boards and hosts are POSIX; Windows hosts only use SSH
    fcntl = None  # type: ignore[assignment]


def _open(path: str, create: bool) -> Optional[int]:
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunnerError(f"{path}: cannot open the board lock ({e.strerror or e})") from None


def _read_holder(fd: int) -> Optional[Dict[str, Any]]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError, RecursionError):  # ValueError: bad UTF-8, bad JSON, huge ints
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: Optional[Dict[str, Any]]) -> str:
    """One line naming a holder: runner pid, host, job and since when."""
    if not holder:
        return "another runner (no holder record)"
    since = holder.get("started")
    age = f", for {time.time() - since:.0f} s" if isinstance(since, (int, float)) else ""
    return (f"runner pid {holder.get('pid', '?')} started by host {holder.get('host', '?')} "
            f"(job {holder.get('job', '?')}{age})")


class BoardLock:
    """`with BoardLock(path, job=..., out=...).acquire(wait=True, on_wait=print):` hold the board."""

    def __init__(self, path: str, job: str = "", out: str = "", host: str = "") -> None:
        self.path = path
        self.holder = {"host": host or socket.gethostname(), "pid": os.getpid(), "started": None,
                       "job": job, "out": out}
        self._fd: Optional[int] = None

    def acquire(self, wait: bool = True, on_wait: Optional[Callable[[str], None]] = None,
                poll_s: float = 0.5, say_every_s: float = 30.0) -> "BoardLock":
        if fcntl is None:
            raise RunnerError("board locks need fcntl (a POSIX system)")
        fd = _open(self.path, create=True)
        assert fd is not None
        said = -1e9
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(fd)
                if not wait:
                    os.close(fd)
                    raise RunnerError(f"the board is busy: {describe(holder)} holds {self.path}; "
                                      "wait for it, or stop it") from None
                if on_wait is not None and time.monotonic() - said >= say_every_s:
                    on_wait(f"board busy: waiting for {describe(holder)}")
                    said = time.monotonic()
                time.sleep(poll_s)
        self.holder["started"] = time.time()
        data = json.dumps(self.holder).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale record for the next reader
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "BoardLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_status(path: str) -> Dict[str, Any]:
    """{"held": bool, "holder": {...} | None}: whether a live runner holds the board now. The
    record of a dead holder is reported with held false (its lock died with it)."""
    fd = _open(path, create=False)
    if fd is None or fcntl is None:
        return {"held": False, "holder": None}
    try:
        holder = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"held": True, "holder": holder}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return {"held": False, "holder": holder}
    finally:
        os.close(fd)
