"""One trainer per workdir: a lock file, and the checks that a workdir can be written.

The lock is `<workdir>/train.lock`, JSON {host, pid, started, heartbeat}, written by the chief
process (process 0) when training starts and removed when it ends (also after an error or
SIGTERM). A second trainer finds it and refuses with one line, unless the lock is stale:

- same host: the process `pid` no longer runs (a trainer killed with kill -9): taken over;
- another host: the heartbeat, refreshed by the holder at most every HEARTBEAT_SECS while it
  trains, is older than STALE_AFTER_SECS: taken over (a pid from another machine cannot be
  checked).

gs:// workdirs go through qtransformers.fileio like local ones, and their lock's host is usually
another machine's, so only the heartbeat tells a live lock from a stale one there. Object stores
have no atomic create-if-absent through fileio: two trainers started within the same second on
one gs:// workdir can both pass the check (local workdirs use O_EXCL and cannot).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from qtransformers import fileio
from qtransformers.commandline import UserError

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
HEARTBEAT_SECS = 60.0
STALE_AFTER_SECS = 600.0


def check_workdir_writable(workdir: str) -> None:
    """Raises UserError when `workdir` is a file, lies under a file, or cannot be written.

    Creates nothing: a probe file is written to (and removed from) the workdir, or, when it does
    not exist yet, its nearest existing parent folder.
    """
    if fileio.is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a folder; give a folder (new or a "
                        "previous run's).")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--workdir={workdir} lies under the file {existing}; give a folder "
                        "path.")
    probe = os.path.join(existing, f".qtransformers-write-test-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--workdir={workdir} cannot be written ({existing}: "
                        f"{err.strerror or err}); give a folder you can write to.") from err


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class WorkdirLock:
    """The lock of one workdir; `acquire()` / `release()` (also a context manager)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.held = False
        self._last_beat = 0.0

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"host": self.host, "pid": self.pid, "started": getattr(self, "_started", now),
                "heartbeat": now}

    def read(self) -> dict[str, Any] | None:
        """The current lock record, None when there is none ({} when unreadable)."""
        if not fileio.exists(self.path):
            return None
        try:
            record = json.loads(fileio.read_text(self.path))
        except (OSError, ValueError):  # half-written or garbled: treat as stale below
            return {}
        return record if isinstance(record, dict) else {}

    def holder_if_live(self) -> dict[str, Any] | None:
        """The lock record when another live trainer holds the lock, else None."""
        record = self.read()
        if not record:
            return None
        if record.get("host") == self.host:
            pid = int(record.get("pid", -1))
            if pid == self.pid or not _pid_alive(pid):
                return None
            return record
        if time.time() - float(record.get("heartbeat", 0.0)) > STALE_AFTER_SECS:
            return None
        return record

    def check(self) -> None:
        """Raises UserError when a live trainer holds the lock (nothing is written)."""
        holder = self.holder_if_live()
        if holder is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise UserError(
                f"--workdir={self.workdir} is in use by another trainer (pid {holder.get('pid')} "
                f"on {holder.get('host')}, since {since}); wait for it to finish, stop it, or "
                f"use another --workdir (if it is not running, delete {self.path}).")

    def acquire(self) -> "WorkdirLock":
        """Takes the lock (taking over a stale one); raises UserError when it is held."""
        self.check()
        stale = self.read()
        if stale:
            logger.warning("taking over the stale lock %s of pid %s on %s (no longer running).",
                           self.path, stale.get("pid"), stale.get("host"))
        self._started = time.time()
        data = json.dumps(self._record()).encode()
        if fileio.is_remote(self.path):
            fileio.write_bytes(self.path, data)
        else:
            if stale is not None:
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another trainer took it between check and create
                self.check()
                raise UserError(f"--workdir={self.workdir} was just locked by another trainer; "
                                "use another --workdir.") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        self.held, self._last_beat = True, time.monotonic()
        return self

    def heartbeat(self) -> None:
        """Refreshes the lock's heartbeat (at most every HEARTBEAT_SECS; cheap to call often)."""
        if self.held and time.monotonic() - self._last_beat >= HEARTBEAT_SECS:
            self._last_beat = time.monotonic()
            try:
                fileio.write_text(self.path, json.dumps(self._record()))
            except OSError as err:  # never stop training for the lock's heartbeat
                logger.warning("could not refresh %s: %s", self.path, err)

    def release(self) -> None:
        """Removes the lock file when this process holds it."""
        if not self.held:
            return
        self.held = False
        record = self.read()
        if record and (record.get("host"), record.get("pid")) != (self.host, self.pid):
            return  # taken over by someone else: not ours to remove
        try:
            if fileio.is_remote(self.path):
                fileio.as_path(self.path).unlink()
            else:
                os.remove(self.path)
        except (OSError, FileNotFoundError) as err:
            logger.warning("could not remove %s: %s", self.path, err)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
