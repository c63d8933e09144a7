"""The only module that turns logical axis names into `NamedSharding`s.

Model code names parameter and activation axes logically (`batch`, `length`, `embed`,
`mlp`, `heads`, ...); a config declares the mesh (`mesh`: axis name -> size, -1 for
"the remaining devices") and the rules (logical name -> mesh axis or axes). Rules are
applied in order and each mesh axis is used at most once per array, so listing
`batch` first keeps activations sharded on the batch under FSDP while parameters shard
their `embed` axis over `fsdp`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

PyTree = Any
Rules = Sequence[tuple[str, Any]]

# Data parallel over `data`, parameters and optimizer state sharded over `fsdp`
# (ZeRO-3 style), tensor parallel over `model` for the MLP and attention heads.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("length", None),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh with Auto axes; one size may be -1 (takes the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = list(shape), list(shape.values())
    bad = {n: s for n, s in shape.items() if isinstance(s, bool) or not isinstance(s, int)
           or (s < 1 and s != -1)}
    if bad:
        raise ValueError(f"mesh axis sizes must be -1 or a positive int, got {bad} in {shape}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    # jax.make_mesh builds Explicit axes by default now; the pjit path wants Auto.
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
    """Maps one array's logical axis names to a PartitionSpec on `mesh`.

    A mesh axis is used at most once per array; a dimension that the mesh axes do not
    divide stays replicated (so tiny variants run on any mesh).
    """
    used: set[str] = set()
    out: list[Any] = [None] * len(names)
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            continue
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        for i, name in enumerate(names):
            if name != logical or out[i] is not None:
                continue
            free = tuple(a for a in axes if a in mesh.shape and a not in used)
            # drop trailing axes until the product divides the dimension
            while free and shape[i] % math.prod(mesh.shape[a] for a in free):
                free = free[:-1]
            free = tuple(a for a in free if mesh.shape[a] > 1)
            if free:
                out[i] = free[0] if len(free) == 1 else free
                used.update(free)
    return P(*out)


def shardings_from_boxed(abstract_boxed: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
    """NamedShardings for a (possibly) logically-boxed abstract pytree.

    `abstract_boxed` is `jax.eval_shape` of a flax init; unboxed leaves replicate.
    """
    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_boxed,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of the leading (batch) axis of every input array."""
    axes = dict(rules).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
    spec = batch_sharding(mesh, rules).spec[0]
    if spec is None:
        return 1
    axes = (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


_BATCH_SHARDS = contextvars.ContextVar("segjax_batch_shards", default=1)


@contextlib.contextmanager
def batch_shards(n: int):
    """Declares, while a step is traced inside the block, that the batch axis of its
    inputs is split into `n` contiguous shards (`batch_divisor`: one per device that
    holds a slice of the batch).

    Model code that loops over the images of a batch (`lax.map`, `lax.scan`) reads it
    through `current_batch_shards` and loops over each shard's images instead, so that
    every device runs its own images: a loop over a sharded axis makes XLA gather the
    whole batch onto every device (each device then computes every image).
    """
    token = _BATCH_SHARDS.set(int(n))
    try:
        yield
    finally:
        _BATCH_SHARDS.reset(token)


def current_batch_shards(batch_size: int) -> int:
    """The number of batch shards declared by `batch_shards` (1 outside it, or when it
    does not divide `batch_size`)."""
    n = _BATCH_SHARDS.get()
    return n if n > 1 and batch_size % n == 0 else 1


def shard_major(x: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (B / n, n, ...): row j holds the j-th image of each of the `n`
    contiguous batch shards, so a loop over the leading axis runs every shard's images
    on its own device (the sharded axis is the second one)."""
    return x.reshape(n, x.shape[0] // n, *x.shape[1:]).swapaxes(0, 1)


def shard_major_inverse(y: jax.Array) -> jax.Array:
    """The inverse of `shard_major`: (B / n, n, ...) -> (B, ...)."""
    return y.swapaxes(0, 1).reshape(-1, *y.shape[2:])


def global_batch_from_local(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Assembles per-process numpy batches into global jax Arrays on `sharding`."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def describe(shardings: PyTree) -> str:
    """One line per sharded leaf (for logs)."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    lines = [f"{jax.tree_util.keystr(p)}: {s.spec}" for p, s in flat if any(s.spec)]
    return "\n".join(lines) if lines else "(all replicated)"
