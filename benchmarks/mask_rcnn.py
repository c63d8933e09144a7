"""Times Mask R-CNN R50-FPN inference and a train step in segjax and torchvision.

Setup: torchvision's `maskrcnn_resnet50_fpn` architecture as its COCO weights build it
(FrozenBatchNorm2d, trainable_backbone_layers 3), seeded random weights, converted to
segjax with `segjax.convert.maskrcnn` so both run the same network. fp32.
  inference: one 800x800 RGB photo-sized image (skimage astronaut resized), eval mode,
    torchvision `model([img])` vs segjax `MaskRCNNPredictor` (host resize + jit forward +
    mask pasting); both produce torchvision's output dict.
  train step: batch 2 of 800x800 images with 6 instances each (boxes + masks), the
    five losses, backward and SGD (momentum 0.9, lr 0.02, weight decay 1e-4) with
    torchvision's frozen parameters kept frozen on both sides.
Each framework runs in its own subprocess (peak RSS attributable), one after the other,
with the same thread count (all CPUs). The seeded torchvision weights are built in a
third subprocess and handed to the segjax worker as an .npz state dict, so that the
segjax worker never imports torch (torch's libraries and the torch model would
otherwise count in segjax's peak). Like torchvision's one model object, the segjax
worker holds one copy of the weights during the train step (the predictor's copy is
dropped after inference).

Usage:
  python benchmarks/mask_rcnn.py [--iters 3] [--skip-torch] [--skip-train]

NOTE: every timed train step starts from the initial weights and optimizer state
(restored untimed): with lr 0.02 these random weights diverge within a step or two
(NaN loss), so timing a carried-over state would time a diverged network.

Recorded figures, with date, machine and command: benchmarks/README.md.

Numbers: median wall time of `--iters` timed runs after one warm-up; segjax compile
time (first call, incl. tracing) separately; peak MB = ru_maxrss of the worker (CPU
has no device memory stats; `infer peak` the same after inference, before training);
ratio = torchvision time / segjax time (> 1: segjax faster);
load avg = the machine's 1-minute load at the worker's start and end (other jobs share
the CPUs: the workers run one after the other, so compare under similar load).
"""

from __future__ import annotations

import argparse
import copy
import functools
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
SIZE = 800  # --size overrides (a quick smoke run: --size 320 --iters 1)


def _image():
    import numpy as np
    import skimage.data
    from PIL import Image

    img = skimage.data.astronaut()
    return np.asarray(Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR), np.uint8)


def _targets(b: int):
    import numpy as np

    rng = np.random.default_rng(0)
    boxes, masks, labels = [], [], []
    for _ in range(b):
        xy = rng.uniform(0, SIZE * 0.6, (6, 2))
        wh = rng.uniform(40, SIZE * 0.4, (6, 2))
        bx = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        m = np.zeros((6, SIZE, SIZE), np.uint8)
        for i, (x1, y1, x2, y2) in enumerate(bx.astype(int)):
            m[i, y1:y2, x1:x2] = 1
        boxes.append(bx)
        masks.append(m)
        labels.append(rng.integers(1, 91, 6))
    return boxes, labels, masks


def _torch_model():
    import torch
    from torchvision.models import resnet
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = resnet.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, min_size=SIZE, max_size=max(1333, SIZE))
    with torch.no_grad():  # spread class scores so that there are detections to post-process
        model.roi_heads.box_predictor.cls_score.weight.mul_(40.0)
    return model.eval()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, iters, reset=None):
    """(median, min) wall time of `fn` over `iters` runs after one warm-up; `reset` (untimed)
    runs before each call."""
    ts = []
    for _ in range(iters + 1):
        if reset is not None:
            reset()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:]), min(ts[1:])


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    model = _torch_model()
    img = torch.from_numpy(_image()).permute(2, 0, 1).float() / 255.0
    res = {}
    with torch.no_grad():
        res["infer_s"], res["infer_min_s"] = _time(lambda: model([img]), args.iters)
        res["num_detections"] = len(model([img])[0]["boxes"])
    res["infer_peak_mb"] = _peak_mb()
    if not args.skip_train:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
        boxes, labels, masks = _targets(2)
        imgs = [img, img.flip(-1)]
        tg = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab), "masks": torch.from_numpy(m)}
              for b, lab, m in zip(boxes, labels, masks)]

        sd0 = {k: v.clone() for k, v in model.state_dict().items()}
        opt_sd0 = copy.deepcopy(opt.state_dict())

        def reset():  # every timed step starts from the initial weights (see the module doc)
            model.load_state_dict(sd0)
            opt.load_state_dict(opt_sd0)

        def step():
            opt.zero_grad()
            loss = sum(model(imgs, tg).values())
            loss.backward()
            opt.step()
            res["train_loss"] = float(loss)
        res["train_s"], res["train_min_s"] = _time(step, args.iters, reset)
    res["peak_mb"] = _peak_mb()
    return res


def segjax_train_step(model, params, images, boxes, labels, masks, lr: float):
    """The segjax side of a Mask R-CNN train step as torchvision's reference trains:
    SGD (momentum 0.9, weight decay 1e-4), torchvision's frozen parameters frozen.

    images: list of uint8 HWC arrays; boxes / labels / masks: per-image lists (`_targets`).
    Returns (batch, state (params, opt_state), step): step(state, batch, rng) ->
    (state, loss), jitted, donating state.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from segjax.models.maskrcnn.backbone import frozen_patterns
    from segjax.models.maskrcnn.mask_rcnn import mask_rcnn_loss, prepare_image
    from segjax.optim import trainable_mask

    prepped = [prepare_image(im, model.min_size, model.max_size, model.size_divisible) for im in images]
    batch = {"image": jnp.asarray(np.stack([p[0] for p in prepped])),
             "image_hw": jnp.asarray([p[1] for p in prepped], jnp.int32),
             "boxes": jnp.asarray(np.stack(boxes)), "labels": jnp.asarray(np.stack(labels), jnp.int32),
             "masks": jnp.asarray(np.stack(masks)), "valid": jnp.ones((len(images), boxes[0].shape[0]), bool)}
    mask = trainable_mask(params, frozen_patterns(model.trainable_layers))
    labels_tree = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", mask)
    tx = optax.multi_transform({"train": optax.chain(optax.add_decayed_weights(1e-4),
                                                     optax.sgd(lr, momentum=0.9)),
                                "frozen": optax.set_to_zero()}, labels_tree)
    p0 = jax.device_put(params)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, batch, rng):
        p, o = state
        (loss, _), g = jax.value_and_grad(lambda q: mask_rcnn_loss(model, q, batch, rng), has_aux=True)(p)
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    return batch, (p0, tx.init(p0)), step


def worker_weights(args) -> dict:
    """Writes the seeded torchvision model's state dict to `args.weights` (.npz)."""
    import numpy as np

    np.savez(args.weights, **{k: v.numpy() for k, v in _torch_model().state_dict().items()})
    return {}


def worker_segjax(args) -> dict:
    from segjax.xla_flags import setup_cpu

    setup_cpu()  # XLA:CPU preset + host-memory reuse, before the backend starts
    import jax
    import jax.numpy as jnp
    import numpy as np

    from segjax import models
    from segjax.convert import maskrcnn as conv
    from segjax.inference import MaskRCNNPredictor

    with np.load(args.weights) as sd:
        params, meta, _ = conv.from_state_dict(dict(sd), model_kwargs={"min_size": SIZE,
                                                                        "max_size": max(1333, SIZE)})
    model = models.build(meta["model"], **meta["model_kwargs"])
    pred = MaskRCNNPredictor(model, params, meta)
    img = _image()
    res = {}
    t = time.perf_counter()
    pred(img)
    res["infer_compile_s"] = time.perf_counter() - t
    res["infer_s"], res["infer_min_s"] = _time(lambda: pred(img), args.iters)
    res["num_detections"] = len(pred(img)["boxes"])
    res["infer_peak_mb"] = _peak_mb()
    pred = None  # torchvision trains the one model it ran: keep one copy of the weights
    if not args.skip_train:
        boxes, labels, masks = _targets(2)
        batch, state, step = segjax_train_step(model, params, [img, img[:, ::-1]], boxes, labels, masks, 0.02)
        del params
        state = jax.block_until_ready(state)

        holder = {"s": state}

        def reset():  # every timed step starts from the initial weights (see the module doc)
            holder["s"] = jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, state))

        def run():
            holder["s"], loss = step(holder["s"], batch, jax.random.key(0))
            res["train_loss"] = float(loss)
        reset()
        t = time.perf_counter()
        run()
        res["train_compile_s"] = time.perf_counter() - t
        res["train_s"], res["train_min_s"] = _time(run, args.iters, reset)
    res["peak_mb"] = _peak_mb()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--size", type=int, default=800, help="square image side; the models' min_size too")
    p.add_argument("--worker", choices=("segjax", "torch", "weights"))
    p.add_argument("--weights", help="(workers) the .npz state dict the weights worker writes")
    args = p.parse_args(argv)
    global SIZE
    SIZE = args.size
    if args.worker:
        load0 = os.getloadavg()[0]
        res = {"segjax": worker_segjax, "torch": worker_torch, "weights": worker_weights}[args.worker](args)
        res["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # other jobs on the machine
        print(_TAG + json.dumps(res), flush=True)
        return 0
    results = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "maskrcnn_r50_fpn.npz")
        for w in ("weights", "segjax") + (() if args.skip_torch else ("torch",)):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", w, "--iters", str(args.iters),
                   "--size", str(args.size), "--weights", weights]
            cmd += ["--skip-train"] if args.skip_train else []
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith(_TAG)]
            if out.returncode or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{w} worker failed (exit {out.returncode})")
            if w != "weights":
                results[w] = json.loads(lines[-1][len(_TAG):])
    print(f"Mask R-CNN R50-FPN, {SIZE}x{SIZE}, fp32, {os.cpu_count()} CPUs")
    print(f"{'':10s} {'infer s':>9s} {'train s':>9s} {'compile s (inf/train)':>22s} {'infer peak':>10s}"
          f" {'peak MB':>9s} {'dets':>5s} {'load avg':>12s}")
    for w, r in results.items():
        comp = f"{r.get('infer_compile_s', float('nan')):.1f}/{r.get('train_compile_s', float('nan')):.1f}"
        print(f"{w:10s} {r['infer_s']:9.3f} {r.get('train_s', float('nan')):9.3f} "
              f"{comp if w == 'segjax' else '-':>22s} {r['infer_peak_mb']:10.0f} {r['peak_mb']:9.0f}"
              f" {r['num_detections']:5d} {r['loadavg_1min'][0]:5.1f}-{r['loadavg_1min'][1]:<5.1f}")
    if "torch" in results:
        s, t = results["segjax"], results["torch"]
        print(f"ratio (torchvision / segjax): inference {t['infer_s'] / s['infer_s']:.2f}x"
              + (f", train step {t['train_s'] / s['train_s']:.2f}x" if "train_s" in s else ""))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
