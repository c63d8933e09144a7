"""GPU check: RoIAlign, Mask R-CNN R50-FPN and an MAE ViT-B/16 train step, segjax vs PyTorch.

One process, one accelerator, sections one after the other (JAX's default backend and
torch on "cuda"; both allocate on demand: XLA_PYTHON_CLIENT_PREALLOCATE=false). Each
section is guarded, so a failure is printed and the next section still runs; rows are
printed as they are measured and the whole table again at the end. Sections that would
not fit into `--budget` seconds (rough estimates) are skipped, so a device run with a
hard time limit still prints what it measured.

  roi     RoIAlign on (2, 200, 200, 256) fp32 features (torchvision: the same values as
          NCHW), 1000 RoIs (benchmarks/roi_align.py's boxes), 7x7, sampling_ratio 2,
          aligned, scale 1/4: segjax impl="gather" and impl="matmul" (precision
          "highest") vs torchvision.ops.roi_align. Forward and forward+backward
          (gradient of sum(out * g) w.r.t. the features); max |diff| vs torchvision.
  mae     MAE ViT-B/16 pretraining step (forward, backward, AdamW b=(0.9, 0.95) wd 0.05),
          batch 64 at 224, mask ratio 0.75: segjax fp32 (the backend's default dot
          precision; on NVIDIA GPUs XLA's default for fp32 dots/convs is TF32), bf16
          compute (fp32 params), fp32 with precision "highest"; vs
          transformers.ViTMAEForPreTraining + torch.optim.AdamW in fp32 (torch's default:
          no TF32 matmuls), fp32 with TF32 matmuls allowed, and torch.autocast bf16.
  mrcnn   Mask R-CNN R50-FPN eval forward on one 800x800 photo (skimage astronaut):
          torchvision MaskRCNN as its COCO weights build it (FrozenBatchNorm2d,
          trainable layers 3), seeded random weights made non-degenerate by
          segjax/testing/maskrcnn_ref.r50_torch, converted with
          segjax.convert.maskrcnn.from_state_dict. segjax: jit(model.apply) on the padded
          input (no host resize, no mask pasting); torchvision: model([img]) (includes
          its transform and mask pasting). Detections counted on both sides.
  mrcnn_train  Mask R-CNN train step, batch 2 of 800x800 images with 6 instances
          (benchmarks/mask_rcnn.py's targets), the five losses, backward, SGD momentum
          0.9, lr 0.02 (--mrcnn-lr), wd 1e-4, frozen layers kept frozen on both sides.

Usage:
  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py           # GPU, full sizes
  JAX_PLATFORMS=cpu python3 benchmarks/gpu_check.py --smoke    # tiny sizes, CPU ok
  python3 benchmarks/gpu_check.py --sections roi,mae --budget 300

Numbers: `ms` median wall time per call (per step for training) after warm-up calls,
`min` the fastest; synchronised with jax.block_until_ready / torch.cuda.synchronize.
`compile s` segjax lower + XLA compile (torch: eager, none). `img/s` = batch / median.

Recorded figures, with date, machine and command: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch


ROWS: list[str] = []
HDR = f"{'section':12} {'impl':34} {'ms':>9} {'min':>9} {'compile s':>9} {'img/s':>8}  note"
# rough seconds per section on an H100/H200 (for --budget); smoke runs ignore the budget
ESTIMATE = {"roi": 40, "mae": 150, "mrcnn": 90, "mrcnn_train": 120}


def row(section, impl, ms=None, ms_min=None, compile_s=None, ips=None, note=""):
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    line = (f"{section:12} {impl:34} {f(ms, '9.2f'):>9} {f(ms_min, '9.2f'):>9} {f(compile_s, '9.1f'):>9} "
            f"{f(ips, '8.1f'):>8}  {note}")
    ROWS.append(line)
    print(line, flush=True)


def timed(fn, sync, iters, warmup=1):
    """(median ms, min ms) of `iters` synchronised calls after `warmup` untimed ones."""
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts), min(ts)


def compile_jit(fn, *args, **jit_kw):
    """(compiled, seconds for lower + compile)."""
    import jax

    t = time.perf_counter()
    c = jax.jit(fn, **jit_kw).lower(*args).compile()
    return c, time.perf_counter() - t


class Env:
    def __init__(self, smoke: bool):
        import jax
        import torch

        self.jax, self.torch = jax, torch
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.dev.type == "cpu":
            torch.set_num_threads(1 if smoke else os.cpu_count())

    def jsync(self, x):
        return self.jax.block_until_ready(x)

    def tsync(self, _=None):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        import gc

        gc.collect()
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections


def section_roi(env, a):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import roi_align as roi_bench  # benchmarks/roi_align.py: the same inputs
    import torchvision

    from segjax.ops import roi_align

    torch = env.torch
    s = SimpleNamespace(batch=2, boxes=a.roi_boxes, size=a.roi_size, channels=a.roi_channels, out=7,
                        scale=0.25, sampling_ratio=2)
    feats, boxes, g = roi_bench._inputs(s)
    note0 = f"({s.batch},{s.size},{s.size},{s.channels}) {s.boxes} RoIs"
    b, r = boxes.shape[:2]
    x = torch.from_numpy(feats).permute(0, 3, 1, 2).contiguous().to(env.dev)
    ids = torch.arange(b, dtype=torch.float32).repeat_interleave(r)[:, None]
    rois = torch.cat([ids, torch.from_numpy(boxes.reshape(-1, 4))], 1).to(env.dev)
    gt = torch.from_numpy(g.reshape(b * r, 7, 7, -1)).permute(0, 3, 1, 2).contiguous().to(env.dev)

    def t_fwd():
        with torch.no_grad():
            return torchvision.ops.roi_align(x, rois, 7, s.scale, s.sampling_ratio, True)

    def t_fwd_bwd():
        xx = x.detach().requires_grad_(True)
        y = torchvision.ops.roi_align(xx, rois, 7, s.scale, s.sampling_ratio, True)
        y.backward(gt)
        return y, xx.grad

    ref_out = t_fwd().permute(0, 2, 3, 1).cpu().numpy().reshape(b, r, 7, 7, -1)
    ref_grad = t_fwd_bwd()[1].permute(0, 2, 3, 1).cpu().numpy()
    m, mn = timed(t_fwd, env.tsync, a.iters, 2)
    row("roi", "torchvision fwd", m, mn, note=note0)
    m, mn = timed(t_fwd_bwd, env.tsync, a.iters, 2)
    row("roi", "torchvision fwd+bwd", m, mn)

    fj, bj, gj = jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(g)
    for impl, prec in (("gather", None), ("matmul", "highest")):
        try:
            kw = dict(output_size=7, spatial_scale=s.scale, sampling_ratio=s.sampling_ratio, aligned=True,
                      impl=impl, precision=prec)

            def fwd(f, bx, kw=kw):
                return roi_align(f, bx, **kw)

            def fwd_bwd(f, bx, gg, kw=kw):
                out, vjp = jax.vjp(lambda f: roi_align(f, bx, **kw), f)
                return out, vjp(gg)[0]

            cf, sf = compile_jit(fwd, fj, bj)
            cb, sb = compile_jit(fwd_bwd, fj, bj, gj)
            out = np.asarray(cf(fj, bj))
            grad = np.asarray(cb(fj, bj, gj)[1])
            d_out = float(np.abs(out.astype(np.float64) - ref_out).max())
            d_grad = float(np.abs(grad.astype(np.float64) - ref_grad).max())
            name = f"segjax {impl}" + (f" ({prec})" if prec else "")
            m, mn = timed(lambda cf=cf: cf(fj, bj), env.jsync, a.iters, 2)
            row("roi", f"{name} fwd", m, mn, sf, note=f"max|diff| vs tv: out {d_out:.2e}")
            m, mn = timed(lambda cb=cb: cb(fj, bj, gj), env.jsync, a.iters, 2)
            row("roi", f"{name} fwd+bwd", m, mn, sb, note=f"grad {d_grad:.2e} (|grad| max "
                f"{np.abs(ref_grad).max():.2g})")
        except Exception as e:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            row("roi", f"segjax {impl}", note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
        env.free()


def section_mae(env, a):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import mae_train_step as mae_bench  # benchmarks/mae_train_step.py: config + torch reference
    import optax

    from segjax import models

    torch = env.torch
    batch, name, steps = a.mae_batch, a.mae_model, a.mae_steps
    cfg = mae_bench._model_cfg(name)
    flops = mae_bench.analytic_train_flops(cfg, batch, 0.75)
    imgs_np = mae_bench._images(batch, cfg["img_size"])
    note0 = f"{name} batch {batch} @{cfg['img_size']}, {flops / 1e12:.2f} TFLOP/step (matmuls)"

    def segjax_run(label, dtype, precision):
        model = models.build(name, dtype=dtype)
        imgs = jnp.asarray(imgs_np)
        k0, k1, key = jax.random.split(jax.random.key(0), 3)
        params = nn.meta.unbox(model.init({"params": k0, "masking": k1}, imgs[:1]))["params"]
        labels = {k: "frozen" if k in ("pos_embed", "decoder_pos_embed") else "train" for k in params}
        tx = optax.multi_transform({"train": optax.adamw(1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05),
                                    "frozen": optax.set_to_zero()}, labels)
        opt = tx.init(params)

        def loss_fn(p, x, k):
            return model.apply({"params": p}, x, rngs={"masking": k}, mask_ratio=0.75)["loss"]

        def step(p, o, x, k, i):
            loss, grads = jax.value_and_grad(loss_fn)(p, x, jax.random.fold_in(k, i))
            upd, o = tx.update(grads, o, p)
            return optax.apply_updates(p, upd), o, loss

        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            c, sc = compile_jit(step, params, opt, imgs, key, 0, donate_argnums=(0, 1))
        state = {"s": (params, opt), "i": 0}

        def one():
            p, o, loss = c(*state["s"], imgs, key, state["i"])
            state["s"], state["i"] = (p, o), state["i"] + 1
            return loss

        m, mn = timed(one, env.jsync, steps, 2)
        loss = float(one())
        row("mae", label, m, mn, sc, 1e3 * batch / m,
            f"{flops / m / 1e9:.1f} TFLOP/s, loss {loss:.3f}")

    def torch_run(label, tf32, autocast):
        w = mae_bench._TorchWorker(SimpleNamespace(peak_n=8, peak_only=False, model=name, mask_ratio=0.75,
                                                   lr=1.5e-4, batch=batch))
        model = w.model.to(env.dev).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4,
                                betas=(0.9, 0.95), weight_decay=0.05)
        x = w.x.to(env.dev)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            def one():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(env.dev.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = model(pixel_values=x).loss
                loss.backward()
                opt.step()
                return loss

            m, mn = timed(one, env.tsync, steps, 2)
            loss = one().item()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        row("mae", label, m, mn, None, 1e3 * batch / m,
            f"{flops / m / 1e9:.1f} TFLOP/s, loss {loss:.3f}, attn={w.info.get('attn_implementation')}")

    print(f"# mae: {note0}", flush=True)
    runs = [("segjax fp32 (default precision)", lambda: segjax_run("segjax fp32 (default precision)",
                                                                    jnp.float32, None)),
            ("torch fp32", lambda: torch_run("torch fp32", False, False)),
            ("segjax bf16", lambda: segjax_run("segjax bf16", jnp.bfloat16, None)),
            ("torch bf16 autocast", lambda: torch_run("torch bf16 autocast", False, True)),
            ("torch fp32 tf32", lambda: torch_run("torch fp32 tf32", True, False)),
            ("segjax fp32 highest", lambda: segjax_run("segjax fp32 (precision highest)", jnp.float32,
                                                       "highest"))]
    for label, fn in runs:
        if not a.smoke and time.perf_counter() - a.t0 > a.budget - 25:
            row("mae", label, note="skipped (time budget)")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row("mae", label, note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
        env.free()


def _mrcnn_setup(env, a):
    """(torch model on the device, segjax model, params, image uint8 (S, S, 3))."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from segjax import models
    from segjax.convert import maskrcnn as conv
    from segjax.testing.maskrcnn_ref import r50_torch, tiny_torch

    if a.smoke:
        tv, variant = tiny_torch(), "mask_rcnn_tiny"
    else:
        tv, variant = r50_torch(kind="coco"), None
    sd = {k: v.detach().cpu().numpy() for k, v in tv.state_dict().items()}
    params, meta, _ = conv.from_state_dict(sd, variant=variant)
    model = models.build(meta["model"], **meta["model_kwargs"])
    img = np.array(Image.fromarray(skimage.data.astronaut()).resize((a.mrcnn_size,) * 2, Image.BILINEAR),
                   np.uint8)  # a writable copy (torch.from_numpy)
    return tv.to(env.dev).eval(), model, params, img


def section_mrcnn(env, a, state):
    import jax
    import jax.numpy as jnp

    from segjax.models.maskrcnn.mask_rcnn import prepare_image

    torch = env.torch
    if "mrcnn" not in state:
        state["mrcnn"] = _mrcnn_setup(env, a)
    tv, model, params, img = state["mrcnn"]
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0).to(env.dev)
    with torch.no_grad():
        m, mn = timed(lambda: tv([x]), env.tsync, a.iters, 2)
        out = tv([x])[0]
    row("mrcnn", "torchvision model([img]) eval", m, mn, None, 1e3 / m,
        f"{len(out['boxes'])} dets, max score {float(out['scores'].max()) if len(out['scores']) else 0:.3f}; "
        f"{img.shape[0]}x{img.shape[1]}")
    padded, rhw = prepare_image(img, model.min_size, model.max_size, model.size_divisible)
    image, hw = jnp.asarray(padded[None]), jnp.asarray([rhw], jnp.int32)
    v = {"params": jax.device_put(params)}
    c, sc = compile_jit(model.apply, v, image, hw)
    m, mn = timed(lambda: c(v, image, hw), env.jsync, a.iters, 2)
    det = c(v, image, hw)
    n = int(det["valid"].sum())
    top = float(jnp.where(det["valid"], det["scores"], 0).max())
    row("mrcnn", "segjax jit(model.apply) eval", m, mn, sc, 1e3 / m,
        f"{n} dets, max score {top:.3f}; padded input {tuple(image.shape[1:3])}, no mask pasting")


def section_mrcnn_train(env, a, state):
    import jax
    import mask_rcnn as mrcnn_bench  # benchmarks/mask_rcnn.py: the targets and the segjax step

    torch = env.torch
    if "mrcnn" not in state:
        state["mrcnn"] = _mrcnn_setup(env, a)
    tv, model, params, img = state["mrcnn"]
    mrcnn_bench.SIZE = a.mrcnn_size
    boxes, labels, masks = mrcnn_bench._targets(2)  # labels in 1..90
    labels = [(lb - 1) % (model.num_classes - 1) + 1 for lb in labels]  # no-op for 91 classes

    # segjax first (the torch step changes tv's weights; params were converted before)
    try:
        batch, s0, step = mrcnn_bench.segjax_train_step(model, params, [img, img[:, ::-1]], boxes, labels, masks,
                                                        a.mrcnn_lr)
        st = {"s": s0}

        t = time.perf_counter()
        c = step.lower(st["s"], batch, jax.random.key(0)).compile()
        sc = time.perf_counter() - t

        def one():
            st["s"], loss = c(st["s"], batch, jax.random.key(0))
            return loss

        first = float(one())  # the warm-up step, from the converted weights
        m, mn = timed(one, env.jsync, a.train_iters, 0)
        row("mrcnn_train", "segjax train step (batch 2)", m, mn, sc, 2e3 / m,
            f"loss {first:.3f} -> {float(one()):.3f} (lr {a.mrcnn_lr})")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row("mrcnn_train", "segjax train step", note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
    env.free()

    tv.train()
    opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=a.mrcnn_lr, momentum=0.9,
                          weight_decay=1e-4)
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255.0).to(env.dev)
    imgs = [x, x.flip(-1)]
    tg = [{"boxes": torch.from_numpy(bx).to(env.dev), "labels": torch.from_numpy(lb).to(env.dev),
           "masks": torch.from_numpy(mk).to(env.dev)} for bx, lb, mk in zip(boxes, labels, masks)]

    def t_step():
        opt.zero_grad()
        loss = sum(tv(imgs, tg).values())
        loss.backward()
        opt.step()
        return loss

    first = t_step().item()
    m, mn = timed(t_step, env.tsync, a.train_iters, 0)
    row("mrcnn_train", "torchvision train step (batch 2)", m, mn, None, 2e3 / m,
        f"loss {first:.3f} -> {t_step().item():.3f} (lr {a.mrcnn_lr})")


# ----------------------------------------------------------------------------- main


def header(env):
    import flax
    import jax
    import torch
    import torchvision

    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        smi = f"(nvidia-smi: {type(e).__name__})"
    print(smi)
    try:
        import transformers

        tver = transformers.__version__
    except Exception:  # noqa: BLE001
        tver = "missing"
    print(f"jax {jax.__version__} backend {jax.default_backend()} devices {jax.devices()}; flax {flax.__version__}")
    print(f"torch {torch.__version__} (cuda {torch.version.cuda}) device {env.dev}"
          + (f" = {torch.cuda.get_device_name()}" if env.dev.type == "cuda" else "")
          + f"; torchvision {torchvision.__version__}; transformers {tver}")
    print(f"torch allow_tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}; "
          f"jax default_matmul_precision {jax.config.jax_default_matmul_precision}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU-friendly): checks the script runs")
    p.add_argument("--sections", default="roi,mrcnn,mae,mrcnn_train")
    p.add_argument("--budget", type=float, default=380.0, help="seconds; later sections are skipped past it")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--mae-steps", type=int, default=5)
    p.add_argument("--mrcnn-lr", type=float, default=0.02, help="SGD lr of the Mask R-CNN train step")
    a = p.parse_args(argv)
    a.t0 = time.perf_counter()
    full = dict(roi_size=200, roi_channels=256, roi_boxes=1000, mae_model="mae_vit_b16", mae_batch=64,
                mrcnn_size=800)
    smoke = dict(roi_size=32, roi_channels=16, roi_boxes=20, mae_model="mae_vit_tiny", mae_batch=4,
                 mrcnn_size=128)
    for k, v in (smoke if a.smoke else full).items():
        setattr(a, k, v)
    if a.smoke:
        a.iters, a.train_iters, a.mae_steps = 2, 1, 1
    env = Env(a.smoke)
    try:
        header(env)
    except Exception:  # noqa: BLE001 - versions only
        traceback.print_exc()
    state: dict = {}
    fns = {"roi": lambda: section_roi(env, a), "mae": lambda: section_mae(env, a),
           "mrcnn": lambda: section_mrcnn(env, a, state), "mrcnn_train": lambda: section_mrcnn_train(env, a, state)}
    for sec in a.sections.split(","):
        elapsed = time.perf_counter() - a.t0
        if not a.smoke and elapsed + ESTIMATE.get(sec, 60) > a.budget:
            row(sec, "-", note=f"skipped: {elapsed:.0f} s elapsed, ~{ESTIMATE.get(sec, 60)} s needed, "
                f"budget {a.budget:.0f} s")
            continue
        print(f"# section {sec} at {elapsed:.0f} s", flush=True)
        try:
            fns[sec]()
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the rest
            traceback.print_exc()
            row(sec, "-", note=f"FAILED: {type(e).__name__}: {str(e)[:160]}")
        env.free()
    print(f"\n=== summary ({time.perf_counter() - a.t0:.0f} s) ===")
    print(HDR)
    print("-" * len(HDR))
    print("\n".join(ROWS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
