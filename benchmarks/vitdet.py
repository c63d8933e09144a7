"""ViTDet Mask R-CNN train step: time, FLOP/s as a fraction of the matmul peak, compile
time and peak memory, for the whole model and for the ViT backbone alone.

Each part runs in its own worker process (peak RSS is attributable):
  matmul     fp32 `jnp.matmul` of two --peak-n^2 matrices (median of 5): the machine's
             measured matmul peak, GFLOP/s
  backbone   the ViT (`ViTDetNet`, train mode: drop path) forward + backward of a random
             linear function of its output, batch --batch at --size
  full       `MaskRCNN.losses` value_and_grad + an SGD update (a train step without the
             optimizer's state), random images and three boxes / masks per image

Columns: step s (median of --reps after one warm-up call), compile s (lower + compile),
GFLOP/s and % peak from two counts: `cost_analysis()['flops']` of the compiled step
(XLA's count of everything) and, for the backbone, an analytic count of the ViT's
matmuls (patch embedding, qkv / proj / MLP, attention logits and values; x3 for
forward + backward); peak MB: the worker's ru_maxrss.

  python benchmarks/vitdet.py                       # ViT-B at 1024, batch 1, fp32
  python benchmarks/vitdet.py --model maskrcnn_vitdet_tiny --size 128 --reps 3
  python benchmarks/vitdet.py --parts backbone --dtype bfloat16 --remat

Recorded figures (date, machine, command): benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def analytic_vit_train_flops(m, size: int, batch: int) -> float:
    """Matmul FLOPs of the ViT trunk (forward x3: forward + backward) at `size`."""
    p, d = m.vit_patch_size, m.vit_embed_dim
    g = size // p
    tokens = g * g
    fwd = 2 * tokens * (3 * p * p) * d  # patch embedding
    ws = m.vit_window_size
    padded = (math.ceil(g / ws) * ws) ** 2
    for i in range(m.vit_depth):
        glob = i in m.vit_global_attn_indexes
        fwd += 2 * tokens * d * d * (3 + 1 + 8)  # qkv, proj, MLP (ratio 4)
        # logits q.k and probs.v over each window / the whole grid; rel-pos terms are small
        fwd += 2 * 2 * (tokens * tokens if glob else padded * ws * ws) * d
    return 3.0 * fwd * batch


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compile(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    secs = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, secs, float((cost or {}).get("flops", float("nan")))


def worker(args) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import models
    from segjax.models.maskrcnn.mask_rcnn import MaskRCNN
    from segjax.models.maskrcnn.vitdet import ViTDetNet

    if args.part == "matmul":
        n = args.peak_n
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        return {"gflops": 2 * n**3 / _timed(lambda: mm(a, b), 5) / 1e9}
    kw = {"dtype": jnp.dtype(args.dtype), "vit_remat": args.remat, "vit_img_size": args.size,
          "min_size": args.size, "max_size": args.size}
    model = models.build(args.model, **kw)
    rng = np.random.default_rng(0)
    s, b = args.size, args.batch
    images = jnp.asarray(rng.uniform(0, 255, (b, s, s, 3)), jnp.float32)
    out = {"analytic_gflop": analytic_vit_train_flops(model, s, b) / 1e9}
    if args.part == "backbone":
        net = ViTDetNet(s, model.vit_pretrain_img_size, model.vit_patch_size, model.vit_embed_dim,
                        model.vit_depth, model.vit_num_heads, window_size=model.vit_window_size,
                        global_attn_indexes=tuple(model.vit_global_attn_indexes),
                        drop_path_rate=model.vit_drop_path_rate, remat=args.remat, dtype=model.dtype)
        x = (images / 255.0 - 0.45) / 0.225
        params = nn.meta.unbox(jax.jit(net.init)(jax.random.key(0), x[:1]))["params"]
        g = s // model.vit_patch_size
        cot = jnp.asarray(rng.standard_normal((b, g, g, model.vit_embed_dim)), jnp.float32)

        def step(p, x, key):
            loss, grads = jax.value_and_grad(lambda q: jnp.sum(
                net.apply({"params": q}, x, True, rngs={"dropout": key}) * cot))(p)
            return loss, jax.tree_util.tree_map(lambda a, c: a - 1e-4 * c, p, grads)
        args_ = (params, x, jax.random.key(1))
    else:
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images[:1],
                                                   jnp.full((1, 2), s, jnp.int32)))["params"]
        masks = np.zeros((b, 3, s, s), np.uint8)
        boxes = np.array([[s * 0.1, s * 0.1, s * 0.5, s * 0.6], [s * 0.4, s * 0.3, s * 0.9, s * 0.8],
                          [s * 0.05, s * 0.6, s * 0.3, s * 0.95]], np.float32)
        for j, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
            masks[:, j, y0:y1, x0:x1] = 1
        batch = {"image": images, "image_hw": jnp.full((b, 2), s, jnp.int32),
                 "boxes": jnp.asarray(np.tile(boxes[None], (b, 1, 1))),
                 "labels": jnp.asarray(np.tile([[1, 2, 3]], (b, 1)), jnp.int32),
                 "masks": jnp.asarray(masks), "valid": jnp.ones((b, 3), bool)}

        def step(p, batch, key):
            def loss_fn(q):
                return model.apply({"params": q}, batch, method=MaskRCNN.losses,
                                   rngs={"sampling": key, "dropout": jax.random.fold_in(key, 1)})[0]
            loss, grads = jax.value_and_grad(loss_fn)(p)
            return loss, jax.tree_util.tree_map(lambda a, c: a - 1e-4 * c, p, grads)
        args_ = (params, batch, jax.random.key(1))
    compiled, out["compile_s"], out["xla_gflop"] = _compile(jax.jit(step), *args_)
    out["xla_gflop"] /= 1e9
    out["step_s"] = _timed(lambda: compiled(*args_), args.reps)
    out["peak_mb"] = _peak_mb()
    out["params_m"] = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params)) / 1e6
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="maskrcnn_vitdet_b")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--peak-n", type=int, default=3072)
    ap.add_argument("--parts", default="matmul,backbone,full")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        print(json.dumps(worker(args)))
        return 0
    res = {}
    for part in args.parts.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--model", args.model, "--size",
               str(args.size), "--batch", str(args.batch), "--reps", str(args.reps), "--dtype", args.dtype,
               "--peak-n", str(args.peak_n)] + (["--remat"] if args.remat else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # e.g. killed for memory (-9): report it, go on with the other parts
            print(f"{part}: worker exited with {proc.returncode}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res[part] = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = res.get("matmul", {}).get("gflops", float("nan"))
    print(f"{args.model} {args.size}x{args.size} batch {args.batch} {args.dtype}{' remat' if args.remat else ''}; "
          f"fp32 matmul peak ({args.peak_n}^3) {peak:.1f} GFLOP/s; load avg {os.getloadavg()[0]:.1f}")
    print("| part | step s | compile s | XLA GFLOP | XLA GFLOP/s (% peak) | ViT analytic GFLOP/s (% peak) | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for part in ("backbone", "full"):
        if part not in res:
            continue
        r = res[part]
        xla = r["xla_gflop"] / r["step_s"]
        ana = r["analytic_gflop"] / r["step_s"]
        print(f"| {part} | {r['step_s']:.2f} | {r['compile_s']:.1f} | {r['xla_gflop']:.1f} | "
              f"{xla:.1f} ({100 * xla / peak:.0f}%) | {ana:.1f} ({100 * ana / peak:.0f}%) | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
