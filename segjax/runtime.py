"""Process start-up: multi-host initialisation and logging (called by entry points)."""

from __future__ import annotations

import logging

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
