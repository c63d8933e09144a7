"""Process start-up: multi-host initialisation and logging (called by entry points)."""

from __future__ import annotations

import logging

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def setup(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, auto: bool = False) -> None:
    """Joins a multi-controller job through `jax.distributed` when asked.

    On CPU the cross-process collectives go through gloo.
    """
    if coordinator_address or auto:
        if jax.config.jax_platforms in (None, "", "cpu") or not jax.config.jax_platforms:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = {}
        if coordinator_address:
            kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                          process_id=process_id)
        jax.distributed.initialize(**kwargs)
        # NOTE: CPU collectives (gloo) connect a set of devices at their first collective
        # and give up when a peer is 30 s late (a fixed XLA deadline); on a loaded host the
        # train step's compile time differs between processes by more than that. One tiny
        # collective over all devices now, while the processes are in step, makes that
        # connection; later collectives over all devices reuse it and wait up to 30 min.
        multihost_utils.sync_global_devices("segjax.runtime.setup")
        log.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    logging.getLogger("absl").setLevel(logging.WARNING)
