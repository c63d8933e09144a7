"""Times one MAE pretraining step (forward, backward, AdamW) in segjax and PyTorch.

Setup: MAE ViT-B/16 at 224x224, batch 8, mask ratio 0.75, fp32 (defaults), AdamW with
betas (0.9, 0.95) and weight decay 0.05 in both frameworks. The reference is
`transformers.ViTMAEForPreTraining` with the equivalent `ViTMAEConfig`; its sin-cos
tables are frozen, so segjax's are kept out of the optimiser too.

Each framework runs in its own worker process (peak RSS is attributable). Workers
start one after the other (segjax compiles while nothing else runs), then take turns:
in each of `--rounds` rounds every worker measures the fp32 matmul peak and then
times `--steps / --rounds` steps while the others sit idle, blocked on a pipe. On a
shared machine this pairs the frameworks under the same background load, and the
per-round ratio and fraction of peak cancel most of it.

Usage:
  python benchmarks/mae_train_step.py                              # B/16, batch 8
  python benchmarks/mae_train_step.py --model mae_vit_tiny --batch 4 --steps 4
  python benchmarks/mae_train_step.py --skip-torch --dtype bfloat16
  python benchmarks/mae_train_step.py --xla-preset default,onednn  # A/B XLA flag presets
  python benchmarks/mae_train_step.py --xla-preset default,default/no-reuse  # A/B malloc

Numbers:
  step s       median wall time of the timed steps (after `--warmup` untimed ones);
               `min` is the least-disturbed step.
  cpu s        process CPU time (all threads, user + system) per step, median; less
               sensitive to other jobs than wall time, but counts spin-waiting.
  sys s, flt MB  kernel time and minor page faults per step (medians): memory the
               allocator hands back to the OS and faults in again every step.
  compile s    `lower` (trace to StableHLO) + `compile` (XLA), timed separately.
  peak MB      peak resident set size of the worker (getrusage ru_maxrss); the CPU
               backend has no `memory_stats()`. The segjax peak includes XLA's
               compilation; RSS right after compiling and XLA's own buffer estimate
               (`memory_analysis()`) are printed below the table.
  GFLOP/s      FLOPs per step / median step time; FLOPs counted analytically (matmuls
               only, `analytic_train_flops`) and, for segjax, by XLA's
               `cost_analysis()['flops']` (everything it counts).
  % peak       analytic GFLOP/s over the fp32 matmul peak (3072^3 `jnp.matmul` and
               `torch.mm`, the larger), both measured in the same round; median over
               rounds.
  ratio        torch step time / segjax step time = segjax img/s / torch img/s,
               median of the per-round ratios (and of the overall medians).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

_TAG = "@@bench "  # prefix of protocol lines on a worker's stdout; all else is ignored


# ----------------------------------------------------------------------------- shared


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def analytic_train_flops(cfg: dict, batch: int, mask_ratio: float) -> float:
    """Matmul FLOPs of one MAE train step (2 per multiply-add), forward + backward.

    Forward per image: patch projection on all L patches, encoder on 1+V tokens,
    decoder_embed, decoder on 1+L tokens, decoder_pred. A block on T tokens of width
    D costs 2 T D^2 (4 + 2 r) (qkv, proj, mlp with ratio r) plus 4 T^2 D (q k^T, p v).
    Backward is twice the forward, except that the patch projection needs no input
    gradient. Elementwise work (LayerNorm, GELU, softmax, loss, AdamW) is not counted.
    """
    p, c = cfg["patch_size"], 3
    length = (cfg["img_size"] // p) ** 2
    v = int(length * (1 - mask_ratio))
    d, e, r = cfg["embed_dim"], cfg["decoder_embed_dim"], cfg["mlp_ratio"]

    def block(t, w):
        return 2 * t * w * w * (4 + 2 * r) + 4 * t * t * w

    patch = 2 * length * p * p * c * d
    fwd = (patch + cfg["depth"] * block(1 + v, d) + 2 * (1 + v) * d * e
           + cfg["decoder_depth"] * block(1 + length, e) + 2 * (1 + length) * e * p * p * c)
    return batch * (3 * fwd - patch)


def _model_cfg(name: str) -> dict:
    from segjax import models

    m = models.build(name)
    keys = ["img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
            "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_pix_loss", "ln_eps"]
    return {k: getattr(m, k) for k in keys}


def _images(batch: int, size: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)


# ----------------------------------------------------------------------------- workers


class _SegjaxWorker:
    """A compiled segjax train step with its state; `steps(n)` runs n of them."""

    def __init__(self, args):
        from segjax import xla_flags

        # before jax starts a backend: XLA_FLAGS preset, and glibc keeping freed memory
        # (see segjax/xla_flags.py); "<preset>/no-reuse" leaves malloc at its defaults
        preset, _, opt = args.xla_preset.partition("/")
        xla_flags.setup_cpu(preset, host_memory=opt != "no-reuse")
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        import optax

        from segjax import models

        self.jax = jax
        self.info = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}
        n = args.peak_n
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        mm = jax.jit(jnp.matmul)
        mm(a, b).block_until_ready()
        self._matmul = lambda: mm(a, b).block_until_ready()

        model = models.build(args.model, dtype=jnp.dtype(args.dtype))
        self.imgs = jnp.asarray(_images(args.batch, model.img_size))
        k0, k1, self.key = jax.random.split(jax.random.key(0), 3)
        params = nn.meta.unbox(model.init({"params": k0, "masking": k1}, self.imgs[:1]))["params"]
        # The sin-cos tables are frozen (requires_grad=False in the reference, so not in
        # its optimiser); everything else gets AdamW with decay, as torch.optim.AdamW does.
        labels = {k: "frozen" if k in ("pos_embed", "decoder_pos_embed") else "train" for k in params}
        tx = optax.multi_transform(
            {"train": optax.adamw(args.lr, b1=0.9, b2=0.95, weight_decay=0.05),
             "frozen": optax.set_to_zero()}, labels)
        opt_state = tx.init(params)
        self.info["n_params"] = sum(x.size for k, v in params.items() if labels[k] == "train"
                                    for x in jax.tree.leaves(v))

        def loss_fn(p, imgs, key):
            return model.apply({"params": p}, imgs, rngs={"masking": key},
                               mask_ratio=args.mask_ratio)["loss"]

        def train_step(p, opt_state, imgs, key, step):
            key = jax.random.fold_in(key, step)
            loss, grads = jax.value_and_grad(loss_fn)(p, imgs, key)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        step_fn = jax.jit(train_step, donate_argnums=(0, 1))
        self.info["rss_before_compile_mb"] = _rss_now_mb()
        t0 = time.perf_counter()
        lowered = step_fn.lower(params, opt_state, self.imgs, self.key, 0)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.info.update(lower_s=t1 - t0, compile_s=t2 - t1, rss_after_compile_mb=_rss_now_mb(),
                         rss_peak_after_compile_mb=_rss_peak_mb())
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.info["xla_flops"] = float((cost or {}).get("flops", float("nan")))
        try:
            ma = self.compiled.memory_analysis()
            self.info["xla_temp_mb"] = ma.temp_size_in_bytes / 2**20
            self.info["xla_args_mb"] = ma.argument_size_in_bytes / 2**20
        except Exception:  # noqa: BLE001 - optional in a PJRT backend
            pass
        self.state = (params, opt_state)
        self.i = 0

    def step(self) -> float:
        p, o, loss = self.compiled(*self.state, self.imgs, self.key, self.i)
        self.jax.block_until_ready((p, o, loss))
        self.state, self.i = (p, o), self.i + 1
        return float(loss)


class _TorchWorker:
    """`transformers.ViTMAEForPreTraining` + `torch.optim.AdamW`, the reference step."""

    def __init__(self, args):
        import torch

        self.info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        n = args.peak_n
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        self._matmul = lambda: torch.mm(a, b)
        if args.peak_only:
            return
        import transformers

        cfg = _model_cfg(args.model)
        config = transformers.ViTMAEConfig(
            hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"],
            num_attention_heads=cfg["num_heads"],
            intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]),
            decoder_hidden_size=cfg["decoder_embed_dim"], decoder_num_hidden_layers=cfg["decoder_depth"],
            decoder_num_attention_heads=cfg["decoder_num_heads"],
            decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]),
            patch_size=cfg["patch_size"], image_size=cfg["img_size"], num_channels=3,
            mask_ratio=args.mask_ratio, norm_pix_loss=cfg["norm_pix_loss"],
            layer_norm_eps=cfg["ln_eps"], hidden_act="gelu", qkv_bias=True,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        self.model = transformers.ViTMAEForPreTraining(config).train()
        self.info["attn_implementation"] = getattr(self.model.config, "_attn_implementation", None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
        self.info["n_params"] = sum(p.numel() for p in params)
        self.x = torch.from_numpy(_images(args.batch, cfg["img_size"])).permute(0, 3, 1, 2).contiguous()

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model(pixel_values=self.x).loss
        loss.backward()
        self.opt.step()
        return loss.item()


def _serve(args):
    """Worker main loop: set up, then answer one JSON command per stdin line."""

    def send(obj):
        sys.stdout.write(_TAG + json.dumps(obj) + "\n")
        sys.stdout.flush()

    w = _SegjaxWorker(args) if args.worker == "segjax" else _TorchWorker(args)
    send({"ready": w.info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "peak":
            times = []
            for _ in range(cmd["reps"]):
                t0 = time.perf_counter()
                w._matmul()
                times.append(time.perf_counter() - t0)
            send({"gflops": 2 * args.peak_n**3 / statistics.median(times) / 1e9})
        elif cmd["cmd"] == "steps":
            out = {"wall": [], "cpu": [], "sys": [], "faults_mb": [], "loss": [], "load": _loadavg()}
            for _ in range(cmd["n"]):
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                out["loss"].append(w.step())
                out["wall"].append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                out["cpu"].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                out["sys"].append(r1.ru_stime - r0.ru_stime)
                out["faults_mb"].append((r1.ru_minflt - r0.ru_minflt) * resource.getpagesize() / 2**20)
            send(out)
        elif cmd["cmd"] == "quit":
            send({"rss_peak_mb": _rss_peak_mb()})
            return


# ----------------------------------------------------------------------------- driver


class _Proc:
    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._recv()["ready"]

    def _recv(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        raise SystemExit(f"worker {self.name} exited ({self.p.wait()}); see its stderr above")

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._recv()


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def run(args) -> dict:
    common = ["--model", args.model, "--batch", str(args.batch), "--mask-ratio", str(args.mask_ratio),
              "--lr", str(args.lr), "--peak-n", str(args.peak_n), "--dtype", args.dtype]
    procs = [_Proc(f"segjax[{p}]", ["--worker", "segjax", "--xla-preset", p, *common])
             for p in args.xla_preset.split(",")]
    procs.append(_Proc("torch", ["--worker", "torch", *common] + (["--peak-only"] if args.skip_torch else [])))
    timed = [p for p in procs if not (p.name == "torch" and args.skip_torch)]
    keys = ("wall", "cpu", "sys", "faults_mb", "loss")
    res = {p.name: {"info": p.ready, "load": [], "round_step": [], "round_peak": [], **{k: [] for k in keys}}
           for p in procs}
    for p in timed:
        res[p.name]["loss"] += p.ask(cmd="steps", n=args.warmup)["loss"]
    per_round = max(1, args.steps // args.rounds)
    for r in range(args.rounds):
        order = procs[r % len(procs):] + procs[:r % len(procs)]  # rotate who goes first
        for p in order:
            res[p.name]["round_peak"].append(p.ask(cmd="peak", reps=args.peak_reps)["gflops"])
            if p in timed:
                out = p.ask(cmd="steps", n=per_round)
                for k in keys:
                    res[p.name][k] += out[k]
                res[p.name]["load"].append(out["load"])
                res[p.name]["round_step"].append(_median(out["wall"]))
    for p in procs:
        res[p.name]["rss_peak_mb"] = p.ask(cmd="quit")["rss_peak_mb"]
        p.p.wait()
    return res


def summarize(args, res: dict) -> str:
    cfg = _model_cfg(args.model)
    flops = analytic_train_flops(cfg, args.batch, args.mask_ratio)
    names = list(res)
    jnp_peaks = [max(v) for v in zip(*(res[n]["round_peak"] for n in names if n.startswith("segjax")))]
    torch_peaks = res["torch"]["round_peak"]
    machine_peak = [max(a, b) for a, b in zip(jnp_peaks, torch_peaks)]
    timed = [n for n in names if res[n]["wall"]]
    first = res[names[0]]["info"]
    out = [f"MAE train step: {args.model}, batch {args.batch}, {cfg['img_size']}px, mask {args.mask_ratio}, "
           f"segjax {args.dtype}, torch float32; {args.rounds} rounds x "
           f"{max(1, args.steps // args.rounds)} timed steps after {args.warmup} warmup",
           f"FLOPs/step: analytic {flops / 1e9:.1f} G, XLA cost_analysis {first['xla_flops'] / 1e9:.1f} G",
           f"fp32 matmul peak {args.peak_n}^3, median over rounds: jnp {_median(jnp_peaks):.1f}, torch.mm "
           f"{_median(torch_peaks):.1f} GFLOP/s (per round: jnp "
           f"{' '.join(f'{x:.0f}' for x in jnp_peaks)}; torch {' '.join(f'{x:.0f}' for x in torch_peaks)})",
           f"torch {res['torch']['info']['torch']}, threads={res['torch']['info']['threads']}, "
           f"attn={res['torch']['info'].get('attn_implementation')}; jax {first['jax']}", ""]
    hdr = (f"{'':22} {'step s':>7} {'min':>6} {'img/s':>6} {'cpu s':>6} {'sys s':>6} {'flt MB':>6} "
           f"{'lower+compile':>13} {'peak MB':>8} {'GFLOP/s':>8} {'XLA':>6} {'%peak':>6} {'ratio':>6}")
    out += [hdr, "-" * len(hdr)]
    t_rounds = res["torch"]["round_step"]
    for n in timed:
        r = res[n]
        step = _median(r["wall"])
        pct = _median([100 * flops / s / 1e9 / pk for s, pk in zip(r["round_step"], machine_peak)])
        info = r["info"]
        comp = f"{info['lower_s']:.1f}+{info['compile_s']:.1f}" if "compile_s" in info else "-"
        xla = f"{info['xla_flops'] / step / 1e9:6.1f}" if "xla_flops" in info else f"{'-':>6}"
        ratio = (f"{_median([t / s for t, s in zip(t_rounds, r['round_step'])]):6.3f}"
                 if t_rounds and n != "torch" else f"{'-':>6}")
        out.append(f"{n:22} {step:7.3f} {min(r['wall']):6.2f} {args.batch / step:6.2f} "
                   f"{_median(r['cpu']):6.2f} {_median(r['sys']):6.2f} {_median(r['faults_mb']):6.0f} "
                   f"{comp:>13} {r['rss_peak_mb']:8.0f} "
                   f"{flops / step / 1e9:8.1f} {xla} {pct:5.1f}% {ratio}")
    out.append("")
    if t_rounds:
        tm = _median(res["torch"]["wall"])
        for n in timed[:-1]:
            paired = _median([t / s for t, s in zip(t_rounds, res[n]["round_step"])])
            out.append(f"ratio {n} img/s / torch img/s: {paired:.3f} (median of per-round ratios), "
                       f"{tm / _median(res[n]['wall']):.3f} (ratio of medians)")
    for n in timed:
        r, info = res[n], res[n]["info"]
        if "compile_s" in info:
            nan = float("nan")
            out.append(f"{n}: XLA_FLAGS={info['xla_flags']!r}; RSS before/after compile "
                       f"{info['rss_before_compile_mb']:.0f}/{info['rss_after_compile_mb']:.0f} MB; XLA buffers: "
                       f"args {info.get('xla_args_mb', nan):.0f} MB, temp {info.get('xla_temp_mb', nan):.0f} MB")
        out.append(f"{n}: steps {' '.join(f'{t:.2f}' for t in r['wall'])} s; load avg {r['load']}; "
                   f"loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}; trainable params {info['n_params']}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mae_vit_b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework, split over rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="segjax compute dtype (params and optimiser stay fp32); torch runs fp32")
    p.add_argument("--xla-preset", default="default",
                   help="comma list of segjax.xla_flags presets, one segjax worker each; "
                        "'<preset>/no-reuse' skips xla_flags.reuse_host_memory()")
    p.add_argument("--peak-n", type=int, default=3072, help="matmul size of the peak measurement")
    p.add_argument("--peak-reps", type=int, default=3, help="matmuls per peak measurement (median)")
    p.add_argument("--skip-torch", action="store_true", help="time segjax only (torch still measures peak)")
    p.add_argument("--json", help="write raw results and the summary here")
    p.add_argument("--worker", choices=["segjax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _serve(args)
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    res = run(args)
    text = summarize(args, res)
    print(text)
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res, "summary": text}, f, indent=1)


if __name__ == "__main__":
    main()
