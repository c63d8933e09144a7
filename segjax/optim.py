"""optax optimizers from config: schedules, weight-decay masks, layer decay, freezing.

Config fields (`config.optim`, an ml_collections.ConfigDict):
  name            'adamw' | 'sgd' | 'lars'
  lr              absolute peak lr; or `base_lr` with lr = base_lr * batch / 256
                  (the MAE convention) when lr is None
  b1, b2, weight_decay, momentum
  warmup_steps    linear warmup from 0
  schedule        'cosine' (to min_lr) | 'constant' | 'step' (lr * decay_factor ** k after
                  the k-th of `decay_steps`: SAM's recipe, x0.1 twice)
  min_lr
  decay_steps, decay_factor   the 'step' schedule's boundaries (absolute steps) and factor
  layer_decay     None or float: ViT layer-wise lr decay (BEiT / MAE fine-tuning)
  layer_decay_scope  '' or a '/'-ended path prefix: only params under it are ViT layers
                  (SAM: 'image_encoder/'); everything else gets layer id depth + 1 (lr x1)
  frozen          regexes of '/'-joined param paths that are not trained
  no_decay        regexes exempt from weight decay (plus every <=1-d param)
  grad_clip_norm  None or float
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from segjax.checkpoint import flatten_paths

PyTree = Any
OPTIMIZERS = ("adamw", "sgd", "lars")
SCHEDULES = ("cosine", "constant", "step")


def peak_lr(cfg, global_batch: int) -> float:
    if cfg.get("lr") is not None:
        return float(cfg.lr)
    if cfg.get("base_lr") is None:
        raise ValueError("config.optim needs `lr` or `base_lr`")
    return float(cfg.base_lr) * global_batch / 256.0


def make_schedule(cfg, global_batch: int, total_steps: int) -> optax.Schedule:
    lr = peak_lr(cfg, global_batch)
    warmup = int(cfg.get("warmup_steps", 0))
    kind = cfg.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
            end_value=float(cfg.get("min_lr", 0.0)))
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup])
    if kind == "step":
        return step_schedule(lr, warmup, tuple(cfg.get("decay_steps", ())),
                             float(cfg.get("decay_factor", 0.1)))
    raise ValueError(f"unknown schedule {kind!r}; use one of {list(SCHEDULES)}")


def step_schedule(lr: float, warmup: int, decay_steps: Sequence[int], factor: float) -> optax.Schedule:
    """Linear warmup from 0 over `warmup` steps, then `lr * factor ** k` from the k-th
    boundary of `decay_steps` (absolute step counts) on."""
    bounds = sorted(int(b) for b in decay_steps)
    if any(b < warmup for b in bounds):
        raise ValueError(f"optim.decay_steps {bounds} must not fall inside the {warmup} warmup steps")

    def schedule(count):
        count = jnp.asarray(count)
        warm = jnp.minimum(count / max(warmup, 1), 1.0) if warmup else 1.0
        k = sum((count >= b).astype(jnp.int32) for b in bounds) if bounds else 0
        return lr * warm * jnp.asarray(factor, jnp.float32) ** k

    return schedule


def _label_tree(params: PyTree, fn: Callable[[str, Any], Any]) -> PyTree:
    flat = jax.tree_util.tree_flatten_with_path(params)
    paths = list(flatten_paths(params))
    leaves = [fn(p, leaf) for p, (_, leaf) in zip(paths, flat[0])]
    return jax.tree_util.tree_unflatten(flat[1], leaves)


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def vit_layer_id(path: str, depth: int) -> int:
    """BEiT/MAE layer ids: embeddings 0, blocks_i -> i + 1, everything after -> depth + 1."""
    top = path.split("/")[0]
    if top in ("cls_token", "pos_embed", "patch_embed", "mask_token"):
        return 0
    m = re.fullmatch(r"blocks_(\d+)", top)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def vit_depth(params: PyTree, scope: str = "") -> int:
    """Number of ViT blocks (`blocks_{i}`) directly under `scope` (e.g. ViTDet's
    'backbone/net/'); raises when there are none."""
    ids = [int(m.group(1)) for p in flatten_paths(params)
           if p.startswith(scope) and (m := re.match(r"blocks_(\d+)/", p[len(scope):]))]
    if not ids:
        raise ValueError(f"layer_decay needs ViT blocks: no 'blocks_<i>/' parameters under scope {scope!r}")
    return max(ids) + 1


def layer_decay_scales(params: PyTree, decay: float, depth: int, scope: str = "") -> PyTree:
    """Per-parameter lr multipliers decay ** (depth + 1 - layer_id).

    scope: '' (the whole model is the ViT) or a path prefix such as 'image_encoder/':
    params under it get their ViT layer id with the prefix stripped, the rest (SAM's
    prompt encoder and mask decoder, as sam2's layer-decay modifier) depth + 1.
    """
    def scale(path: str, _) -> float:
        if not path.startswith(scope):
            return 1.0
        return decay ** (depth + 1 - vit_layer_id(path[len(scope):], depth))

    return _label_tree(params, scale)


def scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
    """Multiplies each update by a per-leaf constant."""
    def init(_):
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        # frozen parameters (`optim.frozen`) arrive as optax's empty MaskedNode: kept as they are
        masked = lambda u: isinstance(u, optax.MaskedNode)  # noqa: E731
        return jax.tree_util.tree_map(lambda u, s: u if masked(u) else u * jnp.asarray(s, u.dtype), updates,
                                      scales, is_leaf=masked), state

    return optax.GradientTransformation(init, update)


def trainable_mask(params: PyTree, frozen: Sequence[str]) -> PyTree:
    """True where a parameter is trained (not matched by any `frozen` regex)."""
    return _label_tree(params, lambda p, _: not _matches(p, frozen))


def make_optimizer(cfg, params: PyTree, global_batch: int, total_steps: int,
                   depth: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the optimizer for `params` (an abstract or concrete pytree).

    Returns (tx, lr_schedule). Frozen parameters get zero updates and no optimizer
    state; layer decay multiplies the (post-Adam, post-weight-decay) update, which
    equals scaling each parameter group's lr as the reference does.
    """
    schedule = make_schedule(cfg, global_batch, total_steps)
    no_decay = list(cfg.get("no_decay", ()))
    wd_mask = _label_tree(params, lambda p, x: len(x.shape) > 1 and not _matches(p, no_decay))
    name = cfg.get("name", "adamw")
    if name == "adamw":
        core = [optax.scale_by_adam(b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                                    eps=cfg.get("eps", 1e-8)),
                optax.add_decayed_weights(cfg.get("weight_decay", 0.0), wd_mask)]
    elif name == "sgd":
        core = [optax.add_decayed_weights(cfg.get("weight_decay", 0.0), wd_mask),
                optax.trace(decay=cfg.get("momentum", 0.9))]
    elif name == "lars":
        # MAE linear probing uses LARS; optax.lars already includes lr scaling.
        core = [optax.add_decayed_weights(cfg.get("weight_decay", 0.0), wd_mask),
                optax.scale_by_trust_ratio(),
                optax.trace(decay=cfg.get("momentum", 0.9))]
    else:
        raise ValueError(f"unknown optimizer {name!r}; use one of {list(OPTIMIZERS)}")
    chain = []
    if cfg.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain += core
    if cfg.get("layer_decay") is not None:
        scope = cfg.get("layer_decay_scope", "")
        if depth is None:  # a model without a `depth` (Mask R-CNN's ViTDet): count the blocks
            depth = vit_depth(params, scope)
        chain.append(scale_by_tree(layer_decay_scales(params, float(cfg.layer_decay), depth, scope)))
    chain.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*chain)
    frozen = list(cfg.get("frozen", ()))
    if frozen:
        mask = trainable_mask(params, frozen)
        if not any(jax.tree_util.tree_leaves(mask)):
            raise ValueError(f"optim.frozen {frozen} freezes every parameter")
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
