"""Region proposal network as torchvision's `RPNHead` + `RegionProposalNetwork`, static shapes.

Legend: B batch, N anchors (all levels), A anchors per location, K pre-NMS candidates,
P proposals (post-NMS top-n), M ground-truth instances (padded, with a valid mask).

Proposal selection (`filter_proposals`) follows torchvision step by step: top-k
objectness logits per level (k = min(pre_nms_top_n, level size)), decode with
BoxCoder(1, 1, 1, 1), sigmoid, clip to the image, drop boxes smaller than `min_size`
and scores below `score_thresh`, NMS per level (batched NMS), keep `post_nms_top_n` by
decreasing score. Where torchvision returns fewer boxes, the static result is padded
(zero boxes, `valid` False).

`rpn_loss` is torchvision's `RegionProposalNetwork.compute_loss` on the anchors labelled
by `Matcher(0.7, 0.3, allow_low_quality_matches=True)` and sampled by the balanced
sampler (256 per image, half positive): BCE-with-logits averaged over the sampled
anchors of the batch, smooth-L1 (beta 1/9) over the positives summed and divided by
the number of sampled anchors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.detection.backbone import conv
from segjax.ops import boxes as box_ops
from segjax.ops import matcher
from segjax.ops.nms import batched_nms

BBOX_CLIP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


class RPNHead(nn.Module):
    """Shared over levels: `conv_depth` x (3x3 conv + ReLU), then 1x1 `cls_logits` (A) and
    `bbox_pred` (4A). torch init: normal(std=0.01), zero bias."""

    num_anchors: int = 3
    conv_depth: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """feats: [(B, H_l, W_l, C)] -> objectness [(B, H_l*W_l*A)], deltas [(B, H_l*W_l*A, 4)]."""
        init = nn.initializers.normal(0.01)
        c = feats[0].shape[-1]
        convs = [conv(c, 3, bias=True, name=f"conv_{i}", dtype=self.dtype, kernel_init=init)
                 for i in range(self.conv_depth)]
        cls = conv(self.num_anchors, 1, bias=True, name="cls_logits", dtype=self.dtype, kernel_init=init)
        reg = conv(4 * self.num_anchors, 1, bias=True, name="bbox_pred", dtype=self.dtype, kernel_init=init)
        logits, deltas = [], []
        for f in feats:
            t = f
            for cv in convs:
                t = nn.relu(cv(t))
            b = f.shape[0]
            # torch permute_and_flatten: (B, A*C, H, W) -> (B, H*W*A, C); NHWC already is (H, W, A)
            logits.append(cls(t).astype(jnp.float32).reshape(b, -1))
            deltas.append(reg(t).astype(jnp.float32).reshape(b, -1, 4))
        return logits, deltas


def filter_proposals(objectness: jax.Array, proposals: jax.Array, level_sizes: Sequence[int],
                     image_hw: jax.Array, pre_nms_top_n: int, post_nms_top_n: int,
                     nms_thresh: float = 0.7, min_size: float = 1e-3,
                     score_thresh: float = 0.0) -> dict[str, jax.Array]:
    """Selects the proposals of each image (torchvision `filter_proposals`).

    Args:
      objectness: (B, N) logits; proposals: (B, N, 4) decoded boxes, both with levels
        concatenated in `level_sizes` order.
      image_hw: (B, 2) int32 size of each resized image inside the padding.
    Returns:
      dict(boxes (B, P, 4), scores (B, P) sigmoid objectness, valid (B, P) bool), in
      decreasing score order, P = post_nms_top_n.
    """
    objectness = jax.lax.stop_gradient(objectness)
    proposals = jax.lax.stop_gradient(proposals)
    idx, lvl, off = [], [], 0
    for level, n in enumerate(level_sizes):
        k = min(pre_nms_top_n, n)
        _, top = jax.lax.top_k(objectness[:, off:off + n], k)
        idx.append(top + off)
        lvl.append(jnp.full((k,), level, jnp.int32))
        off += n
    idx = jnp.concatenate(idx, axis=1)  # (B, K)
    levels = jnp.concatenate(lvl)  # (K,)
    scores = jax.nn.sigmoid(jnp.take_along_axis(objectness, idx, axis=1))
    boxes = jnp.take_along_axis(proposals, idx[..., None], axis=1)  # (B, K, 4)

    # torchvision batched_nms: per-class NMS above 1000 boxes on CPU, the offset trick below
    method = "class" if idx.shape[1] > 1000 else "offset"

    def per_image(boxes, scores, hw):
        boxes = box_ops.clip_boxes(boxes, hw)
        valid = box_ops.remove_small_boxes(boxes, min_size) & (scores >= score_thresh)
        keep, kvalid = batched_nms(boxes, scores, levels, nms_thresh, post_nms_top_n, valid, method)
        kept = jnp.where(kvalid[:, None], boxes[keep], 0.0)
        return kept, jnp.where(kvalid, scores[keep], 0.0), kvalid

    boxes, scores, valid = jax.vmap(per_image)(boxes, scores, image_hw)
    return {"boxes": boxes, "scores": scores, "valid": valid}


# ----------------------------------------------------------------------------- losses


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
    """Elementwise torch `F.smooth_l1_loss(reduction='none')` of the difference x."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise torch `F.binary_cross_entropy_with_logits(reduction='none')`."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def label_anchors(anchors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                  fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3) -> tuple[jax.Array, jax.Array]:
    """torchvision `assign_targets_to_anchors` for one image.

    anchors (N, 4), gt_boxes (M, 4), gt_valid (M,) ->
      labels (N,) int32: 1 foreground, 0 background, -1 ignored;
      matched_gt (N, 4): the matched gt box (gt 0 / zeros where not foreground).
    An image without valid gt labels every anchor background, as torchvision does.
    """
    iou = box_ops.box_iou(gt_boxes, anchors)  # (M, N)
    matched = matcher.match(iou, gt_valid, fg_iou_thresh, bg_iou_thresh, True)
    labels = jnp.where(matched >= 0, 1, jnp.where(matched == -2, -1, 0)).astype(jnp.int32)
    labels = jnp.where(gt_valid.any(), labels, 0)
    matched_gt = gt_boxes[jnp.maximum(matched, 0)]
    return labels, matched_gt


def rpn_loss(objectness: jax.Array, deltas: jax.Array, anchors: jax.Array, gt_boxes: jax.Array,
             gt_valid: jax.Array, rng: jax.Array, fg_iou_thresh: float = 0.7,
             bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
             positive_fraction: float = 0.5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RPN objectness + box-regression loss (torchvision `compute_loss`).

    Args:
      objectness: (B, N) logits; deltas: (B, N, 4) predicted deltas; anchors: (N, 4).
      gt_boxes: (B, M, 4) XYXY in input px; gt_valid: (B, M) bool.
      rng: key for the balanced sampler (one split per image).
    Returns:
      (loss_objectness + loss_rpn_box_reg, metrics with both terms and sample counts).
    """
    labels, matched_gt = jax.vmap(label_anchors, in_axes=(None, 0, 0, None, None))(
        anchors, gt_boxes, gt_valid, fg_iou_thresh, bg_iou_thresh)
    keys = jax.random.split(rng, labels.shape[0])
    pos, neg = jax.vmap(lambda lab, k: matcher.sample_balanced(
        lab, batch_size_per_image, positive_fraction, k))(labels, keys)
    sampled = pos | neg
    targets = box_ops.encode_boxes(matched_gt, jnp.broadcast_to(anchors, matched_gt.shape), RPN_WEIGHTS)
    n = jnp.maximum(sampled.sum(), 1).astype(jnp.float32)
    obj = bce_with_logits(objectness, pos.astype(jnp.float32))
    loss_obj = jnp.sum(jnp.where(sampled, obj, 0.0)) / n
    # NOTE: non-positive anchors may hold inf targets (padded zero gt boxes); zero them so
    # that the masked-out branch of the loss cannot put NaN into the gradient.
    targets = jnp.where(pos[..., None], jax.lax.stop_gradient(targets), 0.0)
    box = smooth_l1(deltas - targets, 1.0 / 9).sum(-1)
    loss_box = jnp.sum(jnp.where(pos, box, 0.0)) / n
    metrics = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box,
               "rpn_num_pos": pos.sum() / labels.shape[0], "rpn_num_sampled": sampled.sum() / labels.shape[0]}
    return loss_obj + loss_box, metrics
