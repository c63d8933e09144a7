"""Times SAM inference in segjax and the official `segment_anything`, same weights.

Setup: `sam_model_registry[--model]()` (official init, torch seed 0: random weights),
saved as a .pth and converted with `python -m segjax.convert sam`; fp32 unless
--dtype bfloat16 (segjax only). One photo (skimage `coffee`, 400 x 600, upscaled
x`--scale` with PIL bicubic: 800 x 1200 by default) for every measurement:

  set_image      resize + image encoder (1024 x 1024 input), median of --reps-image
  predict 1      one point prompt, multimask (3 masks at the original size, bool)
  predict 64     64 point prompts in one call (segjax `predict_batch`, official
                 `predict_torch` with the points already transformed), single mask each,
                 median of --reps-predict / 2
  amg            SamAutomaticMaskGenerator.generate (embedding included) with
                 points_per_side=--amg-points (16 by default: 256 prompts, 4 batches of
                 64), pred_iou_thresh 0, stability_score_thresh 0 (so every mask reaches
                 NMS and RLE: the slowest path, independent of what random weights predict)

Each framework runs in its own worker process, one after the other (peak RSS is
attributable; nothing else of ours runs meanwhile). compile s: segjax's first call
minus its median steady call (tracing + XLA compilation + first-run costs).
peak MB: the worker's peak resident set size (getrusage).

  python benchmarks/sam.py                       # ViT-B, fp32, both frameworks
  python benchmarks/sam.py --model vit_b --reps-image 3 --reps-predict 20
  python benchmarks/sam.py --skip-torch --dtype bfloat16

The machine's speed can drift between runs (other tenants); for an A/B of two segjax
versions run both interleaved in one process. Recorded figures, with date, machine and
command: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAG = "@@bench "


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _image(scale: float):
    import numpy as np
    import skimage.data
    from PIL import Image

    img = skimage.data.coffee()
    h, w = img.shape[:2]
    if scale != 1:
        img = np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.BICUBIC))
    return img


def _timed(fn, reps: int) -> tuple[float, list[float]]:
    """(first call s, steady call times s)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def _prompts(image, n: int):
    import numpy as np

    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    return rng.uniform([0, 0], [w, h], size=(n, 2))


# ----------------------------------------------------------------------------- workers


def _time_amg(amg, image, reps: int) -> dict:
    """The automatic mask generator's first call and `reps - 1` timed ones (same for both)."""
    n_masks = []
    first, t = _timed(lambda: n_masks.append(len(amg.generate(image))), reps - 1)
    return dict(first=first, times=t, masks=n_masks[-1])


def _worker_torch(args) -> dict:
    import numpy as np
    import torch
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    torch.set_num_threads(args.threads)
    sam = _official(args.model)
    sam.load_state_dict(torch.load(args.pth, map_location="cpu", weights_only=True))
    sam.eval()
    pred = SamPredictor(sam)
    image = _image(args.scale)
    out = {}
    first, t = _timed(lambda: pred.set_image(image), args.reps_image)
    out["set_image"] = dict(first=first, times=t)
    pts = _prompts(image, 64)
    first, t = _timed(lambda: pred.predict(pts[:1], np.ones(1), multimask_output=True), args.reps_predict)
    out["predict_1"] = dict(first=first, times=t)
    tp = torch.as_tensor(pred.transform.apply_coords(pts, pred.original_size), dtype=torch.float)[:, None]
    tl = torch.ones(64, 1, dtype=torch.int)
    first, t = _timed(lambda: pred.predict_torch(tp, tl, multimask_output=False), max(1, args.reps_predict // 2))
    out["predict_64"] = dict(first=first, times=t)
    out["amg"] = _time_amg(SamAutomaticMaskGenerator(sam, points_per_side=args.amg_points, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.0), image, args.reps_amg)
    out["peak_mb"] = _peak_mb()
    return out


def _worker_segjax(args) -> dict:
    from segjax.xla_flags import setup_cpu

    setup_cpu(args.xla_preset)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax.inference.sam.amg import SamAutomaticMaskGenerator
    from segjax.inference.sam.predictor import SamPredictor

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
    pred = SamPredictor.from_checkpoint(args.ckpt, dtype=dtype)
    image = _image(args.scale)
    out = {"backend": jax.default_backend()}

    def set_image():
        pred.set_image(image)
        jax.block_until_ready(pred.features)

    first, t = _timed(set_image, args.reps_image)
    out["set_image"] = dict(first=first, times=t)
    pts = _prompts(image, 64)
    first, t = _timed(lambda: pred.predict(pts[:1], np.ones(1), multimask_output=True), args.reps_predict)
    out["predict_1"] = dict(first=first, times=t)
    first, t = _timed(lambda: pred.predict_batch(pts[:, None], np.ones((64, 1)), multimask_output=False),
                      max(1, args.reps_predict // 2))
    out["predict_64"] = dict(first=first, times=t)
    out["amg"] = _time_amg(SamAutomaticMaskGenerator(pred, points_per_side=args.amg_points, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.0), image, args.reps_amg)
    out["peak_mb"] = _peak_mb()
    return out


# ----------------------------------------------------------------------------- driver


def _official(model: str):
    """The official model: sam_model_registry[model](), or the test suite's tiny SAM
    (`--model tiny`, a smoke test of this script)."""
    if model == "tiny":
        from segjax.testing.sam_official import TINY, build_official

        return build_official(TINY)
    from segment_anything import sam_model_registry

    return sam_model_registry[model]()


def _prepare(args, tmp: str) -> None:
    import torch

    torch.manual_seed(0)
    sam = _official(args.model)
    args.pth = os.path.join(tmp, f"sam_{args.model}.pth")
    torch.save(sam.state_dict(), args.pth)
    args.ckpt = os.path.join(tmp, "ckpt")
    subprocess.run([sys.executable, "-m", "segjax.convert", "sam", args.pth, args.ckpt], check=True, cwd=_REPO,
                   stdout=subprocess.DEVNULL)


def _run_worker(name: str, args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--pth", args.pth, "--ckpt", args.ckpt]
    for k in ("model", "scale", "reps_image", "reps_predict", "reps_amg", "amg_points", "dtype", "threads",
              "xla_preset"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    proc = subprocess.run(argv, cwd=_REPO, capture_output=True, text=True)
    lines = [ln[len(_TAG):] for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def _row(name: str, ours: dict, ref: dict | None, per: int = 1) -> str:
    med = statistics.median(ours["times"] or [ours["first"]])  # a single run: its first call
    s = f"{name:<12} segjax {med * 1e3 / per:9.1f} ms"
    if per > 1:
        s += f" per prompt ({med:.3f} s per call)"
    s += f"   compile {ours['first'] - med:6.1f} s" if ours["times"] else "   (first call)"
    if ref is not None:
        rmed = statistics.median(ref["times"] or [ref["first"]])
        s += f" | official {rmed * 1e3 / per:9.1f} ms   ratio (official/segjax) {rmed / med:5.2f}x"
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h", "tiny"))
    p.add_argument("--scale", type=float, default=2.0, help="upscale of the 400x600 photo")
    p.add_argument("--reps-image", type=int, default=3)
    p.add_argument("--reps-predict", type=int, default=10)
    p.add_argument("--reps-amg", type=int, default=2, help="AMG runs (first one counts as warm-up)")
    p.add_argument("--amg-points", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--xla-preset", default="default")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=("torch", "segjax"), help=argparse.SUPPRESS)
    p.add_argument("--pth", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = (_worker_torch if args.worker == "torch" else _worker_segjax)(args)
        print(_TAG + json.dumps(res), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        _prepare(args, tmp)
        print(f"prepared {args.model} weights + conversion in {time.perf_counter() - t0:.1f} s", flush=True)
        ours = _run_worker("segjax", args)
        print("segjax:", json.dumps(ours), flush=True)  # kept if the reference run is cut short
        ref = None if args.skip_torch else _run_worker("torch", args)
    h, w = _image(args.scale).shape[:2]
    print(f"\nSAM {args.model}, image {h}x{w}, segjax {args.dtype} on {ours['backend']}, "
          f"{os.cpu_count()} CPUs, AMG points_per_side={args.amg_points}")
    print(_row("set_image", ours["set_image"], ref and ref["set_image"]))
    print(_row("predict 1", ours["predict_1"], ref and ref["predict_1"]))
    print(_row("predict 64", ours["predict_64"], ref and ref["predict_64"], per=64))
    print(_row("amg", ours["amg"], ref and ref["amg"]) + f"   masks {ours['amg']['masks']}"
          + ("" if ref is None else f" (official {ref['amg']['masks']})"))
    print(f"peak RSS: segjax {ours['peak_mb']:.0f} MB" + ("" if ref is None else f", official {ref['peak_mb']:.0f} MB"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"segjax": ours, "official": ref, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
