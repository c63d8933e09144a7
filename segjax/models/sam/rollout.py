"""SAM's interactive training rollout (paper, appendix "Training algorithm") in one
jitted computation: the image encoder once per image, then `num_rounds` decoder rounds
on every mask of the image as its prompts (P axis = M), the round losses summed.

Legend: B images, M masks per image (padded; `valid`), S model input side, G loss
resolution (masks are G x G), L = 4 h the decoder's low-res logits side (S / 4),
R num_rounds, T = R + 2 prompt tokens.

Rounds (r = 0 .. R-1; the paper's "round r + 1"):
  r = 0   a point uniformly from the mask or, with probability box_prob, the mask's box
          with noise (`segjax.ops.prompt_sampling`); no mask prompt. A lone point gets
          the 3-mask output, the lowest-loss mask trained; a box the single mask.
  r >= 1  one point uniformly from the error region of the previous prediction (label
          1 in a false negative, 0 in a false positive), except in no-point rounds: the
          last round and num_no_point_rounds - 1 rounds drawn per mask among rounds
          1 .. R-2 (paper: 1 + 8 sampled + 2 without = 11). The previous round's
          unthresholded low-res logits are the mask prompt; single-mask output.
  A round whose error region is empty (the prediction is right inside the image) adds
  no point. With 3 masks, the one of highest predicted IoU feeds the next round (its logits as
  the mask prompt, its thresholded form for the error region), as in sam2's
  `_iter_correct_pt_sampling`.
Token slots: [first point | round 1 .. R-1 points | pad (-1) or box TL | box BR], absent
(`ABSENT`) where unused, so the decoder sees exactly the official token sequence
(points, then the padding point without a box or the two box corners).

Losses (`segjax.models.sam.losses`, sam2's `MultiStepMultiMasksAndIous`): per round
focal * 20 + dice + IoU-MSE on the logits at G (L resized bilinearly to G when they
differ), divided by the number of real masks in the batch, summed over rounds.
Padding masks (valid False) affect nothing: no loss, no gradient, no other mask.

Gradients flow through the mask prompt from round to round, as in sam2 (its
`_iter_correct_pt_sampling` feeds `low_res_masks` without `detach`);
`mask_prompt_gradient=False` cuts them (`stop_gradient`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from segjax.models.sam import losses as L
from segjax.models.sam.prompt_encoder import ABSENT
from segjax.ops import prompt_sampling as ps
from segjax.ops.resample import resize_bilinear


class FirstPrompt(NamedTuple):
    """Round 0's prompt per mask. is_box: (B, M) bool; point: (B, M, 2) float32 S-frame
    (x, y); point_label: (B, M) int32 (1, or -1 for an empty mask); box: (B, M, 4)
    float32 XYXY S-frame."""

    is_box: jax.Array
    point: jax.Array
    point_label: jax.Array
    box: jax.Array


class FixedPrompts(NamedTuple):
    """Every prompt of a rollout, given from outside (parity tests, benchmarks).

    first: round 0's prompt. points: (B, M, R-1, 2) float32 S-frame (x, y) of rounds
    1 .. R-1; point_labels: (B, M, R-1) int32, 1 / 0, or -1 / ABSENT where the round adds
    no point."""

    first: FirstPrompt
    points: jax.Array
    point_labels: jax.Array


def check_rounds(num_rounds: int, num_no_point_rounds: int) -> None:
    """Clear errors for round counts the recipe cannot run."""
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
    if not 0 <= num_no_point_rounds <= num_rounds - 1:
        raise ValueError(f"num_no_point_rounds must be in [0, num_rounds - 1 = {num_rounds - 1}] (round 1 "
                         f"always has a prompt), got {num_no_point_rounds} with num_rounds {num_rounds}")


def sample_first_prompt(rng: jax.Array, masks: jax.Array, boxes: jax.Array, image_hw: jax.Array, size: int,
                        box_prob: float = 0.5, box_noise_std: float = 0.1,
                        box_noise_max: float = 20.0) -> FirstPrompt:
    """Round 0: per mask a box (probability box_prob) with noise, else a foreground point.

    masks: (B, M, G, G) bool; boxes: (B, M, 4) XYXY S-frame; image_hw: (B, 2).
    """
    k_choice, k_point, k_box = jax.random.split(rng, 3)
    is_box = jax.random.uniform(k_choice, masks.shape[:2]) < box_prob
    point, label = ps.sample_foreground_point(k_point, masks, size)
    box = ps.noisy_boxes(k_box, boxes, image_hw[:, None], box_noise_std, box_noise_max)
    return FirstPrompt(is_box, point, label, box)


def sample_no_point_rounds(rng: jax.Array, shape: tuple[int, ...], num_rounds: int,
                           num_no_point_rounds: int) -> jax.Array:
    """(…shape, R-1) bool, True where round r = 1 .. R-1 adds no point: the last round
    (when num_no_point_rounds >= 1) and num_no_point_rounds - 1 distinct rounds drawn
    uniformly per mask among rounds 1 .. R-2."""
    check_rounds(num_rounds, num_no_point_rounds)
    n = num_rounds - 1
    out = jnp.zeros(shape + (n,), bool)
    if num_no_point_rounds == 0 or n == 0:
        return out
    out = out.at[..., n - 1].set(True)
    k = num_no_point_rounds - 1
    if k:
        scores = jax.random.uniform(rng, shape + (n - 1,))
        rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)  # 0 = highest score
        out = out.at[..., : n - 1].set(rank < k)
    return out


def _at_grid(logits: jax.Array, grid: int) -> jax.Array:
    """(..., L, L) low-res logits -> (..., G, G): as they are when L == G, else torch's
    bilinear resize (align_corners=False)."""
    if logits.shape[-1] == grid:
        return logits
    return resize_bilinear(logits, (grid, grid))


def _first_tokens(first: FirstPrompt, num_rounds: int) -> tuple[jax.Array, jax.Array]:
    """Round 0's token slots: (coords (B, M, T, 2), labels (B, M, T))."""
    b, m = first.is_box.shape
    t = num_rounds + 2
    box = first.is_box
    coords = jnp.zeros((b, m, t, 2), jnp.float32)
    labels = jnp.full((b, m, t), ABSENT, jnp.int32)
    coords = coords.at[:, :, 0].set(jnp.where(box[..., None], 0.0, first.point))
    labels = labels.at[:, :, 0].set(jnp.where(box, ABSENT, first.point_label))
    corners = first.box.reshape(b, m, 2, 2)
    coords = coords.at[:, :, t - 2:].set(jnp.where(box[..., None, None], corners, 0.0))
    labels = labels.at[:, :, t - 2].set(jnp.where(box, 2, -1))  # box TL, or the official padding point
    labels = labels.at[:, :, t - 1].set(jnp.where(box, 3, ABSENT))
    return coords, labels


def _rollout(model, params, emb: jax.Array, first: FirstPrompt, next_point: Callable, keys: jax.Array,
             masks: jax.Array, valid: jax.Array, *, num_rounds: int, loss_kwargs: dict,
             mask_prompt_gradient: bool, keep_outputs: bool, heads: tuple[str, ...] = ("single", "multi")):
    """The rounds on precomputed embeddings. next_point(r, key, pred (B, M, G, G) bool)
    -> (coords (B, M, 2), labels (B, M)); keys: (R-1,) keys for it. heads: round 0's
    decoder heads to run ("single" for boxes, "multi" for points).
    Returns (loss sums dict, metrics dict, outputs dict or None)."""
    b, m, grid = masks.shape[0], masks.shape[1], masks.shape[-1]
    variables = {"params": params}
    valid = valid.astype(bool)
    masks = masks.astype(bool)
    n_obj = L.num_objects(valid)
    targets = masks.reshape(b * m, grid, grid)
    flat_valid = valid.reshape(b * m)

    def predict(coords, labels, mask_input, multimask):
        has = None if mask_input is None else jnp.ones((b, m), bool)
        out = model.apply(variables, emb, coords, labels, mask_input, has, multimask, method=model.predict_masks)
        return out["low_res_logits"], out["iou_predictions"]  # (B, M, K, L, L), (B, M, K)

    def losses(logits, iou):
        k = logits.shape[2]
        g = _at_grid(logits, grid).reshape(b * m, k, grid, grid)
        return L.step_losses(g, iou.reshape(b * m, k), targets, flat_valid, n_obj, **loss_kwargs)

    def actual_iou(logits):  # (B, M, L, L) -> () mean IoU over the real masks
        iou = L.mask_iou(_at_grid(logits, grid), masks)
        return jnp.sum(jnp.where(valid, iou, 0.0)) / n_obj

    # ---- round 0: each mask takes its head (3 masks for a lone point, 1 for a box). Both
    # heads come from one decoder run returning all 4 masks (they differ only in the masks
    # read out), unless `heads` (static) says that every first prompt is of one kind
    coords, labels = _first_tokens(first, num_rounds)
    keys3 = ("loss_mask", "loss_dice", "loss_iou")
    is_box = first.is_box.reshape(b * m)
    per_obj, outputs, prev = {}, {}, None
    if len(heads) == 2:
        all_logits, all_iou = predict(coords, labels, None, None)  # (B, M, 4, L, L), (B, M, 4)
        head_out = {"single": (all_logits[:, :, :1], all_iou[:, :, :1]),
                    "multi": (all_logits[:, :, 1:], all_iou[:, :, 1:])}
    else:
        head_out = {h: predict(coords, labels, None, h == "multi") for h in heads}
    if "single" in heads:
        single_logits, single_iou = head_out["single"]
        ls = losses(single_logits, single_iou)
        per_obj = {key: getattr(ls, key) for key in keys3}
        prev = single_logits[:, :, 0]
        outputs.update(first_single_logits=single_logits[:, :, 0], first_single_iou=single_iou[:, :, 0])
    if "multi" in heads:
        multi_logits, multi_iou = head_out["multi"]
        lm = losses(multi_logits, multi_iou)
        per_obj = {key: jnp.where(is_box, per_obj[key], getattr(lm, key)) if per_obj else getattr(lm, key)
                   for key in keys3}
        best = jnp.argmax(multi_iou, axis=-1)  # (B, M): the highest predicted IoU feeds round 1
        multi_best = jnp.take_along_axis(multi_logits, best[:, :, None, None, None], axis=2)[:, :, 0]
        prev = multi_best if prev is None else jnp.where(first.is_box[..., None, None], prev, multi_best)
        outputs.update(first_multimask_logits=multi_logits, first_multimask_iou=multi_iou)
    sums = {key: per_obj[key].sum() for key in keys3}  # prev: (B, M, L, L)
    metrics = {"iou_round1": actual_iou(prev)}
    outputs = outputs if keep_outputs else None

    if num_rounds > 1:
        def body(carry, xs):
            coords, labels, prev = carry
            r, key = xs
            pred = _at_grid(prev, grid) > 0
            c, lab = next_point(r, key, pred)
            lab = jnp.where(lab < 0, ABSENT, lab)  # no point this round (or none to sample)
            slot = (jnp.arange(num_rounds + 2) == r)[None, None, :]
            coords = jnp.where(slot[..., None], c[:, :, None], coords)
            labels = jnp.where(slot, lab[:, :, None], labels)
            mask_input = prev if mask_prompt_gradient else jax.lax.stop_gradient(prev)
            logits, iou = predict(coords, labels, mask_input[..., None], False)
            s = losses(logits, iou)
            ys = {key: getattr(s, key).sum() for key in ("loss_mask", "loss_dice", "loss_iou")}
            if keep_outputs:
                ys.update(logits=logits[:, :, 0], iou=iou[:, :, 0])
            return (coords, labels, logits[:, :, 0]), ys

        rounds = jnp.arange(1, num_rounds)
        (_, _, prev), ys = jax.lax.scan(body, (coords, labels, prev), (rounds, keys))
        sums = {key: sums[key] + ys[key].sum() for key in sums}
        if keep_outputs:
            outputs.update(logits=ys["logits"], iou=ys["iou"])  # (R-1, B, M, L, L), (R-1, B, M)
    metrics["iou_last"] = actual_iou(prev)
    return sums, metrics, outputs


def _embed(model, params, batch: dict, image_embeddings, train: bool, dropout_rng):
    if image_embeddings is not None:
        return image_embeddings
    args = (batch["image"], batch["image_hw"])
    if train:
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        return model.apply({"params": params}, *args, True, rngs=rngs, method=model.embed_image)
    return model.apply({"params": params}, *args, method=model.embed_image)


def _clean(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """masks, boxes, valid with the padding slots zeroed (finite, empty)."""
    for key in ("masks", "boxes", "valid", "image_hw"):
        if key not in batch:
            raise KeyError(f"SAM batch has no {key!r} (keys: {sorted(batch)})")
    b, m = jnp.shape(batch["valid"])
    shapes = {k: jnp.shape(batch[k]) for k in ("masks", "boxes", "image_hw")}
    g = shapes["masks"][-1]
    if shapes != {"masks": (b, m, g, g), "boxes": (b, m, 4), "image_hw": (b, 2)}:
        raise ValueError(f"SAM batch shapes {shapes} do not match valid {(b, m)}: expected masks (B, M, G, G), "
                         "boxes (B, M, 4), image_hw (B, 2)")
    valid = jnp.asarray(batch["valid"]).astype(bool)
    masks = jnp.asarray(batch["masks"]).astype(bool) & valid[..., None, None]
    boxes = jnp.where(valid[..., None], jnp.asarray(batch["boxes"], jnp.float32), 0.0)
    return masks, boxes, valid


def rollout_loss(model, params, batch: dict, rng: jax.Array, *, num_rounds: int = 11,
                 num_no_point_rounds: int = 2, box_prob: float = 0.5, box_noise_std: float = 0.1,
                 box_noise_max: float = 20.0, focal_weight: float = 20.0, dice_weight: float = 1.0,
                 iou_weight: float = 1.0, train: bool = True, image_embeddings: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None, mask_prompt_gradient: bool = True,
                 supervise_all_iou: bool = False, iou_use_l1_loss: bool = False,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The summed loss of a simulated interactive session per mask.

    model: `Sam`; params: its parameter tree (without the "params" key).
    batch: image (B, S, S, 3) float32 0-255, image_hw (B, 2) int32, masks (B, M, G, G)
      bool, boxes (B, M, 4) float32 XYXY S-frame, valid (B, M) bool (the contract of
      `segjax.data.sam`).
    rng: every random choice (prompt type, points, box noise, no-point rounds); the task
      passes its 'prompts' stream folded with the step.
    train: the image encoder's training mode (drop path, with dropout_rng).
    image_embeddings: (B, h, w, C) precomputed embeddings (decoder-only training); the
      image is then not read.
    Returns: (loss (), metrics: loss_focal, loss_dice, loss_iou (unweighted sums over
      rounds), iou_round1, iou_last (mean IoU at G of the mask fed forward), num_masks).
    """
    check_rounds(num_rounds, num_no_point_rounds)
    if not 0.0 <= box_prob <= 1.0:
        raise ValueError(f"box_prob must be in [0, 1], got {box_prob}")
    masks, boxes, valid = _clean(batch)
    b, m = masks.shape[:2]
    size = model.img_size
    image_hw = jnp.asarray(batch["image_hw"], jnp.int32)
    emb = _embed(model, params, batch, image_embeddings, train, dropout_rng)
    k_first, k_rounds, k_skip = jax.random.split(rng, 3)
    first = sample_first_prompt(k_first, masks, boxes, image_hw, size, box_prob, box_noise_std, box_noise_max)
    skip = sample_no_point_rounds(k_skip, (b, m), num_rounds, num_no_point_rounds)  # (B, M, R-1)

    def next_point(r, key, pred):
        c, lab = ps.sample_error_point(key, pred, masks, image_hw[:, None], size)
        no_point = jnp.take(skip, r - 1, axis=-1)
        return c, jnp.where(no_point, -1, lab)

    weights = dict(loss_mask=focal_weight, loss_dice=dice_weight, loss_iou=iou_weight)
    loss_kwargs = dict(weights=weights, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                       supervise_all_iou=supervise_all_iou, iou_use_l1_loss=iou_use_l1_loss)
    keys = jax.random.split(k_rounds, max(num_rounds - 1, 1))[: num_rounds - 1]
    # a box_prob of 0 or 1 (static) needs only one of round 0's heads
    heads = ("multi",) if box_prob <= 0 else ("single",) if box_prob >= 1 else ("single", "multi")
    sums, metrics, _ = _rollout(model, params, emb, first, next_point, keys, masks, valid,
                                num_rounds=num_rounds, loss_kwargs=loss_kwargs,
                                mask_prompt_gradient=mask_prompt_gradient, keep_outputs=False, heads=heads)
    loss = L.reduce_loss(sums, weights)
    metrics = dict(metrics, loss_focal=sums["loss_mask"], loss_dice=sums["loss_dice"],
                   loss_iou=sums["loss_iou"], num_masks=jnp.sum(valid.astype(jnp.float32)))
    return loss, metrics


def rollout_predictions(model, params, batch: dict, prompts: FixedPrompts, *,
                        image_embeddings: jax.Array | None = None, mask_prompt_gradient: bool = True,
                        **loss_kwargs) -> tuple[dict[str, jax.Array], jax.Array, dict[str, jax.Array]]:
    """The rollout with every prompt given (`FixedPrompts`; R = 1 + points.shape[2]),
    the mask prompts still the model's own previous predictions.

    batch: as `rollout_loss` (image and image_hw unread when image_embeddings is given).
    loss_kwargs: `losses.step_losses` options (weights, focal_alpha, ...).
    Returns: (outputs, loss (), loss sums dict). outputs: first_multimask_logits
      (B, M, 3, L, L), first_multimask_iou (B, M, 3), first_single_logits (B, M, L, L),
      first_single_iou (B, M) (round 0, both heads: a mask uses the 3-mask head for a
      point, the single head for a box), logits (R-1, B, M, L, L), iou (R-1, B, M)
      (rounds 1 .. R-1).
    """
    masks, _, valid = _clean(batch)
    num_rounds = 1 + prompts.points.shape[2]
    emb = _embed(model, params, batch, image_embeddings, False, None)

    def next_point(r, key, pred):
        return (jnp.take(prompts.points, r - 1, axis=2).astype(jnp.float32),
                jnp.take(prompts.point_labels, r - 1, axis=2).astype(jnp.int32))

    keys = jnp.zeros((num_rounds - 1,), jnp.uint32)  # unused: nothing is sampled
    sums, _, outputs = _rollout(model, params, emb, prompts.first, next_point, keys, masks, valid,
                                num_rounds=num_rounds, loss_kwargs=loss_kwargs,
                                mask_prompt_gradient=mask_prompt_gradient, keep_outputs=True)
    return outputs, L.reduce_loss(sums, loss_kwargs.get("weights")), sums
