"""One driver per sweep: a lock file in the sweep's storage folder (`.NAME.launch.lock`).

A second `launch` of a sweep that is running (another terminal, or another machine on the
same storage) is refused with one line naming the running one. The lock says who holds it
(host, process, since when) and the holder refreshes it every few seconds, so a driver killed
with SIGKILL does not leave it stuck: on the same host a lock whose process is gone is free,
on another host one that has not been refreshed for a while.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from podd_engine.errors import UserError

LOCK_SUFFIX = ".launch.lock"  # storage/.NAME.launch.lock, beside the sweep's Ray folder
REFRESH_S = 5.0  # how often the holder touches the lock
STALE_S = 60.0  # a lock not touched for this long is a dead driver's (other hosts)


class SweepRunning(UserError):
    """The sweep is being run by another driver."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLock:
    def __init__(self, storage: Path, sweep: str):
        self.path = storage / f".{sweep}{LOCK_SUFFIX}"
        self.sweep = sweep
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable or half-written: only its age can tell
            try:
                return time.time() - self.path.stat().st_mtime > STALE_S
            except FileNotFoundError:
                return True
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", -1)))
        try:
            return time.time() - self.path.stat().st_mtime > STALE_S
        except FileNotFoundError:
            return True

    def acquire(self) -> None:
        """Take the lock, or raise SweepRunning naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        staging = self.path.with_name(f"{self.path.name}.{self.token}")
        staging.write_text(json.dumps(mine))
        try:
            for _ in range(3):
                try:
                    os.link(staging, self.path)  # atomic: fails when a lock is there
                    break
                except FileExistsError:
                    holder = self._holder()
                    if not self._stale(holder):
                        raise self._running(holder) from None
                    # a dead driver's lock: take it over, then make sure no other taker won
                    os.replace(staging, self.path)
                    time.sleep(0.2)
                    if (self._holder() or {}).get("token") == self.token:
                        break
                    staging.write_text(json.dumps(mine))
            else:
                raise self._running(self._holder())
        finally:
            staging.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name="podd-sweep-lock")
        self._thread.start()

    def _running(self, holder: dict | None) -> SweepRunning:
        who = ("another driver" if holder is None else
               f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}")
        return SweepRunning(f"sweep {self.sweep} is already running ({who}; lock {self.path}): "
                            f"wait for it to end, or stop it there (Ctrl-C, or `kill` that "
                            f"process) and launch again to resume")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                if (self._holder() or {}).get("token") != self.token:
                    return  # taken over (this driver was thought dead): stop touching it
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * REFRESH_S)
        if (self._holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def running_driver(storage: Path, sweep: str) -> dict | None:
    """The live driver of `sweep` (host, pid, since) from its lock, or None when no driver
    holds it (no lock, or a dead driver's)."""
    lock = DriverLock(storage, sweep)
    holder = lock._holder()
    if holder is None or lock._stale(holder):
        return None
    return holder
