"""Process start-up: multi-host initialisation and logging (called by entry points), and
the workdir lock of a training run."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


def setup(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, auto: bool = False) -> None:
    """Joins a multi-controller job through `jax.distributed` when asked.

    On CPU the cross-process collectives go through gloo.
    """
    if coordinator_address or auto:
        if jax.config.jax_platforms in (None, "", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if coordinator_address:
            kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                          process_id=process_id)
        jax.distributed.initialize(**kwargs)
        _connect_all_devices()
        log.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    logging.getLogger("absl").setLevel(logging.WARNING)


def _connect_all_devices() -> None:
    """One tiny all-reduce over every device of the job.

    NOTE: CPU collectives (gloo) connect a set of devices at the first collective over
    it and give up when a peer is 30 s late (a fixed XLA deadline); on a loaded host the
    train step's compile time differs between processes by more than that. Connecting
    now, while the processes are in step, makes the connection that the data-parallel
    gradient all-reduce (over all devices) reuses; collectives on an existing connection
    wait up to 30 min. (`multihost_utils.sync_global_devices` only connects each local
    device with its peers on other processes, a different set.)
    """
    mesh = Mesh(np.asarray(jax.devices()), ("all",))
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")),
                                                  np.ones(jax.local_device_count(), np.int32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    if int(total) != jax.device_count():
        raise RuntimeError(f"device check across processes summed to {int(total)}, "
                           f"expected {jax.device_count()}")


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run (see `WorkdirLockedError`), e.g. it is not
    writable."""


class WorkdirLockedError(WorkdirError):
    """Another run holds the workdir's lock."""


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces or ')': fields after its last ')'
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":  # a zombie: dead, only not reaped yet
        return -1
    return int(fields[19])


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _process_start_ticks(pid)
    if now == -1:
        return False
    # a pid reused by a process that started later is not the lock's owner
    return not (start_ticks is not None and now is not None and now != start_ticks)


class WorkdirLock:
    """An exclusive lock on a training workdir: the file `workdir/LOCK` holding the
    owner's host, pid and process start time.

    Taken with O_CREAT|O_EXCL (atomic on local filesystems and NFSv3+). A lock whose
    owner is a dead process on this host (pid gone, a zombie, or the pid reused by a
    later process) is stale and is taken over; a lock held by another host cannot be
    checked from here and is always respected: the message says how to remove it.
    """

    NAME = "LOCK"

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), self.NAME)
        self._held = False

    def _owner(self) -> dict:
        with open(self.path) as f:
            return json.load(f)

    def acquire(self) -> "WorkdirLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "start_ticks": _process_start_ticks(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "argv": sys.argv}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            except OSError as e:
                raise WorkdirError(f"workdir {os.path.dirname(self.path)} is not writable: cannot "
                                   f"create {self.path}: {e.strerror}") from None
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                self._held = True
                return self
            try:
                owner = self._owner()
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                # being written this instant by its new owner, or garbage: look again
                time.sleep(0.2)
                try:
                    owner = self._owner()
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as e:
                    raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} has an unreadable "
                                             f"lock file {self.path} ({e}); if no run uses this "
                                             "workdir, delete it") from None
            host, pid = owner.get("host"), int(owner.get("pid", -1))
            where = f"pid {pid} on host {host}, since {owner.get('since')}"
            if host != me["host"]:
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)} is locked by {where}; it cannot be "
                    f"checked from host {me['host']}: if that run is gone, delete {self.path}")
            if _pid_alive(pid, owner.get("start_ticks")):
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)} is in use by a running process ({where}, "
                    f"{' '.join(owner.get('argv') or [])}); two runs must not write one workdir")
            # Stale: its owner died on this host. Rename before deleting, so that of two
            # processes taking it over only one removes it.
            stale = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                continue
            try:
                if self._same_owner(stale, owner):
                    log.warning("taking over the stale lock of dead %s in %s", where,
                                os.path.dirname(self.path))
                    os.remove(stale)
                else:  # a live owner's fresh lock got renamed: put it back
                    os.rename(stale, self.path)
            except OSError:
                pass
        raise WorkdirLockedError(f"could not lock workdir {os.path.dirname(self.path)}: its lock "
                                 f"file {self.path} keeps changing")

    @staticmethod
    def _same_owner(path: str, owner: dict) -> bool:
        try:
            with open(path) as f:
                return json.load(f) == owner
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
