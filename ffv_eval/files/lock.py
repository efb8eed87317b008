"""One process at a time in a cache entry (an embedded model's conversion, a basis build).

The lock is the `filelock` package's (an OS file lock: released when the holding process ends,
even when it is killed). Its holder writes `<lock>.owner` beside it (pid, host, start time,
what it does), so that a process that has to wait says once whose lock it waits for and how to
clear a stale one, and a wait past the timeout is an error naming the lock file."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ffv_eval.errors import FFVError, SettingError
from ffv_eval.files.atomic import atomic_write_text
from ffv_eval.progress import show_progress

TIMEOUT_ENV = "FFV_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 4 * 3600.0  # a full basis build takes about an hour on 2 CPU cores


class CacheLockTimeout(FFVError, TimeoutError):
    """A cache lock still held by another process when the wait for it ends."""


def owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".owner")


def lock_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        raise SettingError(f"${TIMEOUT_ENV}={text!r}: expected seconds, e.g. {TIMEOUT_ENV}=600") from None
    if not seconds >= 0:
        raise SettingError(f"${TIMEOUT_ENV}={text!r}: expected a number of seconds >= 0")
    return seconds


def holder(lock_path: Path, patience: float = 0.0) -> str:
    """Who holds the lock, as its owner file says; waits up to `patience` seconds for a holder
    that has just taken the lock to write the file."""
    deadline = time.monotonic() + patience
    while True:
        try:
            owner = json.loads(owner_path(lock_path).read_text(encoding="utf-8"))
            return f"pid {owner['pid']} on host {owner['host']} ({owner['what']}, since {owner['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return f"another process (no {owner_path(lock_path).name} beside it)"
            time.sleep(0.05)


@contextmanager
def cache_lock(lock_path: str | os.PathLike, what: str, timeout: float | None = None,
               report: Callable[[str], None] = show_progress) -> Iterator[None]:
    """Hold the lock file `lock_path` for the body: `what` says what the holder does. A lock
    held elsewhere is waited for (`timeout` seconds, default $FFV_LOCK_TIMEOUT or 4 hours),
    telling `report` once whose lock it is; past the timeout, CacheLockTimeout."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout() if timeout is None else timeout
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder(lock_path, patience=min(2.0, timeout))
        report(f"[ffv] waiting up to {timeout:g}s for {lock_path}, held by {who}. The lock is freed when that "
               f"process ends; if it is gone and the wait does not end (a network file system), delete {lock_path}.")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise CacheLockTimeout(
                f"{lock_path} is still held after {timeout:g}s by {holder(lock_path)}; let that process finish, "
                f"or delete {lock_path} if it is gone, or wait longer with {TIMEOUT_ENV}=SECONDS"
            ) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                 "since": datetime.datetime.now().isoformat(timespec="seconds")}
        atomic_write_text(owner_path(lock_path), json.dumps(owner) + "\n")
        yield
    finally:
        owner_path(lock_path).unlink(missing_ok=True)
        lock.release()
