"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone, as torchvision's `MaskRCNN`.

Legend: B batch, H/W padded input size, M instances (padded), P proposals,
S sampled RoIs, D detections, C classes (incl. background 0).

Input convention (set at model entry, so a checkpoint + builder defines it):
  image (B, H, W, 3) float32 RGB 0-255, already resized (`segjax.ops.resample.resized_hw`:
  torchvision's GeneralizedRCNNTransform rule) and padded bottom-right to a multiple of 32 (or any
  fixed size); image_hw (B, 2) int32 the resized size inside the padding. The model
  divides by 255, normalises with ImageNet mean/std and zeroes the padding (torchvision
  pads with 0 after normalising).
The resize runs on the host (`segjax.ops.resample.resize_image`, numpy, torch's
bilinear arithmetic; `prepare_image` resizes and pads one image); one jit
per padded input shape. Everything inside jit has static shapes: fixed proposal
counts with valid masks, padded ground truth with a valid mask.

Outputs (inference, `__call__`): dict(boxes (B, D, 4) XYXY in resized-input px,
scores (B, D), labels (B, D) int32, valid (B, D), masks (B, D, 28, 28) probabilities
of the predicted class, num_passing (B,)). `postprocess` maps one image's detections
to the original image (boxes rescaled, masks pasted) like torchvision's `postprocess`.

Training: `losses(batch)` (rng stream 'sampling') returns (total loss, metrics) with
torchvision's five terms; the batch is the one `segjax.data.maskrcnn` builds (its
module docstring lists every key): image, image_hw, boxes (B, M, 4) resized px,
labels (B, M), masks (B, M, H, W) uint8, valid (B, M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models.maskrcnn import anchors as anchor_lib
from segjax.models.maskrcnn.backbone import ResNetBody
from segjax.models.maskrcnn.fpn import FPN
from segjax.models.maskrcnn.roi_heads import (
    BOX_WEIGHTS,
    MASK_CHUNK,
    RoIHeads,
    box_postprocess,
    bucketed_mask_loss,
    fastrcnn_loss,
    mask_probs,
    select_training_samples,
)
from segjax.models.maskrcnn.rpn import RPN_WEIGHTS, RPNHead, filter_proposals, rpn_loss
from segjax.models.maskrcnn.vitdet import ViTDetBackbone, ViTDetNet
from segjax.ops import boxes as box_ops
from segjax.ops.resample import resize_image, resized_hw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWithFPN(nn.Module):
    """`body` (ResNet C2..C5) + `fpn` -> [P2, P3, P4, P5, pool]."""

    depths: Sequence[int] = (3, 4, 6, 3)
    stem_width: int = 64
    width_per_group: int = 64
    bn_eps: float = 0.0
    trainable_layers: int = 3
    fpn_channels: int = 256
    fpn_norm: bool = False
    fpn_bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # ResNetBody.remat

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        feats = ResNetBody(self.depths, self.stem_width, self.width_per_group, self.bn_eps,
                           self.trainable_layers, self.dtype, self.remat, name="body")(x)
        return FPN(self.fpn_channels, self.fpn_norm, self.fpn_bn_eps, self.dtype, name="fpn")(feats)


class MaskRCNN(nn.Module):
    """Mask R-CNN; field defaults are torchvision `maskrcnn_resnet50_fpn`'s.

    `backbone_type` "vitdet": the plain ViT + simple feature pyramid of ViTDet
    (`vitdet.py`, fields `vit_*`; the ResNet fields are unused) with drop path when a
    'dropout' rng is given to `losses`.
    """

    num_classes: int = 91
    backbone_type: str = "resnet_fpn"  # or "vitdet"
    # ViTDet backbone (backbone_type "vitdet"; see vitdet.ViTDetBackbone)
    vit_img_size: int = 1024
    vit_pretrain_img_size: int = 224
    vit_patch_size: int = 16
    vit_embed_dim: int = 768
    vit_depth: int = 12
    vit_num_heads: int = 12
    vit_window_size: int = 14
    vit_global_attn_indexes: Sequence[int] = (2, 5, 8, 11)
    vit_drop_path_rate: float = 0.1
    vit_remat: bool = False
    # ResNet-FPN backbone
    depths: Sequence[int] = (3, 4, 6, 3)
    stem_width: int = 64
    width_per_group: int = 64
    bn_eps: float = 0.0  # legacy COCO weights: 0; v2 / fresh torchvision models: 1e-5
    trainable_layers: int = 3
    # recompute the trained ResNet stages in the backward pass, one image at a time
    # (ResNetBody.remat): the step's memory at or below torchvision's (benchmarks/README.md)
    backbone_remat: bool = True
    fpn_channels: int = 256
    head_norm: bool = False  # v2: BatchNorm in FPN, box and mask heads
    head_bn_eps: float = 1e-5
    head_norm_type: str = "bn"  # with head_norm: "bn" frozen BatchNorm (v2), "ln" LayerNorm (ViTDet)
    # RPN
    anchor_sizes: Sequence[Sequence[float]] = anchor_lib.DEFAULT_SIZES
    aspect_ratios: Sequence[float] = anchor_lib.DEFAULT_RATIOS
    rpn_conv_depth: int = 1
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    # RoI heads
    representation_size: int = 1024
    box_convs: Sequence[int] = ()
    mask_layers: Sequence[int] = (256, 256, 256, 256)
    mask_dim_reduced: int = 256
    sampling_ratio: int = 2
    aligned: bool = False
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_num_candidates: int = 4000
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    mask_rois_per_image: int | None = None  # None: all positives (<= 128), as torchvision
    # train-time mask head: RoI counts per image it may run on (the smallest that holds
    # every image's positives is used; None: `mask_buckets`; the slot count is always added)
    mask_roi_buckets: Sequence[int] | None = None
    # and the slots per image it runs at once in a larger bucket (bounds the activation
    # memory; None: a bucket in one piece); see `bucketed_mask_loss`
    mask_roi_chunk: int | None = MASK_CHUNK
    # input transform (used by the host code that prepares `image`)
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    image_mean: Sequence[float] = IMAGENET_MEAN
    image_std: Sequence[float] = IMAGENET_STD
    dtype: Any = jnp.float32

    def setup(self):
        if self.backbone_type == "vitdet":
            net = ViTDetNet(self.vit_img_size, self.vit_pretrain_img_size, self.vit_patch_size, self.vit_embed_dim,
                            self.vit_depth, self.vit_num_heads, window_size=self.vit_window_size,
                            global_attn_indexes=tuple(self.vit_global_attn_indexes),
                            drop_path_rate=self.vit_drop_path_rate, remat=self.vit_remat, dtype=self.dtype)
            self.backbone = ViTDetBackbone(net, self.fpn_channels, dtype=self.dtype)
        elif self.backbone_type == "resnet_fpn":
            self.backbone = BackboneWithFPN(self.depths, self.stem_width, self.width_per_group, self.bn_eps,
                                            self.trainable_layers, self.fpn_channels, self.head_norm,
                                            self.head_bn_eps, self.dtype, self.backbone_remat)
        else:
            raise ValueError(f"backbone_type must be 'resnet_fpn' or 'vitdet', got {self.backbone_type!r}")
        # the RPN loss reaches at most rpn_batch_size_per_image anchors (so positions) per image
        self.rpn = RPNHead(len(self.anchor_sizes[0]) * len(self.aspect_ratios), self.rpn_conv_depth, self.dtype,
                           sparse_grad_locations=self.rpn_batch_size_per_image)
        self.roi_heads = RoIHeads(
            self.num_classes, self.representation_size, tuple(self.box_convs), tuple(self.mask_layers),
            self.mask_dim_reduced, self.head_norm, self.head_bn_eps, sampling_ratio=self.sampling_ratio,
            aligned=self.aligned, dtype=self.dtype, norm_type=self.head_norm_type)

    # ------------------------------------------------------------------ stages

    def normalize(self, image: jax.Array, image_hw: jax.Array) -> jax.Array:
        """(B, H, W, 3) RGB 0-255 -> normalised, zero outside each image's (h, w)."""
        mean = jnp.asarray(self.image_mean, jnp.float32)
        std = jnp.asarray(self.image_std, jnp.float32)
        x = (image.astype(jnp.float32) / 255.0 - mean) / std
        _, h, w, _ = image.shape
        inside = ((jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None])
                  & (jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]))
        return jnp.where(inside[..., None], x, 0.0)

    def features(self, image: jax.Array, image_hw: jax.Array, train: bool = False) -> list[jax.Array]:
        """FPN levels [P2, P3, P4, P5, pool], each (B, H_l, W_l, F). `train`: ViTDet's drop
        path (needs the 'dropout' rng)."""
        return self.features_normalized(self.normalize(image, image_hw), train)

    def features_normalized(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """FPN levels from an already normalised and padded (B, H, W, 3) batch."""
        if self.backbone_type == "vitdet":
            return self.backbone(x, train)
        return self.backbone(x)

    def rpn_outputs(self, feats: list[jax.Array], input_hw: tuple[int, int]) -> dict[str, Any]:
        """Objectness (B, N), deltas (B, N, 4), anchors (N, 4) (static), level sizes,
        decoded proposals (B, N, 4) (no gradient), levels concatenated finest first."""
        logits, deltas = self.rpn(feats)
        feature_hw = [f.shape[1:3] for f in feats]
        anchors = jnp.asarray(anchor_lib.grid_anchors(feature_hw, input_hw, self.anchor_sizes,
                                                      self.aspect_ratios))
        objectness = jnp.concatenate(logits, axis=1)
        deltas = jnp.concatenate(deltas, axis=1)
        decoded = box_ops.decode_boxes(jax.lax.stop_gradient(deltas), anchors, RPN_WEIGHTS)
        return {"objectness": objectness, "deltas": deltas, "anchors": anchors,
                "level_sizes": [lg.shape[1] for lg in logits], "decoded": decoded}

    def proposals(self, rpn: dict[str, Any], image_hw: jax.Array, train: bool) -> dict[str, jax.Array]:
        """RPN proposals: dict(boxes (B, P, 4), scores (B, P), valid (B, P))."""
        return filter_proposals(
            rpn["objectness"], rpn["decoded"], rpn["level_sizes"], image_hw,
            self.rpn_pre_nms_top_n_train if train else self.rpn_pre_nms_top_n_test,
            self.rpn_post_nms_top_n_train if train else self.rpn_post_nms_top_n_test,
            self.rpn_nms_thresh, 1e-3, self.rpn_score_thresh)

    def box_head(self, feats, boxes, input_hw):
        """Class logits (B, R, C) and box deltas (B, R, 4C) of boxes (B, R, 4)."""
        return self.roi_heads.box(feats, boxes, input_hw)

    def mask_head(self, feats, boxes, input_hw):
        """Mask logits (B, R, 28, 28, C) of boxes (B, R, 4)."""
        return self.roi_heads.mask(feats, boxes, input_hw)

    def detect(self, feats, proposals, image_hw, input_hw, score_thresh=None, nms_thresh=None,
               detections_per_img=None) -> dict[str, jax.Array]:
        """Box head + post-processing + mask head on the detections."""
        cls, reg = self.roi_heads.box(feats, proposals["boxes"], input_hw)
        det = box_postprocess(
            cls, reg, proposals["boxes"], proposals["valid"], image_hw,
            self.box_score_thresh if score_thresh is None else score_thresh,
            self.box_nms_thresh if nms_thresh is None else nms_thresh,
            self.box_detections_per_img if detections_per_img is None else detections_per_img,
            self.box_num_candidates, BOX_WEIGHTS)
        logits = self.roi_heads.mask(feats, det["boxes"], input_hw)
        det["masks"] = mask_probs(logits, det["labels"])
        return det

    def __call__(self, image: jax.Array, image_hw: jax.Array, score_thresh: float | None = None,
                 nms_thresh: float | None = None, detections_per_img: int | None = None
                 ) -> dict[str, jax.Array]:
        """Inference: image (B, H, W, 3) RGB 0-255 padded, image_hw (B, 2) -> detections
        (see module doc). Thresholds default to the model's fields (static)."""
        input_hw = tuple(image.shape[1:3])
        feats = self.features(image, image_hw)
        props = self.proposals(self.rpn_outputs(feats, input_hw), image_hw, train=False)
        det = self.detect(feats, props, image_hw, input_hw, score_thresh, nms_thresh, detections_per_img)
        det["proposals"] = props["boxes"]
        det["proposals_valid"] = props["valid"]
        return det

    # ------------------------------------------------------------------ training

    def rpn_losses(self, feats, batch, rng) -> tuple[jax.Array, dict, dict]:
        """RPN loss and the training proposals (2000 per image): (loss, metrics, proposals)."""
        input_hw = tuple(batch["image"].shape[1:3])
        rpn = self.rpn_outputs(feats, input_hw)
        loss, metrics = rpn_loss(rpn["objectness"], rpn["deltas"], rpn["anchors"], batch["boxes"],
                                 batch["valid"], rng, self.rpn_fg_iou_thresh, self.rpn_bg_iou_thresh,
                                 self.rpn_batch_size_per_image, self.rpn_positive_fraction)
        return loss, metrics, self.proposals(rpn, batch["image_hw"], train=True)

    def roi_losses(self, feats, proposals, batch, rng) -> tuple[jax.Array, dict]:
        """Fast R-CNN + mask losses on RoIs sampled from proposals (boxes, valid) + gt."""
        input_hw = tuple(batch["image"].shape[1:3])
        s = select_training_samples(proposals["boxes"], proposals["valid"], batch["boxes"],
                                    batch["labels"], batch["valid"], rng, self.box_fg_iou_thresh,
                                    self.box_bg_iou_thresh, self.box_batch_size_per_image,
                                    self.box_positive_fraction, BOX_WEIGHTS, self.mask_rois_per_image)
        cls, reg = self.roi_heads.box(feats, s["rois"], input_hw)
        loss_box, metrics = fastrcnn_loss(cls, reg, s["labels"], s["regression_targets"], s["valid"])
        take = lambda x: jnp.take_along_axis(x, s["mask_slots"], axis=1)  # noqa: E731
        mask_rois = jnp.take_along_axis(s["rois"], s["mask_slots"][..., None], axis=1)  # (B, Sp, 4)
        # NOTE: the mask head runs on the first k slots of every image, k the smallest
        # static bucket that holds every image's positives (exact: see bucketed_mask_loss).
        sp = mask_rois.shape[1]
        buckets = sorted({k for k in self.mask_roi_buckets or mask_buckets(sp) if k < sp} | {sp})
        labels, matched = take(s["labels"]), take(s["matched_idx"])
        # the head on zero RoIs: no work, but it binds the head (creating its parameters at init)
        self.roi_heads.mask(feats, mask_rois[:, :0], input_hw)
        unbound = self.roi_heads.clone(parent=None)
        head_fn = lambda p, x: unbound.apply({"params": p}, x, method=RoIHeads.mask_from_pooled)  # noqa: E731
        pool_fn = lambda f, r: unbound.apply({}, f, r, input_hw, method=RoIHeads.mask_pooled)  # noqa: E731
        head_params = {n: self.roi_heads.variables["params"][n] for n in ("mask_head", "mask_predictor")}
        loss_mask = bucketed_mask_loss(head_fn, head_params, pool_fn, feats, mask_rois, labels, matched,
                                       s["mask_valid"], batch["masks"], buckets, self.mask_roi_chunk)
        m_mask = {"loss_mask": loss_mask}
        metrics.update(m_mask)
        metrics["roi_num_pos"] = s["mask_valid"].sum() / s["valid"].shape[0]
        return loss_box + loss_mask, metrics

    def losses(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training losses (torchvision's train-mode forward): (total, metrics).

        Needs the 'sampling' rng stream; a 'dropout' rng turns on ViTDet's drop path.
        The five terms are summed unweighted, as torchvision's reference training script does.
        """
        rng_rpn, rng_roi = jax.random.split(self.make_rng("sampling"))
        feats = self.features(batch["image"], batch["image_hw"], train=self.has_rng("dropout"))
        l_rpn, metrics, props = self.rpn_losses(feats, batch, rng_rpn)
        l_roi, m_roi = self.roi_losses(feats, props, batch, rng_roi)
        metrics.update(m_roi)
        total = l_rpn + l_roi
        metrics["loss"] = total
        return total, metrics


# NOTE: XLA:CPU compiler options for train steps of these models (`compiler_options` of
# the step's jit; train_loop passes them on CPU meshes only): the memory-optimized
# scheduler. The default one starts independent work early (the RPN's and the box
# head's backward before the mask head's, weight-gradient pads in the forward pass)
# and plans a ~25% larger temporary buffer for the R50-FPN step (benchmarks/README.md).
TRAIN_CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def mask_buckets(slots: int, smallest: int = 8, factor: int = 2) -> tuple[int, ...]:
    """Default mask-head RoI buckets: slots, slots / factor, ... down to `smallest`
    (ascending; e.g. 128 -> (8, 16, 32, 64, 128))."""
    out = [slots]
    while out[-1] // factor >= smallest:
        out.append(out[-1] // factor)
    return tuple(sorted(out))


def mask_rcnn_loss(model: MaskRCNN, params: Any, batch: dict[str, jax.Array], rng: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Free-function form for train steps: `(loss, metrics)` of `model.losses`."""
    return model.apply({"params": params}, batch, method=MaskRCNN.losses, rngs={"sampling": rng})


# ----------------------------------------------------------------------------- host transform


def padded_hw(hw: tuple[int, int], size_divisible: int = 32) -> tuple[int, int]:
    return tuple(int(math.ceil(s / size_divisible) * size_divisible) for s in hw)


def prepare_image(image: np.ndarray, min_size: int = 800, max_size: int = 1333,
                  size_divisible: int = 32, pad_to: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8/float (h, w, 3) RGB 0-255 -> ((H, W, 3) float32 resized + zero-padded, (rh, rw))."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got {image.shape}")
    rhw = resized_hw(image.shape[0], image.shape[1], min_size, max_size)
    resized = resize_image(image, rhw)
    phw = pad_to or padded_hw(rhw, size_divisible)
    if phw[0] < rhw[0] or phw[1] < rhw[1]:
        raise ValueError(f"pad_to {phw} is smaller than the resized image {rhw}")
    out = np.zeros((*phw, 3), np.float32)
    out[:rhw[0], :rhw[1]] = resized
    return out, rhw


def rescale_boxes(boxes: np.ndarray, resized: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """torchvision `resize_boxes` from the resized frame back to the original (float32 ratios)."""
    rh = np.float32(original[0]) / np.float32(resized[0])
    rw = np.float32(original[1]) / np.float32(resized[1])
    b = np.asarray(boxes, np.float32)
    return np.stack([b[:, 0] * rw, b[:, 1] * rh, b[:, 2] * rw, b[:, 3] * rh], axis=1)
