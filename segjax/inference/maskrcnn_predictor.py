"""Mask R-CNN inference on the host: uint8 image in, torchvision's eval output dict out.

Legend: N detections, H/W original image size.

`MaskRCNNPredictor.from_checkpoint(dir)(image)` mirrors `torchvision.models.detection.
maskrcnn_resnet50_fpn(...).eval()([image / 255])[0]`:
  1. resize (torchvision GeneralizedRCNNTransform rule: short side `min_size`, long side
     at most `max_size`, bilinear) on the host in numpy, zero-pad to a multiple of 32;
  2. one jit-compiled forward per padded shape (normalisation, backbone, RPN, heads,
     per-class NMS, masks of the predicted class: all static shapes);
  3. boxes rescaled to the original size and the 28x28 masks pasted into the image
     (`segjax.ops.paste_masks_in_image`, jit per original size).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import load_params
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN, prepare_image, rescale_boxes
from segjax.ops.masks import paste_masks_in_image
from segjax.ops.resample import resized_hw


class MaskRCNNPredictor:
    """Detections of one Mask R-CNN checkpoint (thresholds fixed per predictor)."""

    def __init__(self, model: MaskRCNN, params: Any, meta: dict | None = None,
                 score_thresh: float | None = None, nms_thresh: float | None = None,
                 detections_per_img: int | None = None, min_size: int | None = None,
                 max_size: int | None = None):
        if not isinstance(model, MaskRCNN):
            raise TypeError(f"MaskRCNNPredictor needs a MaskRCNN model, got {type(model).__name__}")
        self.model = model
        self.meta = meta or {}
        self.params = jax.device_put(params)
        # None: the model's own values (torchvision's 0.05, 0.5, 100 for the R50 variants)
        self.score_thresh = float(model.box_score_thresh if score_thresh is None else score_thresh)
        self.nms_thresh = float(model.box_nms_thresh if nms_thresh is None else nms_thresh)
        self.detections_per_img = int(model.box_detections_per_img if detections_per_img is None
                                      else detections_per_img)
        self.min_size = int(model.min_size if min_size is None else min_size)
        self.max_size = int(model.max_size if max_size is None else max_size)
        self._forward = jax.jit(self._forward_impl)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **kwargs) -> MaskRCNNPredictor:
        """Builds the model from the checkpoint's meta and loads its params.

        kwargs: score_thresh, nms_thresh, detections_per_img, min_size, max_size;
        default: the model's (torchvision's 0.05, 0.5, 100, 800, 1333 for R50-FPN).
        """
        params, meta = load_params(directory)
        if not str(meta.get("model", "")).startswith("mask_rcnn"):
            raise ValueError(f"{directory} holds a {meta.get('model')!r} checkpoint, not Mask R-CNN")
        model = models.build(meta["model"], **meta.get("model_kwargs", {}))
        if set(params) == {"params"}:
            params = params["params"]
        x = jnp.zeros((1, 64, 64, 3), jnp.float32)
        expected = nn.meta.unbox(jax.eval_shape(
            lambda: model.init(jax.random.key(0), x, jnp.full((1, 2), 64, jnp.int32))))["params"]
        got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
        want = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
        if got != want:
            raise ValueError(f"{directory}: params do not match {meta['model']} "
                             f"({meta.get('model_kwargs')}); re-convert the checkpoint")
        return cls(model, params, meta, **kwargs)

    def _forward_impl(self, params, image, image_hw):
        return self.model.apply({"params": params}, image, image_hw, self.score_thresh, self.nms_thresh,
                                self.detections_per_img)

    @staticmethod
    @functools.partial(jax.jit, static_argnums=(2,))
    def _paste(masks, boxes, hw):
        return paste_masks_in_image(masks, boxes, hw)

    def predict_padded(self, image: np.ndarray, image_hw: np.ndarray) -> dict[str, np.ndarray]:
        """Raw static-shape outputs for a prepared batch (B, H, W, 3) 0-255 and (B, 2) sizes."""
        out = self._forward(self.params, jnp.asarray(image, jnp.float32), jnp.asarray(image_hw, jnp.int32))
        return {k: np.asarray(v) for k, v in out.items()}

    def check_image(self, image: np.ndarray) -> np.ndarray:
        """Validates one input image; returns it as a numpy array.

        Raises ValueError for a shape other than (H, W, 3), an empty image (H or W 0)
        and an image so elongated that torchvision's resize rule (short side to
        `min_size`, long side capped at `max_size`) leaves it 0 px on its short side
        (torchvision fails there too; roughly long / short > max_size); TypeError for a
        dtype other than uint8.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(f"image must be uint8 (0-255), got {image.dtype}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"image is empty: shape {image.shape}")
        rh, rw = resized_hw(h, w, self.min_size, self.max_size)
        if rh < 1 or rw < 1:
            raise ValueError(
                f"image of {h}x{w} is too elongated: the resize (short side to min_size={self.min_size}, long side "
                f"at most max_size={self.max_size}) makes it {rh}x{rw}; the long side may be at most about "
                f"{self.max_size} times the short one (torchvision's transform fails on it too)")
        return image

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """image: (H, W, 3) uint8 RGB (checked by `check_image`). Returns torchvision's
        eval dict (numpy): boxes (N, 4) float32 XYXY original px, labels (N,) int64,
        scores (N,) float32, masks (N, 1, H, W) float32 probabilities;
        N <= detections_per_img, by score."""
        image = self.check_image(image)
        h, w = image.shape[:2]
        padded, rhw = prepare_image(image, self.min_size, self.max_size, self.model.size_divisible)
        out = self.predict_padded(padded[None], np.asarray([rhw], np.int32))
        valid = out["valid"][0]
        boxes = rescale_boxes(out["boxes"][0], rhw, (h, w))
        masks = np.asarray(self._paste(jnp.asarray(out["masks"][0]), jnp.asarray(boxes), (h, w)))
        return {"boxes": boxes[valid], "labels": out["labels"][0][valid].astype(np.int64),
                "scores": out["scores"][0][valid].astype(np.float32),
                "masks": masks[valid][:, None].astype(np.float32)}
