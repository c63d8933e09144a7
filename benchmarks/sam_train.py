"""Times one SAM training step (11 prompt rounds, forward + backward + AdamW) in segjax
and in PyTorch around the official `segment_anything` modules.

There is no official SAM trainer; the reference step is the recipe written around the
official modules the way sam2's trainer runs it: the image encoder once, then round by
round the prompt encoder + mask decoder on all masks of the image, each round's mask
prompt the previous round's logits (the highest predicted IoU of 3 in round 0), the
loss sam2's `MultiStepMultiMasksAndIous` (focal 20 : dice 1 : IoU-MSE 1) over the
rounds, `loss.backward()`, `torch.optim.AdamW`. Both frameworks get the same prompts
(`segjax.models.sam.rollout.FixedPrompts`: round 0 a point or a box per mask, then one
point per round, two rounds without one) and the same random model (segjax's params
converted from the official module), fp32.

Decoder-only mode (`--decoder-only`, segjax): the step on cached image embeddings, as
`config.sam.cached_embeddings` trains; printed beside the full step as the speed-up.

Each framework runs in its own worker process (its peak RSS is its own): segjax first,
then torch, then the table. CPU here; the same script runs on a GPU machine.

Usage:
  python benchmarks/sam_train.py                               # ViT-B at 1024, 16 masks
  python benchmarks/sam_train.py --model sam_vit_tiny --masks 4 --steps 3
  python benchmarks/sam_train.py --skip-torch --decoder-only

Numbers: step s (median of --steps after one warm-up step), compile s (segjax lower +
compile), peak MB (ru_maxrss of the worker), ratio = torch step / segjax step.
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


def segjax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from segjax import models
    from segjax.convert import sam as conv
    from segjax.models.sam.rollout import FirstPrompt, FixedPrompts, rollout_predictions

    official = _official(args)
    params, meta, _ = conv.from_state_dict({k: v.numpy() for k, v in official.state_dict().items()})
    del official
    model = models.build(meta["model"], **meta["model_kwargs"])
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

    def step(p, o, embeddings):
        def loss_fn(q):
            return rollout_predictions(model, q, batch, prompts, image_embeddings=embeddings,
                                       weights=weights)[1]

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    out = {}
    modes = [("full", None)] + ([("decoder", emb)] if args.decoder_only else [])
    for name, embeddings in modes:
        fn = jax.jit(step, donate_argnums=(0, 1))
        t0 = time.perf_counter()
        lowered = fn.lower(params, opt_state, embeddings)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        state = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt_state))
        times = []
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            p, o, loss = compiled(*state, embeddings)
            jax.block_until_ready((p, o, loss))
            times.append(time.perf_counter() - t)
            state = (p, o)
        out[name] = dict(step_s=statistics.median(times[1:]), lower_s=t1 - t0, compile_s=t2 - t1,
                         loss=float(loss))
    out["peak_mb"] = _peak_mb()
    out["device"] = str(jax.devices()[0])
    return out


# ----------------------------------------------------------------------------- torch


def torch_worker(args) -> dict:
    import torch

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
    target = torch.from_numpy(inp["masks"][0]).float()[:, None]  # (M, 1, G, G)
    m = args.masks
    pe = None

    def one_step():
        nonlocal pe
        opt.zero_grad(set_to_none=True)
        emb = official.image_encoder(official.preprocess(image)[None])
        pe = official.prompt_encoder.get_dense_pe()
        is_box = torch.from_numpy(inp["is_box"][0])
        masks_out, ious_out, mask_in = [], [], None
        pts = [[] for _ in range(m)]
        lbs = [[] for _ in range(m)]
        for r in range(args.rounds):
            # per mask its own token list (boxes and points differ per mask): one decoder
            # call per mask and round, as the official prompt encoder takes one prompt set
            logits_r, iou_r, next_in = [], [], []
            for k in range(m):
                if r == 0 and not bool(is_box[k]):
                    pts[k].append(inp["point"][0, k])
                    lbs[k].append(1)
                elif r > 0 and inp["labels"][0, k, r - 1] in (0, 1):
                    pts[k].append(inp["points"][0, k, r - 1])
                    lbs[k].append(int(inp["labels"][0, k, r - 1]))
                points = None
                if pts[k]:
                    points = (torch.from_numpy(np.stack(pts[k]))[None], torch.tensor([lbs[k]]))
                box = torch.from_numpy(inp["boxes"][0, k])[None] if bool(is_box[k]) else None
                sparse, dense = official.prompt_encoder(points=points, boxes=box,
                                                        masks=None if mask_in is None else mask_in[k:k + 1])
                multi = r == 0 and not bool(is_box[k])
                lg, io = official.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                               dense_prompt_embeddings=dense, multimask_output=multi)
                best = int(io[0].argmax())
                next_in.append(lg[:, best:best + 1])
                logits_r.append(lg)
                iou_r.append(io)
            mask_in = torch.cat(next_in)
            masks_out.append(logits_r)
            ious_out.append(iou_r)
        # per mask (round 0 gives 3 masks for a point, 1 for a box); sam2 divides by the
        # number of objects, here 1 per call, so the mean over masks is its batched value
        total = 0.0
        for k in range(m):
            outs = {"multistep_pred_multimasks_high_res": [lr[k] for lr in masks_out],
                    "multistep_pred_ious": [ir[k] for ir in ious_out],
                    "multistep_object_score_logits": [torch.full((1, 1), 10.0) for _ in masks_out]}
            total = total + crit([outs], target[k:k + 1])["core_loss"]
        total = total / m
        total.backward()
        opt.step()
        return float(total.detach())

    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        loss = one_step()
        times.append(time.perf_counter() - t)
    return dict(full=dict(step_s=statistics.median(times[1:]), loss=loss), peak_mb=_peak_mb(),
                threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- main


def _run_worker(kind: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, *argv], capture_output=True, text=True,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG):])
    raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam_vit_b", choices=("sam_vit_b", "sam_vit_tiny"))
    p.add_argument("--masks", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--decoder-only", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--worker", choices=("segjax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        out = (segjax_worker if args.worker == "segjax" else torch_worker)(args)
        print(_TAG + json.dumps(out), flush=True)
        return
    fwd = list(argv if argv is not None else sys.argv[1:])
    ours = _run_worker("segjax", fwd)
    theirs = None if args.skip_torch else _run_worker("torch", fwd)
    print(f"SAM train step: {args.model}, 1 image, {args.masks} masks, {args.rounds} rounds, fp32, "
          f"{ours['device']}")
    print(f"{'':10} {'step s':>8} {'compile s':>10} {'peak MB':>8} {'loss':>10}")
    full = ours["full"]
    print(f"{'segjax':10} {full['step_s']:8.3f} {full['lower_s'] + full['compile_s']:10.1f} "
          f"{ours['peak_mb']:8.0f} {full['loss']:10.4f}")
    if "decoder" in ours:
        dec = ours["decoder"]
        print(f"{'decoder':10} {dec['step_s']:8.3f} {dec['lower_s'] + dec['compile_s']:10.1f} {'':8} "
              f"{dec['loss']:10.4f}   speed-up over the full step x{full['step_s'] / dec['step_s']:.1f}")
    if theirs:
        t = theirs["full"]
        print(f"{'torch':10} {t['step_s']:8.3f} {'-':>10} {theirs['peak_mb']:8.0f} {t['loss']:10.4f}")
        print(f"ratio (torch / segjax step time): {t['step_s'] / full['step_s']:.2f}")


if __name__ == "__main__":
    main()
