"""Box and mask heads of Mask R-CNN (torchvision `RoIHeads`), their losses and post-processing.

Legend: B batch, R RoIs per image, S sampled RoIs, C classes (incl. background 0),
M ground-truth instances (padded, valid mask), D detections per image, H/W input size.

Heads (params named after torchvision's state dict; `roi_heads/box_head/fc6` etc.):
  box_head:      `fc6`, `fc7` (TwoMLPHead), or with `box_convs` (v2) `conv{i}` 3x3 +
                 `conv{i}_bn` + ReLU then `fc` (FastRCNNConvFCHead); ViTDet (norm_type
                 "ln"): `conv{i}_ln` LayerNorms instead of `conv{i}_bn`
  box_predictor: `cls_score` (C), `bbox_pred` (4C)
  mask_head:     `conv{0..3}` 3x3 + ReLU (v2: + `conv{i}_bn`); torch `mask_head.{i}.0`, legacy `mask_fcn{i+1}`
  mask_predictor:`conv5_mask` ConvTranspose 2x2 s2 + ReLU, `mask_fcn_logits` 1x1 (C)
RoI features come from `segjax.ops.roi_align.multiscale_roi_align` (MultiScaleRoIAlign,
sampling_ratio 2, aligned=False: box 7x7, mask 14x14) on the four finest FPN levels.

NOTE: the flattened RoI features are (h, w, c) ordered (NHWC); torchvision flattens
(c, h, w). The converter permutes the input rows of `fc6` / `fc` accordingly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax import sharding
from segjax.models.maskrcnn.backbone import FrozenBatchNorm, conv
from segjax.models.maskrcnn.rpn import bce_with_logits, smooth_l1
from segjax.ops import boxes as box_ops
from segjax.ops import matcher
from segjax.ops.nms import batched_nms
from segjax.ops.roi_align import multiscale_roi_align, roi_align_weights

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MASK_CHUNK = 16  # train-time mask head: slots per image run at once (`bucketed_mask_loss`)
BBOX_CLIP = math.log(1000.0 / 16)


class ConvTranspose2x2(nn.Module):
    """torch `ConvTranspose2d(k=2, s=2, p=0)`: each input pixel writes one 2x2 output patch.

    kernel: (2, 2, out, in) = torch weight [in, out, kH, kW] through the 'conv' layout.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, h, w, in) -> (N, 2h, 2w, out)."""
        init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        k = self.param("kernel", init, (2, 2, self.features, x.shape[-1]), jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.einsum("nhwc,yxoc->nhywxo", x.astype(self.dtype), k.astype(self.dtype))
        n, h, _, w, _, o = y.shape
        return y.reshape(n, 2 * h, 2 * w, o) + b.astype(self.dtype)  # (N, 2h, 2w, out)


def conv_relu_stack(x: jax.Array, widths: Sequence[int], norm: bool, bn_eps: float,
                    dtype: jnp.dtype, norm_type: str = "bn") -> jax.Array:
    """3x3 `conv{i}` [+ norm] + ReLU per width, created in the calling module.

    x: (N, h, w, C) -> (N, h, w, widths[-1]) (x itself for no widths); kaiming-normal
    fan-out init as torchvision's heads. norm_type "bn": frozen BatchNorm `conv{i}_bn`
    (torchvision v2); "ln": channel LayerNorm `conv{i}_ln`, eps 1e-6 (ViTDet).
    """
    if norm and norm_type not in ("bn", "ln"):
        raise ValueError(f"head norm_type must be 'bn' or 'ln', got {norm_type!r}")
    kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    for i, c in enumerate(widths):
        x = conv(c, 3, bias=not norm, name=f"conv{i}", dtype=dtype, kernel_init=kaiming)(x)
        if norm and norm_type == "ln":
            x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=f"conv{i}_ln")(x)
        elif norm:
            x = FrozenBatchNorm(bn_eps, name=f"conv{i}_bn")(x)
        x = nn.relu(x)
    return x


class BoxHead(nn.Module):
    """TwoMLPHead (`fc6`, `fc7`), or with `convs` FastRCNNConvFCHead (`conv{i}` 3x3 [+
    `conv{i}_bn`] + ReLU, then `fc` + ReLU). (N, 7, 7, F) -> (N, representation_size)."""

    representation_size: int = 1024
    convs: Sequence[int] = ()
    norm: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    norm_type: str = "bn"  # "ln": ViTDet's LayerNorm heads

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv_relu_stack(x, self.convs, self.norm, self.bn_eps, self.dtype, self.norm_type)
        x = x.reshape(x.shape[0], -1)  # (N, 7*7*F), (h, w, c) order
        if self.convs:
            return nn.relu(nn.Dense(self.representation_size, name="fc", dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(self.representation_size, name="fc6", dtype=self.dtype)(x))
        return nn.relu(nn.Dense(self.representation_size, name="fc7", dtype=self.dtype)(x))


class BoxPredictor(nn.Module):
    """FastRCNNPredictor: `cls_score` (C) and `bbox_pred` (4C, class-major)."""

    num_classes: int = 91
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cls = nn.Dense(self.num_classes, name="cls_score", dtype=self.dtype)(x)
        reg = nn.Dense(4 * self.num_classes, name="bbox_pred", dtype=self.dtype)(x)
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


class MaskHead(nn.Module):
    """MaskRCNNHeads: `conv{i}` 3x3 [+ `conv{i}_bn`] + ReLU (torch `mask_head.{i}.0` /
    legacy `mask_fcn{i+1}`)."""

    layers: Sequence[int] = (256, 256, 256, 256)
    norm: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    norm_type: str = "bn"  # "ln": ViTDet's LayerNorm heads

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv_relu_stack(x, self.layers, self.norm, self.bn_eps, self.dtype, self.norm_type)
        return x


class MaskPredictor(nn.Module):
    """`conv5_mask` (ConvTranspose 2x2 s2) + ReLU, `mask_fcn_logits` 1x1 (C)."""

    num_classes: int = 91
    dim_reduced: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = nn.relu(ConvTranspose2x2(self.dim_reduced, self.dtype, name="conv5_mask")(x))
        return conv(self.num_classes, 1, bias=True, name="mask_fcn_logits", dtype=self.dtype,
                    kernel_init=kaiming)(x).astype(jnp.float32)


class RoIHeads(nn.Module):
    """Box head + predictor and mask head + predictor; called through `box` and `mask`."""

    num_classes: int = 91
    representation_size: int = 1024
    box_convs: Sequence[int] = ()  # v2: (256, 256, 256, 256)
    mask_layers: Sequence[int] = (256, 256, 256, 256)
    mask_dim_reduced: int = 256
    norm: bool = False  # v2: BatchNorm after every head conv
    bn_eps: float = 1e-5
    box_pool_size: int = 7
    mask_pool_size: int = 14
    sampling_ratio: int = 2
    aligned: bool = False
    dtype: jnp.dtype = jnp.float32
    norm_type: str = "bn"  # with norm: "bn" frozen BatchNorm (v2), "ln" LayerNorm (ViTDet)

    def setup(self):
        self.box_head = BoxHead(self.representation_size, tuple(self.box_convs), self.norm, self.bn_eps,
                                self.dtype, self.norm_type)
        self.box_predictor = BoxPredictor(self.num_classes, self.dtype)
        self.mask_head = MaskHead(tuple(self.mask_layers), self.norm, self.bn_eps, self.dtype, self.norm_type)
        self.mask_predictor = MaskPredictor(self.num_classes, self.mask_dim_reduced, self.dtype)

    def _pool(self, feats, boxes, image_hw, size):
        # NOTE: torchvision infers the level scales from the largest *unpadded* image size
        # of the batch, we from the padded input size (static): 2 ** round(log2(feat / img))
        # agrees unless an image is much smaller than the 32-px padding step.
        boxes = jax.lax.stop_gradient(boxes)
        x = multiscale_roi_align(feats[:4], boxes, image_hw, (size, size), self.sampling_ratio,
                                 self.aligned)  # (B, R, size, size, F)
        return x.reshape(-1, *x.shape[2:]).astype(self.dtype)  # (B*R, size, size, F)

    def box(self, feats: list[jax.Array], boxes: jax.Array, image_hw: tuple[int, int]
            ) -> tuple[jax.Array, jax.Array]:
        """feats: FPN levels [(B, H_l, W_l, F)] (the first four are pooled); boxes:
        (B, R, 4) XYXY input px; image_hw: static (H, W) of the padded input (sets the
        level scales). Returns class_logits (B, R, C), box_deltas (B, R, 4C) float32."""
        b, r = boxes.shape[:2]
        x = self.box_head(self._pool(feats, boxes, image_hw, self.box_pool_size))
        cls, reg = self.box_predictor(x)
        return cls.reshape(b, r, -1), reg.reshape(b, r, -1)

    def mask(self, feats: list[jax.Array], boxes: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
        """boxes: (B, R, 4) -> mask logits (B, R, 2*pool, 2*pool, C) float32 (28x28 by default)."""
        return self.mask_from_pooled(self.mask_pooled(feats, boxes, image_hw))

    def mask_pooled(self, feats: list[jax.Array], boxes: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
        """The mask head's RoI features (no parameters): boxes (B, R, 4) -> (B, R, pool, pool, F)."""
        x = self._pool(feats, boxes, image_hw, self.mask_pool_size)
        return x.reshape(*boxes.shape[:2], *x.shape[1:])

    def mask_from_pooled(self, x: jax.Array) -> jax.Array:
        """Mask logits (B, R, 2*pool, 2*pool, C) float32 of RoI features x (B, R, pool, pool, F)."""
        b, r = x.shape[:2]
        x = self.mask_predictor(self.mask_head(x.reshape(b * r, *x.shape[2:])))
        return x.reshape(b, r, *x.shape[1:])

    def __call__(self, feats, boxes, image_hw):
        """Both heads on the same boxes (used for init)."""
        return self.box(feats, boxes, image_hw), self.mask(feats, boxes, image_hw)


# ----------------------------------------------------------------------------- inference


def box_postprocess(class_logits: jax.Array, box_deltas: jax.Array, proposals: jax.Array,
                    proposal_valid: jax.Array, image_hw: jax.Array, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 100,
                    num_candidates: int = 4000, weights: Sequence[float] = BOX_WEIGHTS
                    ) -> dict[str, jax.Array]:
    """torchvision `postprocess_detections` with static shapes.

    Softmax, per-class decode, clip, drop background, score > score_thresh, remove
    boxes smaller than 1e-2, NMS per class, keep the top `detections_per_img`.
    NOTE: the NMS runs on the `num_candidates` best-scoring (class, box) pairs that pass
    the thresholds (torchvision: all of them). The results are identical whenever at
    most `num_candidates` pairs pass (reported as `num_passing`); beyond that only
    pairs scoring below all those candidates can be missed.

    Args:
      class_logits: (B, R, C); box_deltas: (B, R, 4C); proposals: (B, R, 4);
      proposal_valid: (B, R) bool; image_hw: (B, 2) resized image sizes.
    Returns:
      dict(boxes (B, D, 4), scores (B, D), labels (B, D) int32, valid (B, D) bool,
      num_passing (B,) int32), detections by decreasing score.
    """
    b, r, c = class_logits.shape
    scores = jax.nn.softmax(class_logits, axis=-1)
    deltas = box_deltas.reshape(b, r, c, 4)
    boxes = box_ops.decode_boxes(deltas, jnp.broadcast_to(proposals[:, :, None, :], deltas.shape),
                                 weights, BBOX_CLIP)  # (B, R, C, 4)
    labels = jnp.tile(jnp.arange(1, c, dtype=jnp.int32), r)  # (R*(C-1),), (r, c) order

    def per_image(boxes, scores, pvalid, hw):
        boxes = box_ops.clip_boxes(boxes, hw)[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        valid = (jnp.repeat(pvalid, c - 1) & (scores > score_thresh)
                 & box_ops.remove_small_boxes(boxes, 1e-2))
        k = min(num_candidates, scores.shape[0])
        _, idx = jax.lax.top_k(jnp.where(valid, scores, -1.0), k)
        keep, kvalid = batched_nms(boxes[idx], scores[idx], labels[idx], nms_thresh,
                                       detections_per_img, valid[idx])
        sel = idx[keep]
        return (jnp.where(kvalid[:, None], boxes[sel], 0.0), jnp.where(kvalid, scores[sel], 0.0),
                jnp.where(kvalid, labels[sel], 0), kvalid, valid.sum().astype(jnp.int32))

    boxes, scores, labels, valid, passing = jax.vmap(per_image)(boxes, scores, proposal_valid, image_hw)
    return {"boxes": boxes, "scores": scores, "labels": labels, "valid": valid, "num_passing": passing}


def mask_probs(mask_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, D, h, w, C) logits, (B, D) labels -> (B, D, h, w) sigmoid of the labelled class."""
    picked = jnp.take_along_axis(mask_logits, labels[:, :, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked)


# ----------------------------------------------------------------------------- training


def select_training_samples(proposals: jax.Array, proposal_valid: jax.Array, gt_boxes: jax.Array,
                            gt_labels: jax.Array, gt_valid: jax.Array, rng: jax.Array,
                            fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                            batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                            weights: Sequence[float] = BOX_WEIGHTS, mask_rois: int | None = None
                            ) -> dict[str, jax.Array]:
    """torchvision `select_training_samples` with static shapes.

    The gt boxes are appended to the proposals, proposals matched with Matcher(0.5, 0.5),
    the balanced sampler picks S = batch_size_per_image of them; the slots hold the
    sampled RoIs in increasing proposal index (torchvision's `where(pos | neg)` order).

    Args:
      proposals: (B, P, 4); proposal_valid: (B, P); gt_boxes: (B, M, 4);
      gt_labels: (B, M) int; gt_valid: (B, M) bool; rng: sampler key.
    Returns dict of
      rois (B, S, 4), labels (B, S) int32 (0 background), matched_idx (B, S) int32,
      regression_targets (B, S, 4), valid (B, S) bool,
      mask_slots (B, Sp) int32 indices into S of the positive RoIs (positives first,
      in random order), mask_valid (B, Sp). Sp = `mask_rois`, default
      int(S * positive_fraction): every positive, as torchvision's mask head sees them.
      NOTE: a smaller `mask_rois` trains the mask head on a random subset of at most
      that many positives per image (an unbiased estimate of torchvision's mask loss
      at a fraction of the cost: the mask head is the dearest part of a train step).
    """
    num_pos_slots = int(batch_size_per_image * positive_fraction) if mask_rois is None else int(mask_rois)

    def per_image(props, pvalid, gt, gl, gv, key):
        boxes = jnp.concatenate([props, gt], 0)  # (P+M, 4)
        valid = jnp.concatenate([pvalid, gv], 0)
        has_gt = gv.any()
        matched = matcher.match(box_ops.box_iou(gt, boxes), gv, fg_iou_thresh, bg_iou_thresh, False)
        midx = jnp.where(has_gt, jnp.maximum(matched, 0), 0)
        labels = jnp.where(matched >= 0, gl[midx], jnp.where(matched == -1, 0, -1))
        labels = jnp.where(has_gt, labels, 0)
        labels = jnp.where(valid, labels, -1).astype(jnp.int32)  # padding is never sampled
        samp = jnp.where(labels > 0, 1, labels)  # 1 fg, 0 bg, -1 ignore
        key, key_mask = jax.random.split(key)
        pos, neg = matcher.sample_balanced(samp, batch_size_per_image, positive_fraction, key)
        chosen = pos | neg
        order = jnp.argsort(~chosen, stable=True)[:batch_size_per_image]
        slot_valid = chosen[order]
        rois = boxes[order]
        lab = jnp.where(slot_valid, labels[order], 0)
        m = midx[order]
        gt_for = jnp.where(has_gt, gt[m].T, 0.0).T  # torchvision: a zero box without gt
        targets = box_ops.encode_boxes(gt_for, rois, weights)
        pos_slot = slot_valid & (lab > 0)
        shuffle = jnp.where(pos_slot, jax.random.uniform(key_mask, pos_slot.shape), 2.0)
        slots = jnp.argsort(shuffle)[:num_pos_slots].astype(jnp.int32)
        return rois, lab, m.astype(jnp.int32), targets, slot_valid, slots, pos_slot[slots]

    keys = jax.random.split(rng, proposals.shape[0])
    out = jax.vmap(per_image)(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, keys)
    names = ("rois", "labels", "matched_idx", "regression_targets", "valid", "mask_slots", "mask_valid")
    return dict(zip(names, (jax.lax.stop_gradient(x) for x in out)))


def fastrcnn_loss(class_logits: jax.Array, box_deltas: jax.Array, labels: jax.Array,
                  regression_targets: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict]:
    """torchvision `fastrcnn_loss`: CE over the sampled RoIs of the batch + smooth-L1
    (beta 1/9) of the gt class's deltas on positives, summed / number of sampled RoIs.

    class_logits (B, S, C); box_deltas (B, S, 4C); labels (B, S); targets (B, S, 4);
    valid (B, S) -> (loss, {'loss_classifier', 'loss_box_reg'}).
    """
    b, s, c = class_logits.shape
    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    logp = jax.nn.log_softmax(class_logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    loss_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / n
    deltas = jnp.take_along_axis(box_deltas.reshape(b, s, c, 4), labels[..., None, None], axis=2)[:, :, 0]
    pos = valid & (labels > 0)
    targets = jnp.where(pos[..., None], regression_targets, 0.0)  # no inf/NaN into the gradient
    box = smooth_l1(deltas - targets, 1.0 / 9).sum(-1)
    loss_box = jnp.sum(jnp.where(pos, box, 0.0)) / n
    return loss_cls + loss_box, {"loss_classifier": loss_cls, "loss_box_reg": loss_box}


def project_masks_on_boxes(gt_masks: jax.Array, boxes: jax.Array, matched_idx: jax.Array,
                           size: int = 28, chunk: int = 32) -> jax.Array:
    """torchvision `project_masks_on_boxes`: `roi_align(gt_masks[:, None], rois, (size,
    size), 1.0)` (sampling_ratio -1: adaptive, aligned=False) of each RoI's matched gt mask.

    The taps are RoIAlign's own (`roi_align_weights`: A_y @ mask @ A_x^T with one matrix
    per axis), for exactly one mask per RoI, in chunks of `chunk` RoIs, so memory stays
    O(chunk * H * W) whatever M and the box sizes. Exact for every box, as roi_align.

    The RoIs of the batch are chunked in image order; under a batch split over devices
    (`sharding.batch_shards`) those of each shard are chunked on their own and a loop
    step takes one chunk of every shard, so each device projects its own images' RoIs
    (chunks of the whole batch's RoIs make XLA gather every chunk's boxes and masks onto
    every device, which then projects all of them).
    gt_masks (B, M, H, W); boxes (B, R, 4); matched_idx (B, R) -> (B, R, size, size) float32.
    """
    b, m, h, w = gt_masks.shape
    n = sharding.current_batch_shards(b)
    per = b // n * boxes.shape[1]  # RoIs of a shard
    chunk = max(1, min(chunk, per))
    pad = (-per) % chunk  # padding RoIs: box 0, mask 0 of the shard's first image, dropped below

    def chunks(x):  # (B, R, ...) -> (per / chunk, n, chunk, ...): step i, chunk i of every shard
        x = x.reshape(n, per, *x.shape[2:])
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(n, -1, chunk, *x.shape[2:]), 1, 0)

    masks = gt_masks.reshape(n, b // n, m, h, w)

    def one(args):  # a chunk of every shard, not vmapped: roi_align_weights picks its window per step
        bi, box, mi = args  # (n, chunk) image in the shard, (n, chunk, 4), (n, chunk)
        a_y, a_x = roi_align_weights(box.reshape(-1, 4), (h, w), size)  # (n chunk, size, H), (.., W)
        mask = jax.vmap(lambda g, i, j: g[i, j])(masks, bi, mi).reshape(-1, h, w).astype(jnp.float32)
        hp = jax.lax.Precision.HIGHEST  # targets in fp32 on TPU too
        out = jnp.matmul(jnp.matmul(a_y, mask, precision=hp), jnp.swapaxes(a_x, 1, 2), precision=hp)
        return out.reshape(n, chunk, size, size)

    bidx = jnp.broadcast_to((jnp.arange(b) % (b // n))[:, None], boxes.shape[:2])
    out = jax.lax.map(one, (chunks(bidx), chunks(boxes), chunks(matched_idx)))  # (per / chunk, n, chunk, ..)
    return jnp.moveaxis(out, 0, 1).reshape(n, -1, size, size)[:, :per].reshape(b, -1, size, size)


def maskrcnn_loss(mask_logits: jax.Array, rois: jax.Array, labels: jax.Array, matched_idx: jax.Array,
                  valid: jax.Array, gt_masks: jax.Array) -> tuple[jax.Array, dict]:
    """torchvision `maskrcnn_loss`: mean per-pixel BCE of the gt class's mask logits
    against the gt mask roi-aligned into the RoI (zero when there is no positive).

    mask_logits (B, R, 28, 28, C); rois (B, R, 4); labels, matched_idx (B, R); valid (B, R);
    gt_masks (B, M, H, W) -> (loss, {'loss_mask'}).
    """
    loss = _mask_loss_sum(mask_logits, rois, labels, matched_idx, valid, gt_masks) / _count(valid)
    return loss, {"loss_mask": loss}


def _count(valid: jax.Array) -> jax.Array:
    return jnp.maximum(valid.sum(), 1).astype(jnp.float32)


def _mask_loss_sum(mask_logits, rois, labels, matched_idx, valid, gt_masks) -> jax.Array:
    """Sum over the valid RoIs of `maskrcnn_loss`'s per-RoI mean BCE (same arguments)."""
    size = mask_logits.shape[2]
    targets = jax.lax.stop_gradient(project_masks_on_boxes(gt_masks, rois, matched_idx, size))
    logits = jnp.take_along_axis(mask_logits, labels[:, :, None, None, None], axis=-1)[..., 0]
    per_roi = bce_with_logits(logits, targets).mean(axis=(-1, -2))
    return jnp.sum(jnp.where(valid, per_roi, 0.0))


def bucketed_mask_loss(head_fn: Callable[..., jax.Array], params: Any, pool_fn: Callable[..., jax.Array],
                       feats: Any, rois: jax.Array, labels: jax.Array, matched_idx: jax.Array, valid: jax.Array,
                       gt_masks: jax.Array, buckets: Sequence[int], chunk: int | None = MASK_CHUNK) -> jax.Array:
    """`maskrcnn_loss` of `head_fn(params, pool_fn(feats, rois))` run on only the first k slots.

    The valid slots must come first in every image (`select_training_samples` puts the
    positives first); k is the smallest of the static `buckets` (ascending, the last
    = R) that holds every image's valid slots, chosen at run time (`lax.switch`).
    The padding slots add exactly zero to the loss and its gradient, so the value and
    the gradients are those of running the head on all R slots (torchvision runs it on
    the positives alone).

    The gradient w.r.t. params and feats is computed in the same branch as the loss
    (one `jax.vjp` per bucket) and only scaled in the backward pass: differentiating
    through `lax.switch` would instead make every branch return zero-filled copies of
    the other branches' residuals (hundreds of MB for the largest bucket).

    A bucket larger than `chunk` slots (a multiple of it) pools and runs the head
    `chunk` slots per image at a time (`lax.scan`, summing the losses and the params'
    gradients, stacking the RoI features' gradients), then takes the pooling's
    gradient w.r.t. feats once for the bucket: the activations alive at once are
    those of `chunk` slots, plus the bucket's RoI-feature gradient (XLA plans memory
    for every branch, and the largest bucket's 256 RoIs (2 images) of 28x28x256
    activations would otherwise set the train step's peak even when a small bucket
    runs). None: every bucket in one piece.

    head_fn(params, pooled (B, k, h, w, F)) -> (B, k, 28, 28, C) logits; pool_fn(feats,
    rois (B, k, 4)) -> pooled, linear in feats; rois (B, R, 4); labels, matched_idx
    (B, R) int; valid (B, R) bool; gt_masks (B, M, H, W) -> () loss.
    """
    buckets = tuple(buckets)
    if list(buckets) != sorted(buckets) or buckets[-1] != rois.shape[1]:
        raise ValueError(f"buckets must ascend to the slot count {rois.shape[1]}, got {buckets}")
    index = jnp.searchsorted(jnp.asarray(buckets), valid.sum(axis=1).max())
    index = jnp.clip(index, 0, len(buckets) - 1)
    rest = (rois, labels, matched_idx, valid, gt_masks)

    def loss_k(k, params, feats):
        logits = head_fn(params, pool_fn(feats, rois[:, :k]))
        return maskrcnn_loss(logits, rois[:, :k], labels[:, :k], matched_idx[:, :k], valid[:, :k], gt_masks)[0]

    @jax.custom_vjp
    def loss(params, feats, *_):
        return jax.lax.switch(index, [functools.partial(loss_k, k) for k in buckets], params, feats)

    def chunk_loss(n, params, pooled, r, lab, mi, v):  # the loss terms of some slots
        return _mask_loss_sum(head_fn(params, pooled), r, lab, mi, v, gt_masks) / n

    def loss_fwd(params, feats, *_):
        def value_and_grads(k, params, feats):
            n = _count(valid[:, :k])
            args = (rois[:, :k], labels[:, :k], matched_idx[:, :k], valid[:, :k])
            if chunk is None or k <= chunk or k % chunk:
                value, vjp = jax.vjp(lambda p, f: chunk_loss(n, p, pool_fn(f, args[0]), *args), params, feats)
                return value, vjp(jnp.ones_like(value))

            def step(acc, xs):  # one chunk of slots of every image: its loss and gradients
                value, vjp = jax.vjp(lambda p, x: chunk_loss(n, p, x, *xs), params, pool_fn(feats, xs[0]))
                g_params, g_pooled = vjp(jnp.ones_like(value))
                return jax.tree_util.tree_map(jnp.add, acc, (value, g_params)), g_pooled

            split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], k // chunk, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
            zeros = jax.tree_util.tree_map(jnp.zeros_like, (n, params))
            (value, g_params), g_pooled = jax.lax.scan(step, zeros, tuple(split(a) for a in args))
            g_pooled = jnp.moveaxis(g_pooled, 0, 1)  # (B, k / chunk, chunk, h, w, F)
            _, pool_vjp = jax.vjp(lambda f: pool_fn(f, args[0]), feats)
            (g_feats,) = pool_vjp(g_pooled.reshape(g_pooled.shape[0], k, *g_pooled.shape[3:]))
            return value, (g_params, g_feats)
        return jax.lax.switch(index, [functools.partial(value_and_grads, k) for k in buckets], params, feats)

    def loss_bwd(grads, g):
        return (*jax.tree_util.tree_map(lambda x: x * g.astype(x.dtype), grads), *(None,) * len(rest))

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(params, feats, *rest)
