"""SAM training losses: focal, dice and IoU-prediction MSE per predicted mask, and the
multi-mask, multi-step combination of the SAM 2 training code (`sam2` 1.1.0
`training/loss_fns.py`, `MultiStepMultiMasksAndIous`), which is SAM's recipe (paper,
appendix "Training algorithm": focal : dice = 20 : 1, IoU head MSE, gradient only
through the lowest-loss of the 3 masks).

Legend: N objects (masks to predict; (B, M) flattened or any leading shape), K predicted
masks per object (3 with multimask output, else 1), H/W the loss resolution.

The per-mask terms are the reference's `loss_on_multimask=True` forms before the
division by num_objects:
  focal(x, t) = mean_pixels alpha_t (1 - p_t)^gamma BCE(x, t),  p = sigmoid(x)
  dice(x, t)  = 1 - (2 sum p t + 1) / (sum p + sum t + 1)
  iou(x, t, s) = (s - IoU(x > 0, t > 0))^2  (|.| with use_l1_loss), IoU with union clamped to >= 1
`step_losses` selects per object and normalises as the reference does; padding objects
(valid False) contribute exactly zero to every loss and gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# the reference's weight_dict keys -> ours: loss_mask (focal), loss_dice, loss_iou
DEFAULT_WEIGHTS = dict(loss_mask=20.0, loss_dice=1.0, loss_iou=1.0)


def _pow(x: jax.Array, gamma: float) -> jax.Array:
    """x ** gamma; an integer gamma as repeated multiplication (torch's pow gradient at
    x = 0 is then 0 for gamma >= 1, and no 0 * inf for gamma = 0)."""
    if float(gamma).is_integer() and gamma >= 0:
        return jax.lax.integer_pow(x, int(gamma))
    return x ** gamma


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> jax.Array:
    """Focal loss (RetinaNet) averaged over pixels, per mask.

    logits: (..., H, W) float32. targets: (..., H, W) bool or {0, 1} float.
    alpha < 0 disables the class weighting (the reference's convention).
    Returns: (...,) float32.
    """
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(x)
    # torch's binary_cross_entropy_with_logits: max(x, 0) - x t + log1p(exp(-|x|))
    ce = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = prob * t + (1 - prob) * (1 - t)
    loss = ce * _pow(1 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - soft dice with +1 smoothing, per mask. logits, targets: (..., H, W) -> (...,)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(*logits.shape[:-2], -1)
    t = targets.astype(jnp.float32).reshape(*targets.shape[:-2], -1)
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


def mask_iou(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """IoU of (logits > 0) with (targets > 0), the union clamped to >= 1 (an empty
    prediction of an empty target has IoU 0, as in the reference). (..., H, W) -> (...,)
    float32, no gradient."""
    pred = logits.reshape(*logits.shape[:-2], -1) > 0
    gt = targets.reshape(*targets.shape[:-2], -1) > 0
    inter = jnp.sum(pred & gt, axis=-1).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=-1).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


def iou_loss(logits: jax.Array, targets: jax.Array, iou_predictions: jax.Array,
             use_l1_loss: bool = False) -> jax.Array:
    """(predicted IoU - actual IoU)^2 (or |.| with use_l1_loss) per mask.

    logits, targets: (..., H, W); iou_predictions: (...,). Returns (...,) float32; the
    gradient reaches iou_predictions only (the actual IoU is a count of thresholds).
    """
    d = iou_predictions.astype(jnp.float32) - mask_iou(logits, targets)
    return jnp.abs(d) if use_l1_loss else d * d


class StepLosses(NamedTuple):
    """Per-object losses of one prediction step, already divided by num_objects (so
    their sums over objects are the reference's `losses[...]`). Each (N,) float32;
    zero where the object is padding."""

    loss_mask: jax.Array
    loss_dice: jax.Array
    loss_iou: jax.Array
    best: jax.Array  # (N,) int32 index of the trained mask among K (0 when K = 1)


def step_losses(logits: jax.Array, iou_predictions: jax.Array, targets: jax.Array, valid: jax.Array,
                num_objects: jax.Array | float, *, weights: dict | None = None, focal_alpha: float = 0.25,
                focal_gamma: float = 2.0, supervise_all_iou: bool = False,
                iou_use_l1_loss: bool = False) -> StepLosses:
    """One prediction step of `MultiStepMultiMasksAndIous._update_losses` (SAM 1: no
    object-score head, so loss_class is absent and every object counts as present).

    logits: (N, K, H, W) float32 mask logits at the loss resolution.
    iou_predictions: (N, K) float32.
    targets: (N, H, W) bool ground truth.
    valid: (N,) bool; False objects are padding.
    num_objects: the normaliser, sum(valid) over the whole (global) batch clamped to
      >= 1: the reference divides by the objects per GPU averaged over the world and
      DDP averages gradients, which is the global sum over the global count.
    weights: loss_mask / loss_dice weights of the K > 1 selection (DEFAULT_WEIGHTS).
    With K > 1 the mask of least weights["loss_mask"] * focal + weights["loss_dice"] *
    dice is trained (first on ties, as torch.argmin) and its IoU loss (the mean over
    the K masks with supervise_all_iou).
    """
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    n, k = logits.shape[:2]
    if iou_predictions.shape != (n, k) or targets.shape != (n,) + logits.shape[2:] or valid.shape != (n,):
        raise ValueError(f"step_losses: logits {logits.shape}, iou_predictions {iou_predictions.shape}, "
                         f"targets {targets.shape}, valid {valid.shape} do not agree")
    ok = valid.astype(bool)
    # padding objects see zero logits and IoUs: their losses are finite and masked below,
    # so no gradient (not even 0 * inf) reaches the predictions of padding
    logits = jnp.where(ok[:, None, None, None], logits.astype(jnp.float32), 0.0)
    iou_predictions = jnp.where(ok[:, None], iou_predictions.astype(jnp.float32), 0.0)
    t = jnp.broadcast_to(targets[:, None], logits.shape)
    num_objects = jnp.asarray(num_objects, jnp.float32)
    focal = sigmoid_focal_loss(logits, t, focal_alpha, focal_gamma) / num_objects  # (N, K)
    dice = dice_loss(logits, t) / num_objects
    iou = iou_loss(logits, t, iou_predictions, iou_use_l1_loss) / num_objects
    if k > 1:
        combo = focal * w["loss_mask"] + dice * w["loss_dice"]
        best = jnp.argmin(combo, axis=-1).astype(jnp.int32)

        def pick(x):
            return jnp.take_along_axis(x, best[:, None], axis=-1)[:, 0]

        focal, dice = pick(focal), pick(dice)
        iou = iou.mean(-1) if supervise_all_iou else pick(iou)
    else:
        best = jnp.zeros((n,), jnp.int32)
        focal, dice, iou = focal[:, 0], dice[:, 0], iou[:, 0]
    zero = jnp.zeros_like(focal)
    return StepLosses(jnp.where(ok, focal, zero), jnp.where(ok, dice, zero), jnp.where(ok, iou, zero), best)


def num_objects(valid: jax.Array) -> jax.Array:
    """The reference's normaliser: the count of real objects, at least 1. valid: any
    shape bool -> () float32."""
    return jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def reduce_loss(losses: dict[str, jax.Array], weights: dict | None = None) -> jax.Array:
    """The reference's `reduce_loss`: sum of weight * loss over loss_mask, loss_dice,
    loss_iou (weights DEFAULT_WEIGHTS unless given; a zero weight drops its term)."""
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    total = jnp.zeros((), jnp.float32)
    for key in ("loss_mask", "loss_dice", "loss_iou"):
        if w[key] != 0:
            total = total + losses[key] * w[key]
    return total


def multistep_loss(steps: list[tuple[jax.Array, jax.Array]], targets: jax.Array, valid: jax.Array, *,
                   weights: dict | None = None, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`MultiStepMultiMasksAndIous` on one frame: the step losses summed over steps.

    steps: [(logits (N, K_s, H, W), iou_predictions (N, K_s))] per prediction step.
    targets: (N, H, W) bool; valid: (N,) bool. kwargs: `step_losses` options.
    Returns: (core loss (), dict(loss_mask, loss_dice, loss_iou) each ()).
    """
    n_obj = num_objects(valid)
    sums = {key: jnp.zeros((), jnp.float32) for key in ("loss_mask", "loss_dice", "loss_iou")}
    for logits, iou in steps:
        s = step_losses(logits, iou, targets, valid, n_obj, weights=weights, **kwargs)
        for key in sums:
            sums[key] = sums[key] + getattr(s, key).sum()
    return reduce_loss(sums, weights), sums
