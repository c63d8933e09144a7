"""Times one SAM training step (11 prompt rounds, forward + backward + AdamW) in segjax
and in PyTorch around the official `segment_anything` modules.

There is no official SAM trainer; the reference step is the recipe written around the
official modules the way sam2's trainer runs it: the image encoder once, then round by
round the prompt encoder + mask decoder on the masks of the image, each round's mask
prompt the previous round's logits (the highest predicted IoU of 3 in round 0), the
loss sam2's `MultiStepMultiMasksAndIous` (focal 20 : dice 1 : IoU-MSE 1) over the
rounds, `loss.backward()`, `torch.optim.AdamW`. The official prompt encoder takes a
batch of prompts with one token layout, so each round calls it and the official
`MaskDecoder` once per group of masks with the same layout (box or not, number of
points so far: 2-4 groups per round), the decoder repeating the image embedding per
prompt as `predict_masks` does; sam2's loss once per kind of first prompt (3 masks or 1
in round 0). Both frameworks get the same prompts (`segjax.models.sam.rollout.
FixedPrompts`: round 0 a point or a box per mask, then one point per round, two rounds
without one) and the same random model (segjax's params converted from the official
module), fp32; the first (warm-up) step's loss is the same in both.

--remat: activation recomputation in the backward pass, the same in both frameworks:
"decoder" (default) recomputes each mask-decoder call (segjax `Sam(decoder_remat=True)`,
torch `torch.utils.checkpoint` of the official decoder call), "encoder" each image
encoder block. Without it the decoder's activations grow with masks x rounds (figures
in benchmarks/README.md).

Decoder-only mode (`--decoder-only`, segjax): the step on cached image embeddings, as
`config.sam.cached_embeddings` trains; printed beside the full step as the speed-up.

Each framework runs in its own worker process (its peak RSS is its own), driven step by
step. --schedule interleaved: both workers alive, one step of each in turn (the same
load for both); alternate: one worker at a time (when both do not fit in memory),
--repeats launches each, alternating. The 1-minute load average after each step is
printed with the figures. The torch worker runs with OMP_WAIT_POLICY=PASSIVE unless the
environment sets it (spinning OpenMP threads stall torch on a loaded CPU). CPU here; the
same script runs on a GPU machine.

Both workers run with glibc's default malloc, as `train.py` and a plain torch script
do: the configuration users get, so the headline ratio. `--malloc-reuse` makes both keep
freed host memory for reuse instead (`segjax.xla_flags.reuse_host_memory`; the torch
worker gets the same glibc settings): no page faults for the multi-GB buffers after the
first step, but one malloc arena; on the 2-core CPU it sped the torch step and slowed
the segjax step (benchmarks/README.md). `--xla-preset` picks the segjax worker's XLA
flags.

Usage:
  python benchmarks/sam_train.py                               # ViT-B at 1024, 16 masks
  python benchmarks/sam_train.py --schedule alternate --steps 1 --decoder-only
  python benchmarks/sam_train.py --model sam_vit_tiny --masks 4 --steps 3

Numbers: step s (median of --steps after one warm-up step per launch), compile s
(segjax lower + compile), XLA temp MB (the executable's temporary buffers), peak MB
(ru_maxrss of the worker), loss (the warm-up step's), ratio = torch step / segjax step.
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

import numpy as np

_TAG = "@@bench "
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_inputs(s: int, g: int, m: int, rounds: int, seed: int = 0) -> dict:
    """One image (1, S, S, 3) with M rectangle masks (1, M, G, G), their boxes and the
    fixed prompts of every round (numpy): first point / box, then points (1, M, R-1, 2)
    with labels 1 / 0, and -1 in the two no-point rounds (one random, the last)."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (1, s, s, 3)).astype(np.float32)
    masks = np.zeros((1, m, g, g), bool)
    boxes = np.zeros((1, m, 4), np.float32)
    r = s / g
    for k in range(m):
        y0, x0 = rng.integers(1, g // 2, 2)
        hh, ww = rng.integers(max(g // 16, 2), g // 2, 2)
        masks[0, k, y0:y0 + hh, x0:x0 + ww] = True
        boxes[0, k] = [x0 * r, y0 * r, (x0 + ww) * r, (y0 + hh) * r]
    is_box = rng.random((1, m)) < 0.5
    point = (boxes[..., :2] + boxes[..., 2:]) / 2
    points = rng.uniform(0, s - 1, (1, m, rounds - 1, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (1, m, rounds - 1)).astype(np.int32)
    labels[..., -1] = -1
    labels[..., rng.integers(0, rounds - 2)] = -1
    return dict(image=image, image_hw=np.array([[s, s]], np.int32), masks=masks, boxes=boxes,
                valid=np.ones((1, m), bool), is_box=is_box, point=point.astype(np.float32),
                points=points, labels=labels)


def _official(args):
    from segjax.testing.sam_official import TINY, VIT_B, make_official

    cfg = {"sam_vit_tiny": TINY, "sam_vit_b": VIT_B}[args.model]
    return make_official(cfg, seed=0)


# ----------------------------------------------------------------------------- segjax


def segjax_worker(args):
    """The segjax step, compiled: returns ({mode: step function -> loss}, info dict)."""
    from segjax.xla_flags import setup_cpu

    setup_cpu(args.xla_preset, host_memory=args.malloc_reuse)  # before the backend starts
    import jax
    import jax.numpy as jnp
    import optax

    from segjax import models
    from segjax.convert import sam as conv
    from segjax.models.sam.rollout import FirstPrompt, FixedPrompts, rollout_predictions

    official = _official(args)
    params, meta, _ = conv.from_state_dict({k: v.numpy() for k, v in official.state_dict().items()})
    del official
    remat = {part: part in args.remat.split(",") for part in ("encoder", "decoder")}
    model = models.build(meta["model"], **meta["model_kwargs"], encoder_remat=remat["encoder"],
                         decoder_remat=remat["decoder"])
    s = model.img_size
    inp = make_inputs(s, s // 4, args.masks, args.rounds)
    batch = {k: jnp.asarray(inp[k]) for k in ("image", "image_hw", "masks", "boxes", "valid")}
    prompts = FixedPrompts(FirstPrompt(jnp.asarray(inp["is_box"]), jnp.asarray(inp["point"]),
                                       jnp.ones((1, args.masks), jnp.int32), jnp.asarray(inp["boxes"])),
                           jnp.asarray(inp["points"]), jnp.asarray(inp["labels"]))
    weights = dict(loss_mask=20.0, loss_dice=1.0, loss_iou=1.0)
    tx = optax.adamw(1e-5, b1=0.9, b2=0.999, weight_decay=0.1)
    params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(params)
    emb = jax.jit(lambda p, x, hw: model.apply({"params": p}, x, hw, method="embed_image"))(
        params, batch["image"], batch["image_hw"])

    def step(p, o, embeddings, batch, prompts):  # inputs as arguments: nothing to constant-fold
        def loss_fn(q):
            return rollout_predictions(model, q, batch, prompts, image_embeddings=embeddings,
                                       weights=weights)[1]

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    steps, info = {}, {"device": str(jax.devices()[0])}
    modes = [("full", None)] + ([("decoder", emb)] if args.decoder_only else [])
    for name, embeddings in modes:
        fn = jax.jit(step, donate_argnums=(0, 1))
        t0 = time.perf_counter()
        lowered = fn.lower(params, opt_state, embeddings, batch, prompts)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        info[name] = dict(lower_s=t1 - t0, compile_s=t2 - t1,
                          temp_mb=None if mem is None else mem.temp_size_in_bytes / 2**20)
        state = [jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state)]

        def run(compiled=compiled, state=state, embeddings=embeddings):
            p, o, loss = compiled(*state, embeddings, batch, prompts)
            jax.block_until_ready((p, o, loss))
            state[:] = [p, o]
            return float(loss)

        steps[name] = run
    return steps, info


def serve(kind: str, args) -> None:
    """Worker loop: set up, print the info line, then one step per "step MODE" line on
    stdin (prints its time and loss), "quit" prints the peak RSS and exits."""
    steps, info = (segjax_worker if kind == "segjax" else torch_worker)(args)
    _reply(dict(info, modes=sorted(steps)))
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        t = time.perf_counter()
        loss = steps[cmd[1]]()
        _reply(dict(step_s=time.perf_counter() - t, loss=loss, rss_mb=_peak_mb()))
    _reply(dict(peak_mb=_peak_mb()))


def _reply(obj: dict) -> None:
    print(_TAG + json.dumps(obj), flush=True)


# ----------------------------------------------------------------------------- torch


def _groups(keys: list) -> dict:
    """{key: [mask indices]} in first-seen order."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def torch_worker(args):
    """The reference step: returns (step function -> loss, info dict)."""
    from functools import partial

    if args.malloc_reuse:  # the same glibc settings as the segjax worker's
        from segjax.xla_flags import reuse_host_memory

        reuse_host_memory()

    import torch
    from torch.utils.checkpoint import checkpoint

    from segjax.testing import sam2_losses

    loss_fns = sam2_losses.load()
    official = _official(args).train()
    s = official.image_encoder.img_size
    inp = make_inputs(s, s // 4, args.masks, args.rounds)
    crit = loss_fns.MultiStepMultiMasksAndIous(
        weight_dict={"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 0.0},
        supervise_all_iou=False, iou_use_l1_loss=False, pred_obj_scores=False)
    opt = torch.optim.AdamW(official.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.1)
    image = torch.from_numpy(inp["image"][0]).permute(2, 0, 1)
    target = torch.from_numpy(inp["masks"][0]).float()  # (M, G, G)
    m = args.masks
    is_box = [bool(b) for b in inp["is_box"][0]]
    boxes = torch.from_numpy(inp["boxes"][0])
    # every mask's point list per round (the same prompts as segjax's FixedPrompts)
    pts, lbs = [[] for _ in range(m)], [[] for _ in range(m)]
    per_round = []
    for r in range(args.rounds):
        for k in range(m):
            if r == 0 and not is_box[k]:
                pts[k].append(inp["point"][0, k])
                lbs[k].append(1)
            elif r > 0 and inp["labels"][0, k, r - 1] in (0, 1):
                pts[k].append(inp["points"][0, k, r - 1])
                lbs[k].append(int(inp["labels"][0, k, r - 1]))
        per_round.append([(np.array(pts[k], np.float32).reshape(-1, 2), np.array(lbs[k], np.int64)) for k in range(m)])

    # --remat: the same recomputation as segjax's switches (torch.utils.checkpoint of the
    # official decoder call / of each encoder block), so both keep the same activations
    remat = args.remat.split(",")
    decoder = official.mask_decoder
    if "decoder" in remat:
        decoder = partial(checkpoint, official.mask_decoder, use_reentrant=False)
    if "encoder" in remat:
        for block in official.image_encoder.blocks:
            block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)

    def decode(emb, pe, r, mask_in):
        """One round on all masks: one prompt-encoder + mask-decoder call per group of
        masks with the same token layout (box or not, number of points), the batched
        form the official modules take (a prompt batch shares its token count).
        Returns per mask (logits (K, L, L), iou (K,)) and the next mask prompt (M, 1, L, L)."""
        logits, ious = [None] * m, [None] * m
        for (box, n), idx in _groups([(is_box[k], len(per_round[r][k][0])) for k in range(m)]).items():
            points = None
            if n:
                points = (torch.from_numpy(np.stack([per_round[r][k][0] for k in idx])),
                          torch.from_numpy(np.stack([per_round[r][k][1] for k in idx])))
            sel = torch.tensor(idx)
            sparse, dense = official.prompt_encoder(points=points, boxes=boxes[sel] if box else None,
                                                    masks=None if mask_in is None else mask_in[sel])
            lg, io = decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=r == 0 and not box)
            for j, k in enumerate(idx):
                logits[k], ious[k] = lg[j], io[j]
        best = [int(io.argmax()) for io in ious]
        next_in = torch.stack([lg[b:b + 1] for lg, b in zip(logits, best)])
        return logits, ious, next_in

    def one_step():
        opt.zero_grad(set_to_none=True)
        emb = official.image_encoder(official.preprocess(image)[None])
        pe = official.prompt_encoder.get_dense_pe()
        rounds, mask_in = [], None
        for r in range(args.rounds):
            logits, ious, mask_in = decode(emb, pe, r, mask_in)
            rounds.append((logits, ious))
        # sam2's loss divides by the number of objects of its call; one call per kind of
        # first prompt (3 masks in round 0 for a point, 1 for a box), weighted by its count
        total = 0.0
        for idx in _groups(is_box).values():
            outs = {"multistep_pred_multimasks_high_res": [torch.stack([lg[k] for k in idx]) for lg, _ in rounds],
                    "multistep_pred_ious": [torch.stack([io[k] for k in idx]) for _, io in rounds],
                    "multistep_object_score_logits": [torch.full((len(idx), 1), 10.0) for _ in rounds]}
            total = total + crit([outs], target[idx][None])["core_loss"] * len(idx)
        total = total / m
        total.backward()
        opt.step()
        return float(total.detach())

    return {"full": one_step}, dict(threads=torch.get_num_threads(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))


# ----------------------------------------------------------------------------- main


class Worker:
    """One framework's worker process, driven line by line (see `serve`)."""

    def __init__(self, kind: str, argv: list[str]):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
        if kind == "torch":
            # OpenMP threads that spin-wait for descheduled peers stall every torch op on a
            # machine with more runnable threads than cores; passive waiting avoids that
            # (an explicit OMP_WAIT_POLICY in the environment wins)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.kind = kind
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)
        self.info = self._read()
        print(f"{kind} ready: {self.info}", file=sys.stderr, flush=True)

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        self.proc.wait()
        self.err.seek(0)
        raise RuntimeError(f"{self.kind} worker failed (exit {self.proc.returncode}):\n{self.err.read()[-3000:]}")

    def step(self, mode: str) -> dict:
        self.proc.stdin.write(f"step {mode}\n")
        self.proc.stdin.flush()
        return dict(self._read(), load=os.getloadavg()[0])

    def quit(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out["peak_mb"]


def _summary(runs: list[dict]) -> dict:
    """Median step time (warm-up steps already dropped), the warm-up step's loss, load range."""
    loads = [r["load"] for r in runs]
    return dict(step_s=statistics.median(r["step_s"] for r in runs), loss=runs[0]["first_loss"], n=len(runs),
                load=(min(loads), max(loads)))


def measure(args, fwd: list[str]) -> tuple[dict, dict, dict]:
    """Runs the schedule; returns (segjax info, {(kind, mode): [step records]}, {kind: peak MB})."""
    kinds = ["segjax"] + ([] if args.skip_torch else ["torch"])
    runs: dict = {}
    first_loss: dict = {}
    peaks: dict = {}
    info = None

    def steps_of(worker):
        return [(worker, mode) for mode in worker.info["modes"]]

    def run_round(pairs, warm):
        for worker, mode in pairs:
            rec = worker.step(mode)
            print(f"{worker.kind} {mode}{' (warm-up)' if warm else ''}: {rec}", file=sys.stderr, flush=True)
            if warm:  # the first launch's warm-up step: both frameworks from the same params
                first_loss.setdefault((worker.kind, mode), rec["loss"])
            else:
                runs.setdefault((worker.kind, mode), []).append(dict(rec, first_loss=first_loss[worker.kind, mode]))

    if args.schedule == "interleaved":  # both alive, one step of each in turn
        workers = [Worker(kind, fwd) for kind in kinds]
        info = workers[0].info
        pairs = [p for w in workers for p in steps_of(w)]
        for i in range(args.steps + 1):
            run_round(pairs if i % 2 == 0 else pairs[::-1], warm=i == 0)
        peaks = {w.kind: w.quit() for w in workers}
    else:  # one worker at a time, repeats alternate
        for _ in range(args.repeats):
            for kind in kinds:
                w = Worker(kind, fwd)
                info = info or w.info
                for i in range(args.steps + 1):
                    run_round(steps_of(w), warm=i == 0)
                peaks[kind] = max(peaks.get(kind, 0.0), w.quit())
    return info, runs, peaks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam_vit_b", choices=("sam_vit_b", "sam_vit_tiny"))
    p.add_argument("--masks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker (after one warm-up step)")
    p.add_argument("--schedule", choices=("interleaved", "alternate"), default="interleaved",
                   help="interleaved: both workers alive, one step of each in turn; alternate: one worker at "
                        "a time, --repeats times each (when both do not fit in memory)")
    p.add_argument("--repeats", type=int, default=2, help="worker launches per framework (alternate schedule)")
    p.add_argument("--remat", default="decoder", choices=("none", "decoder", "encoder", "encoder,decoder"),
                   help="segjax training switches (same numbers): recompute the mask decoder's / the image "
                        "encoder blocks' activations in the backward pass")
    p.add_argument("--decoder-only", action="store_true")
    p.add_argument("--xla-preset", default="default", help="segjax.xla_flags preset of the segjax worker")
    p.add_argument("--malloc-reuse", action=argparse.BooleanOptionalAction, default=False,
                   help="both workers keep freed host memory for reuse (segjax.xla_flags.reuse_host_memory); "
                        "default: glibc's defaults, as train.py and a plain torch script")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--worker", choices=("segjax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        serve(args.worker, args)
        return
    fwd = list(argv if argv is not None else sys.argv[1:])
    info, runs, peaks = measure(args, fwd)
    rows = {key: _summary(v) for key, v in runs.items()}
    print(f"SAM train step: {args.model}, 1 image, {args.masks} masks, {args.rounds} rounds, fp32, "
          f"{info['device']}, schedule {args.schedule}, {os.cpu_count()} CPUs")
    print(f"{'':8} {'step s':>8} {'n':>3} {'compile s':>10} {'XLA temp MB':>12} {'peak MB':>8} {'loss':>11}  "
          "load (1 min)")
    for (kind, mode), r in rows.items():
        comp = info.get(mode, {}) if kind == "segjax" else {}
        cs = f"{comp['lower_s'] + comp['compile_s']:10.1f}" if comp else f"{'-':>10}"
        temp = f"{comp['temp_mb']:12.0f}" if comp.get("temp_mb") is not None else f"{'-':>12}"
        name = kind if mode == "full" else f"{kind}:{mode}"
        print(f"{name:8} {r['step_s']:8.3f} {r['n']:3d} {cs} {temp} {peaks[kind]:8.0f} {r['loss']:11.4f}  "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f}")
    full = rows[("segjax", "full")]["step_s"]
    if ("segjax", "decoder") in rows:
        print(f"decoder-only speed-up over the full step: x{full / rows[('segjax', 'decoder')]['step_s']:.2f}")
    if ("torch", "full") in rows:
        print(f"ratio (torch / segjax step time): {rows[('torch', 'full')]['step_s'] / full:.2f}")
    print("@@json " + json.dumps(dict(info=info, rows={f"{k}:{m}": v for (k, m), v in rows.items()}, peaks=peaks)))


if __name__ == "__main__":
    main()
