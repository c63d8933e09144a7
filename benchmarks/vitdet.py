"""ViTDet Mask R-CNN train step: time, FLOP/s as a fraction of the matmul peak, compile
time and peak memory, for the whole model and for the ViT backbone alone.

Each part runs in its own worker process (peak RSS is attributable):
  backbone   the ViT (`ViTDetNet`, train mode: drop path) forward + backward of a random
             linear function of its output and an SGD update, batch --batch at --size
  full       `MaskRCNN.losses` value_and_grad + an SGD update (a train step without the
             optimizer's state), random images and three boxes / masks per image
  matmul     the matmul peak alone (also measured inside the two parts above)
  attention  `rel_pos_attention` alone, forward + backward (`jax.grad` of a random
             linear function of its output), at the backbone's grid: one global block
             (B x N heads over all T tokens) and one windowed block (B * windows); the
             analytic count is 3 x 2 x 2 Q S K per head (logits and value product)

The matmul peak is measured in the same process and dtype as the step, interleaved
with it: each repetition times one step, then the median of three --peak-n^2 x
--peak-n^2 `jnp.matmul`s, so load on a shared machine hits both alike. The step's
fraction of peak uses the peak of the same repetition (the median over repetitions is
reported), with the 1-minute load average at each.

Columns: step s (median of --reps after one warm-up call), compile s (lower + compile),
GFLOP/s and % peak from two counts: `cost_analysis()['flops']` of the compiled step
(XLA's count; it counts a `while` loop's body once, so it undercounts the blocked
attention) and, for the backbone, an analytic count of the ViT's matmuls
(`analytic_vit_train_flops`; its % peak is the median over repetitions of each step
against the peak measured right after it); XLA temp MB: the
compiled step's temporary buffer (`memory_analysis()`); peak MB: the worker's ru_maxrss.
The workers call `segjax.xla_flags.setup_cpu(--xla-preset)` (malloc reuse), as the other
CPU benchmarks do.

  python benchmarks/vitdet.py                       # ViT-B at 1024, batch 1, fp32
  python benchmarks/vitdet.py --model maskrcnn_vitdet_tiny --size 128 --reps 3
  python benchmarks/vitdet.py --parts backbone --dtype bfloat16 --remat
  python benchmarks/vitdet.py --parts attention --reps 5

Recorded figures (date, machine, command): benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time


def analytic_vit_train_flops(m, size: int, batch: int) -> float:
    """Matmul FLOPs of the ViT trunk's train step at `size` (2 per multiply-add).

    forward = patch embed 2 T (3 P^2) D + per block 2 T D^2 (3 + 1 + 8) (qkv, proj, MLP
    of ratio 4) + attention 2 * 2 Q S D (logits q k^T and probs . v; global blocks Q = S = T,
    windowed blocks Q = padded tokens, S = window^2); train step = 3 x forward (the
    backward pass has two matmuls per forward one). T = (size / P)^2 tokens. Not counted:
    the rel-pos terms (2 T (H + W) D per block, < 2% of the attention), LayerNorm, GELU,
    softmax, and recomputation (remat, the attention backward's recomputed logits).
    """
    p, d = m.vit_patch_size, m.vit_embed_dim
    g = size // p
    tokens = g * g
    fwd = 2 * tokens * (3 * p * p) * d  # patch embedding
    ws = m.vit_window_size
    padded = (math.ceil(g / ws) * ws) ** 2
    for i in range(m.vit_depth):
        glob = i in m.vit_global_attn_indexes
        fwd += 2 * tokens * d * d * (3 + 1 + 2 * 4)  # qkv, proj, MLP (ViTDetNet's ratio 4)
        fwd += 2 * 2 * (tokens * tokens if glob else padded * ws * ws) * d
    return 3.0 * fwd * batch


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _seconds(fn) -> float:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def _interleaved(step, matmul, flop_mm: float, reps: int) -> dict:
    """One warm-up call each, then `reps` x (one step, median of three matmuls)."""
    _seconds(step)
    _seconds(matmul)
    steps, peaks, loads = [], [], []
    for _ in range(reps):
        steps.append(_seconds(step))
        peaks.append(flop_mm / statistics.median(_seconds(matmul) for _ in range(3)) / 1e9)
        loads.append(os.getloadavg()[0])
    return {"step_s_all": steps, "peak_gflops_all": peaks, "load_all": loads}


def _compile(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    secs = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    temp = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
    return compiled, secs, float((cost or {}).get("flops", float("nan"))), temp


def _attention(args, m, mm, mm_args, flop_mm: float) -> dict:
    """The global and the windowed `rel_pos_attention` of the backbone, fwd + bwd, each
    against the interleaved matmul peak (see `_interleaved`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax.models.vit import rel_pos_attention

    g, ws, n = args.size // m.vit_patch_size, m.vit_window_size, m.vit_num_heads
    kd = m.vit_embed_dim // n
    rng = np.random.default_rng(0)
    out = {}
    for name, (b, h) in {"global": (args.batch, g), "window": (args.batch * math.ceil(g / ws) ** 2, ws)}.items():
        q, k, v, cot = (jnp.asarray(rng.standard_normal((b, h * h, n, kd)), jnp.dtype(args.dtype)) for _ in range(4))
        tabs = tuple(jnp.asarray(0.1 * rng.standard_normal((2 * h - 1, kd)), jnp.dtype(args.dtype)) for _ in range(2))

        def grad(q, k, v, th, tw, h=h, cot=cot):
            return jax.grad(lambda *a: jnp.sum(rel_pos_attention(*a, (h, h)).astype(jnp.float32) * cot),
                            tuple(range(5)))(q, k, v, th, tw)
        compiled, secs, _, temp = _compile(jax.jit(grad), q, k, v, *tabs)
        flop = 3.0 * 2 * 2 * b * n * (h * h) ** 2 * kd
        call = functools.partial(compiled, q, k, v, *tabs)
        r = _interleaved(call, lambda: mm(*mm_args), flop_mm, args.reps)
        r.update(compile_s=secs, xla_temp_mb=temp, analytic_gflop=flop / 1e9,
                 step_s=statistics.median(r["step_s_all"]),
                 analytic_frac_all=[flop / 1e9 / t / pk for t, pk in zip(r["step_s_all"], r["peak_gflops_all"])])
        out[name] = r
    out["peak_mb"] = _peak_mb()
    return out


def worker(args) -> dict:
    from segjax.xla_flags import setup_cpu

    setup_cpu(args.xla_preset)
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import models
    from segjax.models.maskrcnn.mask_rcnn import MaskRCNN
    from segjax.models.maskrcnn.vitdet import ViTDetNet

    n = args.peak_n
    mm_dtype = jnp.dtype(args.dtype)
    mm_a = jax.random.normal(jax.random.key(0), (n, n), mm_dtype)
    mm_b = jax.random.normal(jax.random.key(1), (n, n), mm_dtype)
    mm = jax.jit(jnp.matmul).lower(mm_a, mm_b).compile()
    flop_mm = 2.0 * n**3
    if args.part == "matmul":
        times = [_seconds(lambda: mm(mm_a, mm_b)) for _ in range(1 + args.reps * 3)][1:]
        return {"gflops": flop_mm / statistics.median(times) / 1e9, "load": os.getloadavg()[0]}
    if args.part == "attention":
        return _attention(args, models.build(args.model), mm, (mm_a, mm_b), flop_mm)
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
    compiled, out["compile_s"], out["xla_gflop"], out["xla_temp_mb"] = _compile(jax.jit(step), *args_)
    out["xla_gflop"] /= 1e9
    out.update(_interleaved(lambda: compiled(*args_), lambda: mm(mm_a, mm_b), flop_mm, args.reps))
    out["step_s"] = statistics.median(out["step_s_all"])
    out["peak_gflops"] = statistics.median(out["peak_gflops_all"])
    out["analytic_frac_all"] = [out["analytic_gflop"] / t / pk for t, pk in
                                zip(out["step_s_all"], out["peak_gflops_all"])]
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
    ap.add_argument("--parts", default="backbone,full")
    ap.add_argument("--xla-preset", default="default", help="segjax.xla_flags preset")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        print(json.dumps(worker(args)))
        return 0
    res = {}
    for part in args.parts.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--model", args.model, "--size",
               str(args.size), "--batch", str(args.batch), "--reps", str(args.reps), "--dtype", args.dtype,
               "--peak-n", str(args.peak_n), "--xla-preset", args.xla_preset] + (["--remat"] if args.remat else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:  # e.g. killed for memory (-9): report it, go on with the other parts
            print(f"{part}: worker exited with {proc.returncode}\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        res[part] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{part}: {json.dumps(res[part])}", file=sys.stderr)
    print(f"{args.model} {args.size}x{args.size} batch {args.batch} {args.dtype}{' remat' if args.remat else ''}; "
          f"matmul peak: {args.dtype} {args.peak_n}^3 in the same worker, interleaved; XLA preset {args.xla_preset}")
    if "matmul" in res:
        print(f"matmul alone: {res['matmul']['gflops']:.1f} GFLOP/s (load {res['matmul']['load']:.1f})")
    print("| part | step s | compile s | XLA temp MB | peak MB | matmul peak GFLOP/s | XLA GFLOP | "
          "XLA GFLOP/s (% peak) | ViT analytic GFLOP | ViT analytic GFLOP/s (% peak) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(part, res[part]) for part in ("backbone", "full") if part in res]
    rows += [(f"attention {k} (fwd+bwd)", res["attention"][k]) for k in ("global", "window") if "attention" in res]
    for part, r in rows:
        if "xla_gflop" not in r:  # the attention parts: no XLA count (loops), peak MB of the worker
            r = dict(r, xla_gflop=float("nan"), peak_mb=res["attention"]["peak_mb"],
                     peak_gflops=statistics.median(r["peak_gflops_all"]))
        peak = r["peak_gflops"]
        xla, ana = r["xla_gflop"] / r["step_s"], r["analytic_gflop"] / r["step_s"]
        frac = statistics.median(r["analytic_frac_all"])  # each step against its own repetition's peak
        loads = f"{min(r['load_all']):.1f}-{max(r['load_all']):.1f}"
        print(f"| {part} | {r['step_s']:.2f} | {r['compile_s']:.1f} | {r['xla_temp_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{peak:.1f} | {r['xla_gflop']:.0f} | {xla:.1f} ({100 * xla / peak:.0f}%) | {r['analytic_gflop']:.0f} | "
              f"{ana:.1f} ({100 * frac:.0f}%) | {loads} |")
        print(f"  per repetition: step s {[round(t, 2) for t in r['step_s_all']]}, peak GFLOP/s "
              f"{[round(x, 1) for x in r['peak_gflops_all']]}, analytic fraction "
              f"{[round(x, 3) for x in r['analytic_frac_all']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
