"""Interactive segmentation evaluation: simulated clicks, mIoU@k, NoC@t, box-prompt mIoU, pictures.

Legend: P masks of one image, C max clicks, T = C + 1 prompt tokens, K masks per
prompt (3 with multimask output, else 1), S model input side, (h, w) the resized
image inside it, (lh, lw) low-res logits size, N masks of the whole evaluation.

The protocol of RITM (Sofiiuk et al. 2022, `isegm/inference/clicker.py`) as the SAM
paper uses it:
  - click 1 at the point of the object farthest from its boundary; each further click
    at the point farthest from the boundary of the larger error region: the
    Euclidean distance transform of the false negatives and of the false positives,
    each zero padded by one pixel first so the image border counts as boundary
    (scipy's `distance_transform_edt`; RITM calls OpenCV's exact DIST_L2), already
    clicked pixels excluded; the false negatives win only when their maximum distance
    is strictly larger (label 1), else the false positives (label 0); ties between
    points go to the first in row-major order. A round whose error region is empty
    (or only clicked pixels) adds no click;
  - every round after the first feeds the previous round's low-res logits as the mask
    prompt; round 1 uses the multimask output and keeps the mask of highest predicted
    IoU, later rounds the single-mask output (the official predictor's token layout:
    the clicks, then a "not a point" padding token; here further padded to T with the
    absent label, which changes nothing);
  - IoU is measured in the resized, unpadded input frame (h, w): the logits are
    upscaled to S x S as `Sam.postprocess_masks` does (bilinear, no antialias),
    cropped to (h, w) and thresholded at 0; ground truth comes from
    `segjax.data.sam`'s evaluation batches (full-resolution masks at S);
  - mIoU@k: mean IoU after k clicks; NoC@t: the first click count whose IoU >= t,
    `max_clicks` (20) when never reached (RITM's `_get_noc`); NoF@t: the fraction
    never reaching t; box mIoU: one round with the tight ground-truth box (XYXY, max
    corner one past the last pixel) and the single-mask output.
  Empty ground-truth masks (and padding slots) are skipped and counted. A mask stops
  getting clicks once it has max(report_clicks) clicks and IoU >= max(iou_thresholds)
  (nothing the metrics read changes after that); an image stops when all its masks did.

The image embedding is computed once per image (a jitted `Sam.embed_image`); each
round decodes all P masks of the image in one jitted `Sam.predict_masks` call with
static shapes (T tokens, one program per multimask flag).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import ImageDraw
from scipy.ndimage import distance_transform_edt

from segjax.data.sam import iterate_examples, tight_box
from segjax.evaluators.visualize import side_by_side
from segjax.inference.sam.cli import overlay
from segjax.inference.sam.postprocess import upscale_masks
from segjax.inference.sam.predictor import PROMPT_BUCKETS, bucket
from segjax.models.sam.prompt_encoder import ABSENT

PAD_POINT, BOX_TL, BOX_BR = -1, 2, 3

# decode(coords (P, T, 2) float32 (x, y), labels (P, T) int32, mask_input (P, lh, lw) float32
#        or None, multimask) -> (masks (P, h, w) bool, low_res (P, lh, lw), iou_pred (P,)): with
# multimask, of each prompt's output with the highest predicted IoU.
Decode = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", bool], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Click:
    """A simulated click: pixel (y, x) of the resized frame, positive (foreground) or not."""

    y: int
    x: int
    positive: bool


def next_click(gt: np.ndarray, pred: np.ndarray, not_clicked: np.ndarray | None = None) -> Click | None:
    """RITM's next click (module doc) for one mask.

    Args:
      gt, pred: (h, w) bool ground truth and current prediction (all False before click 1).
      not_clicked: (h, w) bool, False at pixels already clicked (they are never chosen).

    Returns:
      The click, or None when no error pixel is left to click.
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    best = []  # (max distance, y, x) of the false negatives, then of the false positives
    for region in (gt & ~pred, pred & ~gt):
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        if not len(rows):
            best.append((0.0, 0, 0))
            continue
        # The distance transform of the region's bounding box, zero padded by one pixel,
        # equals the whole padded image's there: the ring around the box is background,
        # and the nearest background pixel of any pixel inside is never beyond it.
        y0, x0 = rows[0], cols[0]
        box = (slice(y0, rows[-1] + 1), slice(x0, cols[-1] + 1))
        dt = distance_transform_edt(np.pad(region[box], 1))[1:-1, 1:-1]
        if not_clicked is not None:
            dt = dt * not_clicked[box]
        y, x = np.unravel_index(np.argmax(dt), dt.shape)  # the first maximum in row-major order
        best.append((float(dt[y, x]), int(y0 + y), int(x0 + x)))
    (fn_max, *fn_at), (fp_max, *fp_at) = best
    if max(fn_max, fp_max) <= 0:
        return None
    positive = fn_max > fp_max
    y, x = fn_at if positive else fp_at
    return Click(y, x, positive)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(..., h, w) bool x (..., h, w) bool -> (...) float64 IoU (1 where both are empty)."""
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1))
    union = np.logical_or(pred, gt).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def number_of_clicks(ious: np.ndarray, threshold: float, max_clicks: int) -> np.ndarray:
    """(..., C) IoU after 1..C clicks -> (...) int: first k with IoU >= threshold, else max_clicks."""
    reached = np.asarray(ious)[..., :max_clicks] >= threshold
    return np.where(reached.any(-1), reached.argmax(-1) + 1, max_clicks)


def simulate_clicks(decode: Decode, gt: np.ndarray, *, max_clicks: int = 20, stop_iou: float = 1.0,
                    min_clicks: int = 1, keep_rounds: Sequence[int] = (), keep_masks: int = 0):
    """Runs the click protocol on the P masks of one image.

    Args:
      decode: the model on this image (see `Decode`; `SamDecoder` is the real one).
      gt: (P, h, w) bool non-empty ground-truth masks.
      max_clicks: C.
      stop_iou, min_clicks: a mask stops getting clicks once it has min_clicks clicks
        and IoU >= stop_iou; its later IoUs repeat its last one.
      keep_rounds, keep_masks: predictions of these rounds (1-based) of the first
        keep_masks masks are returned, for pictures.

    Returns:
      ious: (P, C) float64 IoU after each click;
      clicks: P lists of Click, in order;
      kept: {(mask, round): (h, w) bool prediction}.
    """
    gt = np.asarray(gt, bool)
    p, h, w = gt.shape
    coords = np.zeros((p, max_clicks + 1, 2), np.float32)
    labels = np.full((p, max_clicks + 1), ABSENT, np.int32)
    not_clicked = np.ones((p, h, w), bool)
    pred = np.zeros((p, h, w), bool)
    ious = np.zeros((p, max_clicks))
    active = np.ones(p, bool)
    clicks: list[list[Click]] = [[] for _ in range(p)]
    kept = {}
    mask_input = None
    for r in range(max_clicks):
        for i in np.flatnonzero(active):
            click = next_click(gt[i], pred[i], not_clicked[i])
            if click is None:
                continue
            n = len(clicks[i])
            clicks[i].append(click)
            not_clicked[i, click.y, click.x] = False
            coords[i, n] = (click.x, click.y)
            labels[i, n] = int(click.positive)
            labels[i, n + 1] = PAD_POINT  # the official predictor's padding point (no box)
        new_pred, mask_input, _ = decode(coords, labels, mask_input, r == 0)
        pred = np.where(active[:, None, None], np.asarray(new_pred, bool), pred)
        ious[:, r] = np.where(active, mask_iou(pred, gt), ious[:, r - 1] if r else 0.0)
        for i in range(min(keep_masks, p)):
            if r + 1 in keep_rounds:
                kept[(i, r + 1)] = pred[i].copy()
        active &= ~((ious[:, r] >= stop_iou) & (r + 1 >= min_clicks))
        if not active.any():
            ious[:, r + 1:] = ious[:, r:r + 1]
            break
    return ious, clicks, kept


def box_prompts(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, h, w) bool -> coords (P, 2, 2) float32 box corners (tight XYXY), labels (P, 2)."""
    boxes = np.stack([tight_box(m) for m in gt]) if len(gt) else np.zeros((0, 4), np.float32)
    return boxes.reshape(-1, 2, 2), np.tile(np.array([[BOX_TL, BOX_BR]], np.int32), (len(gt), 1))


@functools.lru_cache(maxsize=8)
def _programs(model) -> tuple[Callable, Callable]:
    """The jitted encoder and decoder of a model (cached: an evaluation during training
    compiles them once per run, not once per evaluation)."""

    def embed(params, images, input_hw):
        return model.apply({"params": params}, images, input_hw, method="embed_image")

    def decode(params, features, coords, labels, mask_input, has_mask, multimask):
        out = model.apply({"params": params}, features, coords[None], labels[None],
                          mask_input=mask_input[None, ..., None], has_mask=has_mask[None],
                          multimask_output=multimask, method="predict_masks")
        low, iou = out["low_res_logits"][0], out["iou_predictions"][0]  # (P, K, lh, lw), (P, K)
        k = jnp.argmax(iou, axis=-1)  # the highest predicted IoU (K = 1: the single mask)
        low = jnp.take_along_axis(low, k[:, None, None, None], axis=1)[:, 0]  # (P, lh, lw)
        iou = jnp.take_along_axis(iou, k[:, None], axis=1)[:, 0]
        s = model.img_size
        return upscale_masks(low, s, (s, s), (s, s)) > 0.0, low, iou  # masks (P, S, S)

    return jax.jit(embed), jax.jit(decode, static_argnames=("multimask",))


class SamDecoder:
    """`Decode` for a SAM model: embeds an image once (`set_image`), then decodes prompts.

    Jitted: the encoder per image batch shape, the decoder + upscaling per (P, T,
    multimask), P padded to the predictor's prompt buckets; the S x S masks are cropped
    to (h, w) on the host (no program per image size).
    """

    def __init__(self, model, params):
        if set(params) == {"params"}:
            params = params["params"]
        self.model, self.params = model, params
        self.img_size = int(model.img_size)
        self._embed, self._decode = _programs(model)
        self.features = None
        self.hw = (0, 0)

    def set_image(self, image: np.ndarray, image_hw: Sequence[int]) -> None:
        """image: (S, S, 3) float32 0..255 padded; image_hw: the resized (h, w)."""
        hw = np.asarray(image_hw, np.int32).reshape(1, 2)
        self.features = self._embed(self.params, jnp.asarray(image, jnp.float32)[None], jnp.asarray(hw))
        self.hw = (int(hw[0, 0]), int(hw[0, 1]))

    def __call__(self, coords, labels, mask_input, multimask):
        n = len(labels)
        p = bucket(n, PROMPT_BUCKETS)  # static prompt counts: copies of prompt 0 fill the bucket
        lh, lw = 4 * self.features.shape[1], 4 * self.features.shape[2]
        has_mask = np.full((p,), mask_input is not None)
        if mask_input is None:
            mask_input = np.zeros((n, lh, lw), np.float32)
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], p - n, axis=0)]) if p > n else a  # noqa: E731
        coords, labels, mask_input = pad(np.asarray(coords)), pad(np.asarray(labels)), pad(np.asarray(mask_input))
        masks, low, iou = self._decode(self.params, self.features, jnp.asarray(coords, jnp.float32),
                                       jnp.asarray(labels, jnp.int32), jnp.asarray(mask_input, jnp.float32),
                                       jnp.asarray(has_mask), multimask=bool(multimask))
        h, w = self.hw
        return np.asarray(masks)[:n, ..., :h, :w], np.asarray(low)[:n], np.asarray(iou)[:n]


def summarize(ious: np.ndarray, box_ious: np.ndarray, *, max_clicks: int = 20,
              iou_thresholds: Sequence[float] = (0.85, 0.90), report_clicks: Sequence[int] = (1, 3, 5),
              num_skipped: int = 0) -> dict[str, float]:
    """Metrics of N evaluated masks.

    Args:
      ious: (N, C) IoU after 1..C clicks; box_ious: (N,) IoU of the box prompt.

    Returns:
      {miou@k for k in report_clicks, noc@t and nof@t for t in iou_thresholds (t as a
       percentage: noc@85), miou_box, num_masks, num_skipped}; NaN metrics when N = 0.
    """
    ious = np.asarray(ious, np.float64).reshape(-1, max_clicks)
    n = len(ious)
    report_clicks = [k for k in report_clicks if k <= max_clicks]
    nan = float("nan")
    out = {f"miou@{k}": float(ious[:, k - 1].mean()) if n else nan for k in report_clicks}
    for t in iou_thresholds:
        name = f"{round(100 * t):d}"
        noc = number_of_clicks(ious, t, max_clicks)
        out[f"noc@{name}"] = float(noc.mean()) if n else nan
        out[f"nof@{name}"] = float((~(ious >= t).any(-1)).mean()) if n else nan
    out["miou_box"] = float(np.mean(box_ious)) if n else nan
    out["num_masks"] = float(n)
    out["num_skipped"] = float(num_skipped)
    return out


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(image, np.float32)), 0, 255).astype(np.uint8)


def draw_example(image: np.ndarray, gt: np.ndarray, clicks: Sequence[Click], rounds: dict[int, np.ndarray],
                 ious: np.ndarray, box: np.ndarray | None = None, box_pred: np.ndarray | None = None,
                 box_iou: float | None = None) -> np.ndarray:
    """One evaluated mask as an RGB strip: per shown round the image with that round's
    clicks (green foreground, red background) and predicted mask, then the box prompt's
    mask, then the ground truth.

    Args:
      image: (h, w, 3) uint8 (or float 0..255); gt: (h, w) bool.
      clicks: the mask's clicks in order; rounds: {k: (h, w) bool prediction after k clicks};
      ious: (C,) IoU per round; box (4,) XYXY, box_pred (h, w) bool, box_iou: the box round.

    Returns:
      (H', W', 3) uint8, small images upscaled by an integer factor so clicks stay visible.
    """
    image = _to_uint8(image)
    h, w = image.shape[:2]
    f = max(1, math.ceil(192 / max(h, w)))
    up = lambda a: np.asarray(a).repeat(f, 0).repeat(f, 1)  # noqa: E731
    big = up(image)

    def tile(mask, text, points=(), box_xyxy=None):
        pts = [((c.x + 0.5) * f, (c.y + 0.5) * f) for c in points]
        pil = overlay(big, up(mask)[None], pts or None, [int(c.positive) for c in points],
                      None if box_xyxy is None else np.asarray(box_xyxy, np.float32) * f)
        ImageDraw.Draw(pil).text((3, 2), text, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
        return np.asarray(pil)

    tiles = [tile(rounds[k], f"{k} click{'s' * (k > 1)} IoU {ious[k - 1]:.2f}", clicks[:k]) for k in sorted(rounds)]
    if box_pred is not None:
        tiles.append(tile(box_pred, f"box IoU {box_iou:.2f}", box_xyxy=box))
    tiles.append(tile(gt, "ground truth"))
    return side_by_side(tiles)


def collect(decoder, examples: Iterable[dict], *, max_clicks: int = 20, iou_thresholds=(0.85, 0.90),
            report_clicks=(1, 3, 5), num_draw: int = 4):
    """Runs the protocol over `examples` with `decoder` (a `SamDecoder`, or any object with
    `set_image(image, image_hw)` and the `Decode` call).

    Args:
      examples: per-image dicts {image (S, S, 3) float32, image_hw (2,), masks (M, S, S)
        bool at the input resolution, valid (M,) bool}, or eval batches of them.

    Returns:
      ious (N, C), box_ious (N,), num_skipped (empty or padding masks are not counted),
      pictures (list of (H', W', 3) uint8: the first mask of each of the first num_draw images).
    """
    report_clicks = tuple(k for k in report_clicks if k <= max_clicks)
    all_ious, all_box, pictures = [], [], []
    skipped = 0
    for ex in iterate_examples(examples):
        h, w = (int(v) for v in np.asarray(ex["image_hw"]).reshape(2))
        masks = np.asarray(ex["masks"], bool)[:, :h, :w]
        valid = np.asarray(ex.get("valid", np.ones(len(masks), bool)), bool).reshape(-1)
        nonempty = masks.any(axis=(1, 2))
        skipped += int((valid & ~nonempty).sum())
        gt = masks[valid & nonempty]
        if not len(gt):
            continue
        decoder.set_image(ex["image"], (h, w))
        draw = int(len(pictures) < num_draw)  # the first mask of each image, for variety
        ious, clicks, kept = simulate_clicks(decoder, gt, max_clicks=max_clicks, stop_iou=max(iou_thresholds),
                                             min_clicks=max(report_clicks, default=1), keep_rounds=report_clicks,
                                             keep_masks=draw)
        coords, labels = box_prompts(gt)
        box_pred, _, _ = decoder(coords, labels, None, False)
        box_pred = np.asarray(box_pred, bool)
        box_ious = mask_iou(box_pred, gt)
        all_ious.append(ious)
        all_box.append(box_ious)
        image = np.asarray(ex["image"])[:h, :w]
        for i in range(draw):
            rounds = {k: v for (j, k), v in kept.items() if j == i}
            pictures.append(draw_example(image, gt[i], clicks[i], rounds, ious[i], coords[i].reshape(4),
                                         box_pred[i], float(box_ious[i])))
    ious = np.concatenate(all_ious) if all_ious else np.zeros((0, max_clicks))
    box = np.concatenate(all_box) if all_box else np.zeros((0,))
    return ious, box, skipped, pictures


def evaluate_interactive(model, params, examples: Iterable[dict], *, max_clicks: int = 20,
                         iou_thresholds: Sequence[float] = (0.85, 0.90), report_clicks: Sequence[int] = (1, 3, 5),
                         num_draw: int = 4) -> tuple[dict[str, float], list[np.ndarray]]:
    """The interactive protocol (module doc) of a SAM model on `examples`.

    Args:
      model: a `segjax.models.sam.Sam`; params: its parameters ({"params": ...} or the inner dict).
      examples: per-image dicts or eval batches from `segjax.data.sam.make_loader(..., train=False)`.
      max_clicks: C (NoC cap); iou_thresholds: NoC targets; report_clicks: the k of mIoU@k;
      num_draw: pictures of the first mask of the first num_draw images.

    Returns:
      (metrics: `summarize`'s dict, pictures: list of (H', W', 3) uint8 strips).
    """
    ious, box, skipped, pictures = collect(SamDecoder(model, params), examples, max_clicks=max_clicks,
                                           iou_thresholds=iou_thresholds, report_clicks=report_clicks,
                                           num_draw=num_draw)
    metrics = summarize(ious, box, max_clicks=max_clicks, iou_thresholds=iou_thresholds,
                        report_clicks=report_clicks, num_skipped=skipped)
    return metrics, pictures
