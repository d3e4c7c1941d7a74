"""One run per output: a lock file in the job's work folder that records its owner (pid, host) and a
heartbeat. A lock whose owner is gone — a dead pid on this host, or no heartbeat for `stale_after_s` from
another host — is stale and taken over, with a warning."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from quantizer.errors import ConfigError
from quantizer.storage import Location

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class JobLock:
    def __init__(self, folder: Location, heartbeat_s: float = 30.0, stale_after_s: float = 600.0) -> None:
        self.folder, self.heartbeat_s, self.stale_after_s = folder, heartbeat_s, stale_after_s
        self.owner = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**self.owner, "heartbeat": time.time()}).encode()

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.folder.read_text(LOCK_FILE))
        except (FileNotFoundError, ValueError):
            return None

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the holder no longer runs, or None if it may still."""
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} on this host ({holder.get('host')}) is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        for _ in range(3):
            if self.folder.create_exclusive(LOCK_FILE, self._record()):
                self._thread = threading.Thread(target=self._beat, name="rayquant-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            holder = self.read()
            if holder is None:  # released between our attempt and the read
                continue
            reason = self.stale_reason(holder)
            if reason is None:
                raise ConfigError(
                    f"another run holds this output (pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}): wait for it "
                    f"to finish, or stop it; if it is gone, its lock {self.folder}/{LOCK_FILE} counts as stale "
                    f"after {self.stale_after_s:.0f} s without a heartbeat")
            log.warning("taking over a stale lock on this output: %s", reason)
            self.folder.remove(LOCK_FILE)
        raise ConfigError(f"could not take the lock {self.folder}/{LOCK_FILE}; another run keeps taking it")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self.read()
            if holder is None or holder.get("token") != self.owner["token"]:
                log.error("this run lost its lock on %s (another run took it over)", self.folder)
                return
            self.folder.write_bytes(LOCK_FILE, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self.read()
        if holder is not None and holder.get("token") == self.owner["token"]:
            self.folder.remove(LOCK_FILE)
