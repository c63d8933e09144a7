"""Segment Anything on the host: a drop-in for `segment_anything.SamPredictor`.

Legend: B images, P prompts, T prompt tokens, M masks per prompt (3 with
multimask_output, else 1), (H, W) original image size, (hi, wi) resized image,
S model input size, (h, w) embedding grid, C embedding width, (lh, lw) = (4h, 4w)
low-res mask size.

Numpy in, numpy out, with the official shapes and dtypes. Three jitted programs:
the image encoder (per image-batch size), the prompt encoder + mask decoder (per
prompt bucket P x T and multimask flag, independent of the image size) and the mask
upscaling (per (input size, original size)). Prompt batches are padded to static
buckets with label -10 ("absent": masked out of every attention by the model), so a
padded prompt gives the unpadded prompt's output and new prompt counts do not
recompile.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import load_params
from segjax.inference.sam import postprocess as sam_postprocess
from segjax.inference.sam import transforms as sam_transforms
from segjax.inference.sam.transforms import SamInputError, check_boxes, check_points, numeric_array
from segjax.models.sam import ABSENT

MASK_THRESHOLD = 0.0
LABEL_ABSENT = ABSENT  # -10: padding token for static shapes (see Sam.predict_masks)
LABEL_PAD_POINT, LABEL_BOX_TL, LABEL_BOX_BR = -1, 2, 3
TOKEN_LABELS = (1, 0, LABEL_PAD_POINT, LABEL_BOX_TL, LABEL_BOX_BR, LABEL_ABSENT)  # what `decode` takes
PROMPT_BUCKETS = (1, 8, 16, 32, 64)
MIN_TOKENS = 2


@dataclasses.dataclass(frozen=True)
class SamImage:
    """One embedded image.

    features: (1, h, w, C) device array (the model's dtype);
    original_size: (H, W); input_size: (hi, wi) of the resized image.
    """

    features: jax.Array
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of it."""
    for b in buckets:
        if n <= b:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def token_bucket(t: int) -> int:
    """Tokens per prompt padded to a power of two, at least MIN_TOKENS: 2 (one point and
    the padding point, or a box), 4, 8, ... The decoder's image-side attention work grows
    with the token count (its projections are folded into the tokens), so a single
    point is not padded to the 8 tokens of a 7-point prompt (1.9x the attention work)."""
    return max(MIN_TOKENS, 1 << max(0, int(t) - 1).bit_length())


class SamPredictor:
    """Image embedding once, then repeated, cheap mask prediction from prompts.

    Same API as the official predictor (`set_image`, `predict`, `get_image_embedding`,
    `reset_image`, `original_size`, `input_size`, `is_image_set`), plus batched
    prompts (`predict_batch`) and batched images (`embed_images`, `set_images`).
    """

    def __init__(self, model, params: Any, meta: dict | None = None, max_prompts: int = 64,
                 image_batch: int = 8):
        self.model = model
        self.meta = meta or {}
        self.params = jax.device_put(params)
        self.img_size = int(model.img_size)
        self.max_prompts = int(max_prompts)
        self.image_batch = int(image_batch)
        self.prompt_buckets = tuple(b for b in PROMPT_BUCKETS if b < self.max_prompts) + (self.max_prompts,)
        self._embed = jax.jit(self._embed_impl)
        self._decode = jax.jit(self._decode_impl, static_argnames=("multimask_output",))
        # the two upscaling passes as two programs (see `sam_postprocess.upscale_masks`)
        self._upscale_w = jax.jit(sam_postprocess.upscale_masks_w, static_argnums=(1, 2, 3))
        self._upscale_h = jax.jit(self._upscale_h_impl, static_argnames=("input_size", "original_size", "low_hw",
                                                                        "logits"))
        self.images: list[SamImage] = []
        self.reset_image()

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, dtype: Any = None, **kwargs) -> SamPredictor:
        """Builds the model from the checkpoint's meta (optionally with compute `dtype`,
        e.g. jnp.bfloat16; params stay as stored) and loads its params."""
        params, meta = load_params(directory)
        if "model" not in meta:
            raise ValueError(f"{directory}: checkpoint meta has no 'model' entry: {meta}")
        model_kwargs = dict(meta.get("model_kwargs", {}))
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = models.build(meta["model"], **model_kwargs)
        if not hasattr(model, "img_size") or not hasattr(model, "predict_masks"):
            raise ValueError(f"{directory} holds a {meta['model']!r} model, not a SAM model")
        if set(params) == {"params"}:
            params = params["params"]
        return cls(model, params, meta, **kwargs)

    # ------------------------------------------------------------------ jitted parts
    def _embed_impl(self, params, images, input_hw):
        return self.model.apply({"params": params}, images, input_hw, method="embed_image")

    def _decode_impl(self, params, features, coords, labels, mask_input, has_mask, multimask_output):
        out = self.model.apply(
            {"params": params}, features, coords[None], labels[None],
            mask_input=None if mask_input is None else mask_input[None, ..., None],
            has_mask=None if has_mask is None else has_mask[None],
            multimask_output=multimask_output, method="predict_masks")
        return out["low_res_logits"][0], out["iou_predictions"][0]  # (P, M, lh, lw), (P, M)

    def _upscale_h_impl(self, x, input_size, original_size, low_hw, logits):
        masks = sam_postprocess.upscale_masks_h(x, self.img_size, input_size, original_size, low_hw)
        return masks if logits else masks > MASK_THRESHOLD

    # ------------------------------------------------------------------ images
    def embed_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> list[SamImage]:
        """Embeds a list of (H_i, W_i, 3) uint8 images, `image_batch` per encoder call."""
        if image_format not in ("RGB", "BGR"):
            raise SamInputError(f"image_format must be in ['RGB', 'BGR'], is {image_format}.")
        s = self.img_size
        prepared = []
        for image in images:
            image = sam_transforms.check_image(image)
            if image_format == "BGR":
                image = image[..., ::-1]
            prepared.append((image.shape[:2], sam_transforms.resize_image(image, s)))
        out = []
        for start in range(0, len(prepared), self.image_batch):
            chunk = prepared[start:start + self.image_batch]
            batch = np.zeros((len(chunk), s, s, 3), np.float32)  # resized image at the top left
            hw = np.zeros((len(chunk), 2), np.int32)
            for i, (_, resized) in enumerate(chunk):
                batch[i, :resized.shape[0], :resized.shape[1]] = resized
                hw[i] = resized.shape[:2]
            feats = self._embed(self.params, jnp.asarray(batch), jnp.asarray(hw))  # (b, h, w, C)
            for i, (orig, resized) in enumerate(chunk):
                out.append(SamImage(feats[i:i + 1], tuple(int(v) for v in orig),
                                    tuple(int(v) for v in resized.shape[:2])))
        return out

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embeds one (H, W, 3) uint8 image ('RGB' or 'BGR') for the next predictions."""
        self.set_image_embedding(self.embed_images([image], image_format)[0])

    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> list[SamImage]:
        """Embeds several images (batched encoder calls), keeps them in `self.images` and
        makes the first current; `set_image_embedding(self.images[i])` switches."""
        self.images = self.embed_images(images, image_format)
        if self.images:
            self.set_image_embedding(self.images[0])
        return self.images

    def set_image_embedding(self, image: SamImage) -> None:
        """Makes an embedded image (from `embed_images`) the current one."""
        self.image = image
        self.features = image.features
        self.original_size = image.original_size
        self.input_size = image.input_size
        self.is_image_set = True

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.image = None
        self.features = None
        self.original_size = None
        self.input_size = None
        self.is_image_set = False

    def get_image_embedding(self) -> np.ndarray:
        """(1, C, h, w) float32 numpy, the official NCHW layout (C=256, h=w=64 for SAM)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return np.asarray(self.features, np.float32).transpose(0, 3, 1, 2)

    # ------------------------------------------------------------------ prompts
    def _mask_size(self, features: jax.Array | None = None) -> tuple[int, int]:
        h, w = (self.features if features is None else features).shape[1:3]
        return 4 * h, 4 * w

    def pack_prompts(self, point_coords=None, point_labels=None, boxes=None,
                     original_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Prompts in original-image pixels -> model tokens in the resized-input frame.

        point_coords: (P, N, 2) (x, y), or a list of P (N_i, 2) arrays; point_labels:
        (P, N) or a list of (N_i,) (1 foreground, 0 background, -1 not a point); boxes:
        (P, 4) XYXY. Checked (`SamInputError`): finite numbers, labels in {1, 0, -1},
        matching counts, x0 <= x1 and y0 <= y1 (zero-area boxes are accepted, as by the
        reference), no prompt without any point or box.
        Returns coords (P, T, 2) float32, labels (P, T) int32 in the official token order
        points..., [padding point (-1) if no box], box corners (2, 3); T is padded to a
        power of two with absent tokens (-10).
        """
        if point_coords is not None and point_labels is None:
            raise SamInputError("point_labels must be supplied if point_coords is supplied.")
        if point_labels is not None and point_coords is None:
            raise SamInputError("point_coords must be supplied if point_labels is supplied.")
        size = original_size or self.original_size
        s = self.img_size
        pts, lbls = [], []
        if point_coords is not None:
            coord_sets = _prompt_list(point_coords, "point_coords", "(P, N, 2)")
            label_sets = _prompt_list(point_labels, "point_labels", "(P, N)")
            if len(coord_sets) != len(label_sets):
                raise SamInputError(f"{len(coord_sets)} point sets but {len(label_sets)} label sets")
            for i, (c, lab) in enumerate(zip(coord_sets, label_sets)):
                c, lab = check_points(c, lab, what=f"prompt {i}: point" if len(coord_sets) > 1 else "point")
                # the reference casts the scaled float64 coordinates to float32
                pts.append(sam_transforms.to_float32(sam_transforms.scale_coords(c, size, s), "point coords"))
                lbls.append(lab)
        box_arr = None
        if boxes is not None:
            box_arr = check_boxes(boxes)
            box_arr = sam_transforms.to_float32(sam_transforms.scale_boxes(box_arr, size, s), "boxes").reshape(-1, 2, 2)
            if point_coords is not None and len(pts) != len(box_arr):
                raise SamInputError(f"{len(pts)} point sets but {len(box_arr)} boxes")
        if box_arr is None:
            empty = [i for i, c in enumerate(pts) if len(c) == 0]
            if empty:
                raise SamInputError(f"empty prompt: point set {empty[0]} has no points and there is no box "
                                    "(pass point_coords=None for no points)")
        p = len(pts) if point_coords is not None else (len(box_arr) if box_arr is not None else 1)
        if p == 0:
            raise SamInputError("no prompts given (empty point_coords / boxes)")
        tokens_c, tokens_l = [], []
        for i in range(p):
            c = pts[i] if pts else np.zeros((0, 2), np.float32)
            lab = lbls[i] if lbls else np.zeros((0,), np.int32)
            if box_arr is not None:
                c = np.concatenate([c, box_arr[i]])
                lab = np.concatenate([lab, [LABEL_BOX_TL, LABEL_BOX_BR]])
            elif pts:
                c = np.concatenate([c, np.zeros((1, 2), np.float32)])
                lab = np.concatenate([lab, [LABEL_PAD_POINT]])
            tokens_c.append(c)
            tokens_l.append(lab)
        t = token_bucket(max(len(lab) for lab in tokens_l))
        coords = np.zeros((p, t, 2), np.float32)
        labels = np.full((p, t), LABEL_ABSENT, np.int32)
        for i, (c, lab) in enumerate(zip(tokens_c, tokens_l)):
            coords[i, :len(lab)] = c
            labels[i, :len(lab)] = lab
        return coords, labels

    def decode(self, coords: np.ndarray, labels: np.ndarray, mask_input: np.ndarray | None = None,
               multimask_output: bool = True, image: SamImage | None = None) -> tuple[jax.Array, jax.Array]:
        """Prompt tokens (from `pack_prompts`) -> device (low_res (P', M, lh, lw), iou (P', M)).

        coords (P, T, 2) float32 in the resized-input frame (no +0.5), labels (P, T);
        mask_input (P, lh, lw) float32 logits or None. P is padded to a bucket P' >= P
        (rows past P are padding: slice them off) and run in chunks of `max_prompts`.
        """
        features = self._features(image)
        coords = np.asarray(coords, np.float32)
        labels = np.asarray(labels, np.int32)
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise SamInputError(f"coords must be (P, T, 2) and labels (P, T), got {coords.shape} and {labels.shape}")
        if not np.isfinite(coords).all():
            raise SamInputError("prompt coordinates hold non-finite values (NaN or inf)")
        if not np.isin(labels, TOKEN_LABELS).all():
            raise SamInputError(f"token labels must be in {TOKEN_LABELS}, got "
                                f"{sorted(set(labels[~np.isin(labels, TOKEN_LABELS)].tolist()))}")
        p = len(coords)
        if p == 0:
            raise SamInputError("no prompts given")
        p_pad = bucket(p, self.prompt_buckets)
        coords = np.pad(coords, ((0, p_pad - p), (0, 0), (0, 0)))
        labels = np.pad(labels, ((0, p_pad - p), (0, 0)), constant_values=LABEL_ABSENT)
        has_mask = None
        if mask_input is not None:
            mask_input = np.asarray(mask_input, np.float32)
            if mask_input.shape != (p, *self._mask_size(features)):
                lh, lw = self._mask_size(features)
                raise SamInputError(f"mask_input must be ({p}, 1, {lh}, {lw}) low-res logits, "
                                    f"got {mask_input.shape}")
            if not np.isfinite(mask_input).all():
                raise SamInputError("mask_input holds non-finite values (NaN or inf)")
            has_mask = np.arange(p_pad) < p
            mask_input = np.pad(mask_input, ((0, p_pad - p), (0, 0), (0, 0)))
        lows, ious = [], []
        step = min(p_pad, self.max_prompts)
        for a in range(0, p_pad, step):
            low, iou = self._decode(
                self.params, features, jnp.asarray(coords[a:a + step]), jnp.asarray(labels[a:a + step]),
                None if mask_input is None else jnp.asarray(mask_input[a:a + step]),
                None if has_mask is None else jnp.asarray(has_mask[a:a + step]),
                multimask_output=bool(multimask_output))
            lows.append(low)
            ious.append(iou)
        if len(lows) == 1:
            return lows[0], ious[0]
        return jnp.concatenate(lows), jnp.concatenate(ious)

    def upscale(self, low_res: jax.Array, return_logits: bool = False, image: SamImage | None = None) -> jax.Array:
        """(..., lh, lw) logits -> (..., H, W) device masks (bool, or float32 logits)."""
        image = image or self.image
        sizes = dict(input_size=tuple(image.input_size), original_size=tuple(image.original_size))
        x = self._upscale_w(low_res, self.img_size, sizes["input_size"], sizes["original_size"])
        return self._upscale_h(x, **sizes, low_hw=tuple(low_res.shape[-2:]), logits=bool(return_logits))

    def _features(self, image: SamImage | None) -> jax.Array:
        if image is not None:
            return image.features
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        return self.features

    def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output: bool = True, return_logits: bool = False,
                      image: SamImage | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Many prompts on one image in one jitted decoder call per `max_prompts`.

        point_coords: (P, N, 2) or a list of P (N_i, 2) arrays, (x, y) original pixels;
        point_labels: (P, N) or list of (N_i,); boxes: (P, 4) XYXY; mask_input:
        (P, 1, lh, lw) low-res logits. Any may be None (not all of points and boxes with
        mask_input None gives one prompt of no tokens, as the reference).
        Returns (masks (P, M, H, W) bool, or float32 if return_logits; iou (P, M) float32;
        low_res (P, M, lh, lw) float32), numpy.
        """
        self._features(image)
        image = image or self.image
        coords, labels = self.pack_prompts(point_coords, point_labels, boxes, image.original_size)
        if mask_input is not None:
            mask_input = numeric_array(mask_input, "mask_input").astype(np.float32)
            if mask_input.ndim == 4 and mask_input.shape[1] == 1:
                mask_input = mask_input[:, 0]
            if point_coords is None and boxes is None:  # a mask-only batch
                coords = np.repeat(coords, len(mask_input), axis=0)
                labels = np.repeat(labels, len(mask_input), axis=0)
        p = len(coords)
        low, iou = self.decode(coords, labels, mask_input, multimask_output, image)
        masks = self.upscale(low, return_logits, image)  # on the padded batch: no recompiles
        return (np.asarray(masks)[:p], np.asarray(iou, np.float32)[:p], np.asarray(low, np.float32)[:p])

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                multimask_output: bool = True,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The official `SamPredictor.predict`.

        point_coords (N, 2) (x, y) pixels of the original image; point_labels (N,) 1/0
        (or -1, not a point); box (4,) XYXY; mask_input (1, lh, lw) low-res logits from a
        previous call. Bad input (non-finite numbers, other labels, wrong shapes or
        counts, an inverted box) raises `SamInputError` (see `pack_prompts`).
        Returns masks (M, H, W) bool (float32 logits if return_logits), iou_predictions
        (M,) float32, low_res_logits (M, lh, lw) float32.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if point_coords is not None and point_labels is None:
            raise SamInputError("point_labels must be supplied if point_coords is supplied.")
        pc = None if point_coords is None else [point_coords]
        # like the reference, labels without coordinates are ignored
        pl = None if point_coords is None else [point_labels]
        bx = None
        if box is not None:
            bx = numeric_array(box, "box")
            if bx.shape not in ((4,), (1, 4)):
                raise SamInputError(f"box must be a length-4 XYXY array (x0, y0, x1, y1), got shape {bx.shape}")
            bx = bx.reshape(1, 4)
        mi = None
        if mask_input is not None:
            mi = numeric_array(mask_input, "mask_input").astype(np.float32)
            if mi.ndim != 3 or mi.shape[0] != 1:
                raise SamInputError(f"mask_input must be (1, {self._mask_size()[0]}, {self._mask_size()[1]}), "
                                    f"got shape {mi.shape}")
        masks, iou, low = self.predict_batch(pc, pl, bx, None if mi is None else mi[None],
                                             multimask_output, return_logits)
        return masks[0], iou[0], low[0]


def _prompt_list(value, what: str, shape: str) -> list:
    """Per-prompt point coords / labels: a list (ragged prompts) or a (P, ...) array."""
    if isinstance(value, (list, tuple)):
        return list(value)
    arr = np.asarray(value)
    if arr.ndim != len(shape.split(",")):
        raise SamInputError(f"{what} must be {shape} (or a list of P per-prompt arrays), got shape {arr.shape}")
    return list(arr)
