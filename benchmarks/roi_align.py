"""Times RoIAlign forward and forward+backward: segjax (both impls) vs torchvision.

Setup (the issue's): features (2, 200, 200, 256) fp32 (torchvision gets the same
values as NCHW), 1000 RoIs (500 per image), output 7x7, sampling_ratio 2,
aligned=True (`--aligned 0`: torchvision's default aligned=False), spatial_scale 1/4
(an 800x800 input, FPN level P2); `--sampling-ratio 0` times adaptive sampling.
Boxes have random centres in the image and log-uniform sides in [16, 512] px, some
crossing the border.
Forward+backward computes the output and the gradient of sum(out * g) w.r.t. the
features for a fixed random cotangent g (torch: `y.backward(g)`; segjax: `jax.vjp`
inside one jitted function).

Each implementation runs in its own worker process (peak RSS is attributable). The
workers set up one after the other (segjax compiles while nothing else runs), then
take turns: in each of `--rounds` rounds every worker times `--reps` forward and
`--reps` forward+backward calls while the others sit idle, blocked on a pipe, so the
per-round ratios pair the implementations under the same background load.

Usage:
  python benchmarks/roi_align.py                    # the issue's setup
  python benchmarks/roi_align.py --boxes 200 --channels 64 --rounds 2   # quick look
  python benchmarks/roi_align.py --impls gather     # one segjax impl (+ torch)
  python benchmarks/roi_align.py --aligned 0 --sampling-ratio 0   # adaptive, legacy

Recorded figures, with date, machine and command: benchmarks/README.md.

Numbers:
  fwd ms / f+b ms  median wall time per call over all rounds (min in brackets).
  ratio            torchvision time / segjax time, median of the per-round ratios
                   (> 1: segjax is faster).
  compile s        segjax: lower + XLA compile of the forward / forward+backward
                   functions (torch: none, it is eager).
  peak MB          peak resident set size of the worker (getrusage ru_maxrss); XLA's
                   own buffer estimate (memory_analysis: temp + output) is printed
                   below the table.
  checksum         sum and sum of squares of the forward output and of the gradient
                   in float64: the implementations must agree (same inputs).
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

_TAG = "@@bench "


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(args):
    """Features (B, H, W, C), boxes (B, R, 4) in input px, cotangent (B, R, h, w, C)."""
    import numpy as np

    rng = np.random.default_rng(0)
    b, r = args.batch, args.boxes // args.batch
    feats = rng.standard_normal((b, args.size, args.size, args.channels), dtype=np.float32)
    img = args.size / args.scale
    side = np.exp(rng.uniform(np.log(16), np.log(512), (b, r, 2)))
    ctr = rng.uniform(0, img, (b, r, 2))
    boxes = np.concatenate([ctr - side / 2, ctr + side / 2], -1).astype(np.float32)
    g = rng.standard_normal((b, r, args.out, args.out, args.channels), dtype=np.float32)
    return feats, boxes, g


def _checksum(x) -> list[float]:
    import numpy as np

    x = np.asarray(x, np.float64)
    return [float(x.sum()), float((x * x).sum())]


class _SegjaxWorker:
    def __init__(self, args, impl):
        import jax
        import jax.numpy as jnp

        from segjax.ops import roi_align

        self.jax = jax
        feats, boxes, g = _inputs(args)
        self.feats, self.boxes, self.g = jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(g)
        kw = dict(output_size=args.out, spatial_scale=args.scale, sampling_ratio=args.sampling_ratio,
                  aligned=bool(args.aligned), impl=impl)

        def fwd(f, b):
            return roi_align(f, b, **kw)

        def fwd_bwd(f, b, g):
            out, vjp = jax.vjp(lambda f: roi_align(f, b, **kw), f)
            return out, vjp(g)[0]

        self.info = {"jax": jax.__version__, "impl": impl}
        self.fns = {}
        for name, fn, ins in (("fwd", fwd, (self.feats, self.boxes)),
                              ("fwd_bwd", fwd_bwd, (self.feats, self.boxes, self.g))):
            t0 = time.perf_counter()
            lowered = jax.jit(fn).lower(*ins)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            self.info[f"{name}_lower_s"], self.info[f"{name}_compile_s"] = t1 - t0, t2 - t1
            try:
                ma = compiled.memory_analysis()
                self.info[f"{name}_xla_mb"] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20
            except Exception:  # noqa: BLE001 - optional in a PJRT backend
                pass
            self.fns[name] = (compiled, ins)
        out = self.call("fwd")
        out2, grad = self.call("fwd_bwd")
        self.info["checksum_out"], self.info["checksum_grad"] = _checksum(out), _checksum(grad)

    def call(self, name):
        fn, ins = self.fns[name]
        return self.jax.block_until_ready(fn(*ins))


class _TorchWorker:
    def __init__(self, args):
        import torch
        import torchvision

        self.torch, self.tv, self.args = torch, torchvision, args
        feats, boxes, g = _inputs(args)
        b, r = boxes.shape[:2]
        self.x = torch.from_numpy(feats).permute(0, 3, 1, 2).contiguous()
        ids = torch.arange(b, dtype=torch.float32).repeat_interleave(r)[:, None]
        self.rois = torch.cat([ids, torch.from_numpy(boxes.reshape(-1, 4))], 1)
        self.g = torch.from_numpy(g.reshape(b * r, args.out, args.out, -1)).permute(0, 3, 1, 2).contiguous()
        self.info = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                     "threads": torch.get_num_threads()}
        out = self.call("fwd")
        _, grad = self.call("fwd_bwd")
        self.info["checksum_out"] = _checksum(out.permute(0, 2, 3, 1).numpy())
        self.info["checksum_grad"] = _checksum(grad.permute(0, 2, 3, 1).numpy())

    def call(self, name):
        a = self.args
        if name == "fwd":
            with self.torch.no_grad():
                return self.tv.ops.roi_align(self.x, self.rois, a.out, a.scale, a.sampling_ratio, bool(a.aligned))
        x = self.x.detach().requires_grad_(True)
        y = self.tv.ops.roi_align(x, self.rois, a.out, a.scale, a.sampling_ratio, bool(a.aligned))
        y.backward(self.g)
        return y.detach(), x.grad


def _serve(args):
    def send(obj):
        sys.stdout.write(_TAG + json.dumps(obj) + "\n")
        sys.stdout.flush()

    w = _TorchWorker(args) if args.worker == "torch" else _SegjaxWorker(args, args.worker)
    send({"ready": w.info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "time":
            out = {}
            for name in ("fwd", "fwd_bwd"):
                ts = []
                for _ in range(cmd["reps"]):
                    t0 = time.perf_counter()
                    w.call(name)
                    ts.append(time.perf_counter() - t0)
                out[name] = ts
            send(out)
        elif cmd["cmd"] == "quit":
            send({"rss_peak_mb": _rss_peak_mb()})
            return


class _Proc:
    def __init__(self, name, argv):
        self.name = name
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._recv()["ready"]

    def _recv(self):
        for line in self.p.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        raise SystemExit(f"worker {self.name} exited ({self.p.wait()}); see its stderr above")

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._recv()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=200, help="feature map H = W")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--boxes", type=int, default=1000, help="RoIs in total, split over the batch")
    p.add_argument("--out", type=int, default=7)
    p.add_argument("--sampling-ratio", type=int, default=2)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--aligned", type=int, choices=(0, 1), default=1, help="1: aligned=True, 0: aligned=False")
    p.add_argument("--impls", default="gather,matmul", help="segjax impls, comma separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="calls of each function per worker and round")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common = ["--batch", str(args.batch), "--size", str(args.size), "--channels", str(args.channels),
              "--boxes", str(args.boxes), "--out", str(args.out), "--sampling-ratio", str(args.sampling_ratio),
              "--scale", str(args.scale), "--aligned", str(args.aligned)]
    if args.worker:
        _serve(args)
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    procs = [_Proc(f"segjax[{i}]", ["--worker", i, *common]) for i in args.impls.split(",") if i]
    if not args.skip_torch:
        procs.append(_Proc("torchvision", ["--worker", "torch", *common]))
    res = {q.name: {"fwd": [], "fwd_bwd": [], "round": []} for q in procs}
    for rnd in range(args.rounds):
        for q in procs[rnd % len(procs):] + procs[:rnd % len(procs)]:
            out = q.ask(cmd="time", reps=args.reps)
            for k in ("fwd", "fwd_bwd"):
                res[q.name][k] += out[k]
            res[q.name]["round"].append({k: statistics.median(out[k]) for k in ("fwd", "fwd_bwd")})
    for q in procs:
        res[q.name]["rss_peak_mb"] = q.ask(cmd="quit")["rss_peak_mb"]
        res[q.name]["info"] = q.ready
        q.p.wait()

    print(f"RoIAlign: features ({args.batch}, {args.size}, {args.size}, {args.channels}) fp32, {args.boxes} RoIs, "
          f"{args.out}x{args.out}, sampling_ratio {args.sampling_ratio}, aligned={bool(args.aligned)}, "
          f"scale {args.scale}; "
          f"{args.rounds} rounds x {args.reps} calls")
    tv = res.get("torchvision")
    hdr = (f"{'':18} {'fwd ms':>15} {'f+b ms':>15} {'ratio fwd':>9} {'ratio f+b':>9} "
           f"{'compile s (fwd, f+b)':>21} {'peak MB':>8}")
    print(hdr)
    print("-" * len(hdr))
    def ms(r, k):
        return f"{1e3 * statistics.median(r[k]):7.1f} ({1e3 * min(r[k]):5.1f})"

    def ratio(name, r, k):
        if tv is None or name == "torchvision":
            return f"{'-':>9}"
        return f"{statistics.median([t[k] / s[k] for t, s in zip(tv['round'], r['round'])]):9.2f}"

    for name, r in res.items():
        info = r["info"]
        comp = (f"{info['fwd_lower_s'] + info['fwd_compile_s']:.1f}, "
                f"{info['fwd_bwd_lower_s'] + info['fwd_bwd_compile_s']:.1f}" if "fwd_lower_s" in info else "-")
        print(f"{name:18} {ms(r, 'fwd'):>15} {ms(r, 'fwd_bwd'):>15} {ratio(name, r, 'fwd')} "
              f"{ratio(name, r, 'fwd_bwd')} "
              f"{comp:>21} {r['rss_peak_mb']:8.0f}")
    print()
    for name, r in res.items():
        info = r["info"]
        xla = ", ".join(f"{k}={info[k]:.0f}" for k in ("fwd_xla_mb", "fwd_bwd_xla_mb") if k in info)
        print(f"{name}: checksum out {info['checksum_out']}, grad {info['checksum_grad']}"
              + (f"; XLA temp+output MB {xla}" if xla else "")
              + (f"; torch threads {info['threads']}" if "threads" in info else ""))
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
