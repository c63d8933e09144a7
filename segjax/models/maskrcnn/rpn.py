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

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import sharding
from segjax.models.maskrcnn.backbone import conv, conv2d
from segjax.ops import boxes as box_ops
from segjax.ops import matcher
from segjax.ops.nms import batched_nms

BBOX_CLIP = math.log(1000.0 / 16)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` over the last axis of a batch-leading x (B, ..., N) float -> values, indices
    (B, ..., k): the k largest in decreasing order, ties by lower index first.

    With the batch split over devices (`sharding.batch_shards`) it runs the sort form
    (`top_k_sorted`): XLA's SPMD partitioner does not split the TopK op over its batch
    axes, so it all-gathers the batch and every device selects every image's top k,
    while a sort over the last axis stays on each device. On one device `lax.top_k`
    (on CPU a selection far cheaper than the full sort).
    """
    if sharding.current_batch_shards(x.shape[0]) > 1:
        return top_k_sorted(x, k)
    return jax.lax.top_k(x, k)


def top_k_sorted(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` as a sort: top_k(x) = sort by (-x, index)[:k] in float total order.

    The key is XLA's TopK comparator (the float bits mapped to a signed int that orders
    them totally: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN), bitwise-negated to
    sort descending; the sort is stable, so ties keep the lower index first, and NaNs,
    signed zeros and ties land exactly where `lax.top_k` puts them. (One int key with
    the positions as payload sorts faster than two keys or the values as a third operand.)
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    _, idx = jax.lax.sort((~key, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    idx = idx[..., :k]
    return jnp.take_along_axis(x, idx, axis=-1), idx


def _head_dense(f, w0, b0, wc, bc, wr, br):
    """conv_0 3x3 + ReLU, then the 1x1 cls_logits / bbox_pred, on one (B, H, W, C) level."""
    t = nn.relu(conv2d(f, w0, 1, 1) + b0)
    return conv2d(t, wc, 1, 0) + bc, conv2d(t, wr, 1, 0) + br


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def rpn_head_level(f: jax.Array, w0: jax.Array, b0: jax.Array, wc: jax.Array, bc: jax.Array,
                   wr: jax.Array, br: jax.Array, max_locations: int) -> tuple[jax.Array, jax.Array]:
    """The one-conv RPN head on one level: f (B, H, W, C) -> logits (B, H, W, A), deltas
    (B, H, W, 4A); w0 (3, 3, C, C), wc (1, 1, C, A), wr (1, 1, C, 4A) and their biases.

    The backward pass is exact and sparse when at most `max_locations` positions per
    image receive a nonzero gradient, as in training, where the RPN loss reaches only
    the sampled anchors (<= 256 per image, torchvision's compute_loss): it recomputes
    the head at those positions from their 3x3 input patches and scatters the input
    gradient back, instead of a dense backward over every position of every level
    (positions with a zero gradient add exactly zero). Otherwise (`lax.cond`) it runs
    the dense backward.
    """
    return _head_dense(f, w0, b0, wc, bc, wr, br)


def _head_fwd(f, w0, b0, wc, bc, wr, br, max_locations):
    return _head_dense(f, w0, b0, wc, bc, wr, br), (f, w0, b0, wc, bc, wr, br)


def _head_sparse_bwd(k, res, g_cls, g_reg, nz):
    f, w0, b0, wc, bc, wr, br = res
    b, h, w, c = f.shape
    _, idx = top_k(nz.astype(jnp.float32), k)  # (B, K) positions, the nonzero ones first
    ky, kx = np.divmod(np.arange(9), 3)
    taps = (idx // w)[..., None] * (w + 2) + (idx % w)[..., None] + (ky * (w + 2) + kx)  # (B, K, 9) in the padded map
    fp = jnp.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, -1, c)  # (B, (H+2)(W+2), C)
    patches = jax.vmap(lambda x, t: x[t])(fp, taps.reshape(b, -1)).reshape(b, k, 9 * c)  # (kh, kw, c) order
    w0m = w0.reshape(9 * c, -1)
    pre = patches @ w0m + b0  # (B, K, C) conv_0 pre-activation at the K positions
    t = nn.relu(pre)
    gl = jnp.take_along_axis(g_cls.reshape(b, h * w, -1), idx[..., None], axis=1)  # (B, K, A)
    gd = jnp.take_along_axis(g_reg.reshape(b, h * w, -1), idx[..., None], axis=1)  # (B, K, 4A)
    dwc = jnp.einsum("bkc,bka->ca", t, gl).reshape(wc.shape)
    dwr = jnp.einsum("bkc,bka->ca", t, gd).reshape(wr.shape)
    dt = gl @ wc.reshape(c, -1).T + gd @ wr.reshape(c, -1).T
    dpre = jnp.where(pre > 0, dt, 0.0)
    dw0 = jnp.einsum("bkp,bko->po", patches, dpre).reshape(w0.shape)
    dpatch = (dpre @ w0m.T).reshape(b, k * 9, c)
    dfp = jax.vmap(lambda t, d: jnp.zeros(fp.shape[1:], d.dtype).at[t].add(d))(taps.reshape(b, -1), dpatch)
    df = dfp.reshape(b, h + 2, w + 2, c)[:, 1:-1, 1:-1]
    return (df.astype(f.dtype), dw0, dpre.sum((0, 1)), dwc, gl.sum((0, 1)), dwr, gd.sum((0, 1)))


def _head_bwd(max_locations, res, gs):
    g_cls, g_reg = gs
    b, h, w, _ = res[0].shape

    def dense(res, g_cls, g_reg, nz):
        return jax.vjp(_head_dense, *res)[1]((g_cls, g_reg))

    k = min(max_locations, h * w)
    if k == 0 or 2 * k > h * w:  # few positions: the dense backward is as cheap
        return dense(res, g_cls, g_reg, None)
    nz = ((g_cls != 0).any(-1) | (g_reg != 0).any(-1)).reshape(b, h * w)
    return jax.lax.cond(nz.sum(1).max() <= k, functools.partial(_head_sparse_bwd, k), dense, res, g_cls, g_reg, nz)


rpn_head_level.defvjp(_head_fwd, _head_bwd)


class RPNHead(nn.Module):
    """Shared over levels: `conv_depth` x (3x3 conv + ReLU), then 1x1 `cls_logits` (A) and
    `bbox_pred` (4A). torch init: normal(std=0.01), zero bias.

    sparse_grad_locations: with one conv, the bound K of `rpn_head_level`'s sparse
    backward (positions per image with a nonzero gradient; 0: always dense).
    """

    num_anchors: int = 3
    conv_depth: int = 1
    dtype: jnp.dtype = jnp.float32
    sparse_grad_locations: int = 0

    @nn.compact
    def __call__(self, feats: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        """feats: [(B, H_l, W_l, C)] -> objectness [(B, H_l*W_l*A)], deltas [(B, H_l*W_l*A, 4)]."""
        init = nn.initializers.normal(0.01)
        c = feats[0].shape[-1]
        convs = [conv(c, 3, bias=True, name=f"conv_{i}", dtype=self.dtype, kernel_init=init)
                 for i in range(self.conv_depth)]
        cls = conv(self.num_anchors, 1, bias=True, name="cls_logits", dtype=self.dtype, kernel_init=init)
        reg = conv(4 * self.num_anchors, 1, bias=True, name="bbox_pred", dtype=self.dtype, kernel_init=init)
        fused = self.conv_depth == 1  # one custom-VJP op per level (`rpn_head_level`)
        if fused:
            # the convs on an empty batch: no work, but it binds them (creating their
            # parameters at init), so init and apply take the same path
            empty = jnp.zeros((0, 1, 1, c), self.dtype)
            for m in (*convs, cls, reg):
                m(empty)
            p = self.variables["params"]
            ws = [p[n][k].astype(self.dtype) for n in ("conv_0", "cls_logits", "bbox_pred") for k in ("kernel", "bias")]
        logits, deltas = [], []
        for f in feats:
            b = f.shape[0]
            if fused:
                lg, dl = rpn_head_level(f.astype(self.dtype), *ws, self.sparse_grad_locations)
            else:
                t = f
                for cv in convs:
                    t = nn.relu(cv(t))
                lg, dl = cls(t), reg(t)
            # torch permute_and_flatten: (B, A*C, H, W) -> (B, H*W*A, C); NHWC already is (H, W, A)
            logits.append(lg.astype(jnp.float32).reshape(b, -1))
            deltas.append(dl.astype(jnp.float32).reshape(b, -1, 4))
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
        _, top = top_k(objectness[:, off:off + n], k)
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
