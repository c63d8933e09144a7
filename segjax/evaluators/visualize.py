"""Detections drawn on images: translucent instance masks, boxes, class names, scores (PIL).

Legend: N instances, H/W image size.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct, saturated colours (golden-ratio hue steps)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95)] for h in hues], np.uint8)


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None,
                    masks: np.ndarray | None = None, class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.5, mask_alpha: float = 0.45, scale: int = 1) -> np.ndarray:
    """Draws instances on a copy of `image`.

    Args:
      image: (H, W, 3) uint8 (or (H, W, 1) grey).
      boxes: (N, 4) XYXY in image pixels; labels: (N,) int (1..K contiguous).
      scores: (N,) or None (ground truth: everything drawn, no score text).
      masks: (N, H, W) bool or probabilities (> 0.5 is inside), or None.
      class_names: names of labels 1..K at index label - 1 (default: the number).
      score_threshold: detections scoring below it are not drawn.
      mask_alpha: mask opacity.
      scale: integer upscaling before drawing, so small images stay legible.

    Returns:
      (H * scale, W * scale, 3) uint8.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    keep = np.ones(len(boxes), bool) if scores is None else np.asarray(scores) >= score_threshold
    colours = palette(max(int(labels.max(initial=0)) + 1, 1))
    canvas = image.astype(np.float32)
    if masks is not None:
        masks = np.asarray(masks)
        binary = masks if masks.dtype == np.bool_ else masks > 0.5
        for i in np.flatnonzero(keep):
            c = colours[int(labels[i])].astype(np.float32)
            canvas[binary[i]] = (1 - mask_alpha) * canvas[binary[i]] + mask_alpha * c
    out = np.clip(canvas.round(), 0, 255).astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, 0).repeat(scale, 1)
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for i in np.flatnonzero(keep):
        colour = tuple(int(v) for v in colours[int(labels[i])])
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=max(1, scale))
        name = class_names[int(labels[i]) - 1] if class_names and 0 < labels[i] <= len(class_names) \
            else str(int(labels[i]))
        text = name if scores is None else f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=font)
    return np.asarray(pil)


def side_by_side(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Concatenates (H_i, W_i, 3) uint8 images left to right on white, top-aligned."""
    h = max(im.shape[0] for im in images)
    tiles = []
    for im in images:
        tile = np.full((h, im.shape[1], 3), 255, np.uint8)
        tile[: im.shape[0]] = im
        tiles += [tile, np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


def one_under_another(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Concatenates (H_i, W_i, 3) uint8 images top to bottom on white, left-aligned."""
    w = max(im.shape[1] for im in images)
    tiles = []
    for im in images:
        tile = np.full((im.shape[0], w, 3), 255, np.uint8)
        tile[:, : im.shape[1]] = im
        tiles += [tile, np.full((gap, w, 3), 255, np.uint8)]
    return np.concatenate(tiles[:-1], axis=0)


def save_png(path: str, image: np.ndarray) -> str:
    """Writes (H, W, 3) uint8 as PNG, creating directories; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    return path
