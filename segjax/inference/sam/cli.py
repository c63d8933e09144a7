"""Segment an image with a converted SAM checkpoint; writes masks and an overlay PNG.

  python -m segjax.inference.sam CKPT_DIR IMAGE --points 320,240 [400,200,0 ...] --out DIR
  python -m segjax.inference.sam CKPT_DIR IMAGE --box 100,80,420,360 [--points ...] --out DIR
  python -m segjax.inference.sam CKPT_DIR IMAGE --everything [--points-per-side 32] --out DIR

Points are x,y[,label] in image pixels (label 1 foreground, the default; 0 background).
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


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    vals = [float(v) for v in text.split(",")]
    if len(vals) not in n:
        raise argparse.ArgumentTypeError(f"{what} needs {' or '.join(map(str, n))} comma-separated numbers: {text!r}")
    return vals


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

    try:
        points = [_floats(t, (2, 3), "--points") for t in args.points]
        box = _floats(args.box, (4,), "--box") if args.box else None
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    if args.everything and (points or box):
        p.error("--everything takes no --points / --box")
    if not args.everything and not points and box is None:
        p.error("give --points and/or --box, or --everything")

    import jax.numpy as jnp

    from segjax.inference.sam.amg import SamAutomaticMaskGenerator
    from segjax.inference.sam.predictor import SamPredictor

    image = np.asarray(Image.open(args.image).convert("RGB"))
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
        labels = np.array([int(q[2]) if len(q) == 3 else 1 for q in points], np.int64) if points else None
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
