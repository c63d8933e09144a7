"""An image tensor shared by the prompts, broadcast over the prompt axis, with its
gradient summed over the prompts by pairwise halving adds.

Legend: B images, P prompts per image.

The mask decoder adds every prompt's dense embedding to its image's embedding, and
round 0's image -> token step adds every prompt's update to the shared image tokens:
a broadcast over P, whose transpose in the backward pass sums the P gradients back
into the shared tensor. XLA:CPU (jaxlib 0.10, YNNPACK fusion on by default) runs that
`reduce` over a non-minor axis of a (B, P, L, C) tensor tens of times slower than P - 1
elementwise adds of (B, L, C) slices (figures in benchmarks/README.md), so the
gradient here is a tree of halving adds: same sum, another order of the additions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sum_prompts(g: jax.Array) -> jax.Array:
    """g (B, P, ...) -> (B, 1, ...): the sum over axis 1 as halving adds (row i plus row
    i + P // 2; an odd P adds its last row to row 0)."""
    while g.shape[1] > 1:
        half = g.shape[1] // 2
        head = g[:, :half] + g[:, half:2 * half]
        if g.shape[1] % 2:
            head = jnp.concatenate([head[:, :1] + g[:, 2 * half:], head[:, 1:]], axis=1)
        g = head
    return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.broadcast_to(x, shape)


def _broadcast_fwd(x, shape):
    return _broadcast(x, shape), None


def _broadcast_bwd(shape, _, g):
    return (sum_prompts(g),)


_broadcast.defvjp(_broadcast_fwd, _broadcast_bwd)


def broadcast_prompts(x: jax.Array, num_prompts: int) -> jax.Array:
    """x (B, 1, ...) -> (B, P, ...) = jnp.broadcast_to, whose gradient sums over the
    prompts with `sum_prompts`. P = num_prompts; x with P already on axis 1 is returned
    as is."""
    if x.shape[1] == num_prompts:
        return x
    if x.shape[1] != 1:
        raise ValueError(f"cannot broadcast a prompt axis of {x.shape[1]} to {num_prompts} prompts")
    return _broadcast(x, (x.shape[0], num_prompts, *x.shape[2:]))
