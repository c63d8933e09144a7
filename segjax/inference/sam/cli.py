"""Segment an image with a converted SAM checkpoint; writes masks and an overlay PNG.

  python -m segjax.inference.sam CKPT_DIR IMAGE --points 320,240 [400,200,0 ...] --out DIR
  python -m segjax.inference.sam CKPT_DIR IMAGE --box 100,80,420,360 [--points ...] --out DIR
  python -m segjax.inference.sam CKPT_DIR IMAGE --everything [--points-per-side 32] --out DIR

Points are x,y[,label] in image pixels (label 1 foreground, the default; 0 background;
-1 "not a point", as the official prompt encoder reads it). Bad input (a file that is not
an image, a non-number, NaN or inf, another label, a box that is not 4 numbers or has
x1 < x0 or y1 < y0) prints one line "error: ..." and exits 2; a zero-width or
zero-height box is accepted, as the reference accepts it. 16-bit and other non-8-bit
images are converted by `segjax.data.decode.decode_image` (16-bit: the high byte).
With prompts, DIR gets mask_<i>.png (0/255) for each returned mask, masks.npz (masks
(M, H, W) bool, scores (M,), low_res_logits) and overlay.png (masks coloured, points and
box drawn). With --everything: mask_<i>.png by decreasing area, masks.npz (masks,
areas, boxes XYWH, predicted_iou, stability_score, point_coords) and overlay.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from segjax.inference.sam.transforms import POINT_LABELS, SamInputError


class _InputError(ValueError):
    """A bad command-line value: one line on stderr, exit status 2."""


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    """'1,2.5,...' -> finite floats, `n` of them."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise _InputError(f"{what} takes comma-separated numbers, got {text!r}") from None
    if len(vals) not in n:
        raise _InputError(f"{what} needs {' or '.join(map(str, n))} comma-separated numbers, got {text!r}")
    if not all(np.isfinite(vals)):
        raise _InputError(f"{what} needs finite numbers, got {text!r}")
    return vals


def _point(text: str) -> tuple[list[float], int]:
    """'x,y[,label]' -> ([x, y], label) with label in {1, 0, -1} (default 1)."""
    vals = _floats(text, (2, 3), "--points")
    if len(vals) == 2:
        return vals, 1
    if vals[2] not in POINT_LABELS:
        raise _InputError(f"--points label must be 1 (foreground), 0 (background) or -1 (not a point), "
                          f"got {text!r}")
    return vals[:2], int(vals[2])


def _box(text: str) -> list[float]:
    box = _floats(text, (4,), "--box")
    if box[2] < box[0] or box[3] < box[1]:
        raise _InputError(f"--box is X0,Y0,X1,Y1 with X0 <= X1 and Y0 <= Y1, got {text!r}")
    return box


def colors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 distinct-ish colours (the first few fixed, then random)."""
    base = np.array([[30, 144, 255], [255, 99, 71], [50, 205, 50], [255, 215, 0], [186, 85, 211],
                     [0, 206, 209], [255, 140, 0], [199, 21, 133]], np.uint8)
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(seed).integers(40, 256, size=(n - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def overlay(image: np.ndarray, masks: np.ndarray, points=None, labels=None, box=None,
            alpha: float = 0.5) -> Image.Image:
    """(H, W, 3) uint8 + (M, H, W) bool masks (drawn in order) -> PIL image with prompts."""
    out = image.astype(np.float32).copy()
    for mask, color in zip(masks, colors(len(masks))):
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
    pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(3, round(max(image.shape[:2]) / 120))
    if points is not None:
        for (x, y), lab in zip(points, labels):
            fill = (0, 200, 0) if lab == 1 else (220, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255), width=max(1, r // 3))
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=(0, 255, 0), width=max(2, r // 2))
    return pil


def _save_masks(out_dir: str, masks: np.ndarray) -> None:
    for i, m in enumerate(masks):
        Image.fromarray(np.asarray(m, np.uint8) * 255).save(os.path.join(out_dir, f"mask_{i}.png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segjax.inference.sam", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="segjax SAM checkpoint dir (python -m segjax.convert sam ...)")
    p.add_argument("image", help="image file (any PIL format; converted to RGB)")
    p.add_argument("--points", nargs="+", default=[], metavar="X,Y[,L]", help="point prompts")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box prompt (XYXY pixels)")
    p.add_argument("--everything", action="store_true", help="automatic mask generation")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--multimask", action=argparse.BooleanOptionalAction, default=None,
                   help="3 masks per prompt (default: only for a single point without box)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--pred-iou-thresh", type=float, default=0.88)
    p.add_argument("--stability-score-thresh", type=float, default=0.95)
    p.add_argument("--crop-n-layers", type=int, default=0)
    p.add_argument("--min-mask-region-area", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (LayerNorm/softmax stay fp32)")
    args = p.parse_args(argv)

    if args.everything and (args.points or args.box is not None):
        p.error("--everything takes no --points / --box")
    if not args.everything and not args.points and args.box is None:
        p.error("give --points and/or --box, or --everything")
    try:
        return _run(args)
    except (_InputError, SamInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    parsed = [_point(t) for t in args.points]
    points = [xy for xy, _ in parsed]
    box = _box(args.box) if args.box is not None else None
    if args.points_per_side < 1 or args.points_per_batch < 1 or args.crop_n_layers < 0:
        raise _InputError("--points-per-side and --points-per-batch must be >= 1, --crop-n-layers >= 0")
    from segjax.data.decode import read_image

    try:
        image = read_image(args.image)
    except (OSError, ValueError) as e:  # missing, unreadable, not an image, unsupported mode
        raise _InputError(f"{args.image}: not a readable image ({type(e).__name__}: {e})") from None

    import jax.numpy as jnp

    from segjax.inference.sam.amg import SamAutomaticMaskGenerator
    from segjax.inference.sam.predictor import SamPredictor

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    predictor = SamPredictor.from_checkpoint(args.ckpt, dtype=jnp.bfloat16 if args.bf16 else None)

    if args.everything:
        amg = SamAutomaticMaskGenerator(
            predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
            crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area)
        records = sorted(amg.generate(image), key=lambda r: r["area"], reverse=True)
        masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, *image.shape[:2]), bool)
        _save_masks(args.out, masks)
        np.savez_compressed(
            os.path.join(args.out, "masks.npz"), masks=masks,
            areas=np.array([r["area"] for r in records], np.int64),
            boxes=np.array([r["bbox"] for r in records], np.int64).reshape(-1, 4),
            predicted_iou=np.array([r["predicted_iou"] for r in records], np.float32),
            stability_score=np.array([r["stability_score"] for r in records], np.float32),
            point_coords=np.array([r["point_coords"][0] for r in records], np.float64).reshape(-1, 2))
        overlay(image, masks).save(os.path.join(args.out, "overlay.png"))
        summary = {"masks": len(records), "seconds": round(time.perf_counter() - t0, 2)}
    else:
        predictor.set_image(image)
        coords = np.array([q[:2] for q in points], np.float64).reshape(-1, 2) if points else None
        labels = np.array([lab for _, lab in parsed], np.int64) if points else None
        multimask = args.multimask if args.multimask is not None else (len(points) == 1 and box is None)
        masks, scores, low = predictor.predict(coords, labels, None if box is None else np.array(box),
                                               multimask_output=multimask)
        order = np.argsort(-scores, kind="stable")
        masks, scores, low = masks[order], scores[order], low[order]
        _save_masks(args.out, masks)
        np.savez_compressed(os.path.join(args.out, "masks.npz"), masks=masks, scores=scores, low_res_logits=low)
        # draw the best mask only: the others overlap it
        overlay(image, masks[:1], coords, labels, box).save(os.path.join(args.out, "overlay.png"))
        summary = {"masks": len(masks), "scores": [round(float(s), 4) for s in scores],
                   "seconds": round(time.perf_counter() - t0, 2)}
    print(json.dumps({"out": os.path.abspath(args.out), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
