"""Times Mask R-CNN R50-FPN inference and a train step in segjax and torchvision, interleaved.

Setup: torchvision's `maskrcnn_resnet50_fpn` architecture as its COCO weights build it
(FrozenBatchNorm2d, trainable_backbone_layers 3), seeded random weights, converted to
segjax with `segjax.convert.maskrcnn` so both run the same network. fp32.
  inference: one 800x800 RGB photo-sized image (skimage astronaut resized), eval mode,
    torchvision `model([img])` vs segjax `MaskRCNNPredictor` (host resize + jit forward +
    mask pasting); both produce torchvision's output dict.
  train step: batch 2 of 800x800 images with 6 instances each (boxes + masks), the
    five losses, backward and SGD (momentum 0.9, lr 0.02, weight decay 1e-4) with
    torchvision's frozen parameters kept frozen on both sides.

Processes. The seeded torchvision weights are built in a first subprocess and handed to
the segjax workers as an .npz state dict, so that no segjax worker imports torch
(torch's libraries and model would otherwise count in segjax's peak). Each phase
(inference, then the train step) runs in a fresh pair of workers, one per framework,
so that each peak RSS belongs to one framework and one phase. Both workers of a phase
stay alive and take turns: the parent asks for one timed call at a time, alternating
which framework goes first in each round (segjax, torchvision, torchvision, segjax,
...), so that the two sides run under the same background load on a shared machine;
a waiting worker blocks on its pipe and uses no CPU. Both use all CPUs (the same
thread count).

Usage:
  python benchmarks/mask_rcnn.py [--iters 3] [--skip-torch] [--skip-train] [--skip-infer]

NOTE: every timed train step starts from the initial weights and a fresh optimizer
state (restored untimed, on both sides): with lr 0.02 these random weights diverge
within a step or two (NaN loss), so timing a carried-over state would time a diverged
network. Both workers hold the same between steps: torchvision's worker its model and
the saved initial state dict (its SGD creates the momentum buffers in the step, and
restoring the optimizer's initial, empty state drops them); the segjax worker the
initial params and the state being stepped (params and SGD momentum, zeros, made at
each reset; the step donates it).

Recorded figures, with date, machine and command: benchmarks/README.md.

Numbers: median (and min) wall time of `--iters` timed calls per side after one
warm-up round; segjax compile time (first call, incl. tracing) separately; peak MB =
ru_maxrss of the phase's worker (CPU has no device memory stats; it includes the
process's imports and runtime, and for segjax compiling); ratio = torchvision time /
segjax time (> 1: segjax faster); load = the machine's 1-minute load average over the
timed calls (min-max), other jobs share the CPUs.
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


def _release_freed_memory():
    """Returns the heap's free pages to the OS (glibc `malloc_trim`): what compiling and
    loading freed (the process keeps it otherwise, see `segjax.xla_flags`) would
    count in the peak RSS once the step's temporary buffer lands elsewhere."""
    import gc

    from segjax.xla_flags import release_host_memory

    gc.collect()
    release_host_memory()


def segjax_train_step(model, params, images, boxes, labels, masks, lr: float):
    """The segjax side of a Mask R-CNN train step as torchvision's reference trains:
    SGD (momentum 0.9, weight decay 1e-4), torchvision's frozen parameters frozen.

    images: list of uint8 HWC arrays; boxes / labels / masks: per-image lists (`_targets`).
    Returns (batch, params, opt_init, step): opt_init(params) -> a fresh optimizer state
    (SGD's momentum, zeros); step(state, batch, rng) -> (state, loss), jitted, donating
    state = (params, opt_state).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from segjax.models.maskrcnn.backbone import frozen_patterns
    from segjax.models.maskrcnn.mask_rcnn import TRAIN_CPU_COMPILER_OPTIONS, mask_rcnn_loss, prepare_image
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

    # the compiler options train_loop gives this model's step on CPU
    @functools.partial(jax.jit, donate_argnums=(0,), compiler_options=TRAIN_CPU_COMPILER_OPTIONS)
    def step(state, batch, rng):
        p, o = state
        (loss, _), g = jax.value_and_grad(lambda q: mask_rcnn_loss(model, q, batch, rng), has_aux=True)(p)
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    return batch, p0, tx.init, step


# ----------------------------------------------------------------------------- workers
# A worker sets up one framework for one phase, then answers "call" requests (one timed
# call each, after an untimed reset where the phase has one) until "finish".


class TorchSide:
    def __init__(self, phase: str, args):
        import torch

        torch.set_num_threads(os.cpu_count())
        self.torch, self.phase, self.res = torch, phase, {}
        self.model = _torch_model()
        self.img = torch.from_numpy(_image()).permute(2, 0, 1).float() / 255.0
        if phase == "infer":
            return
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
        boxes, labels, masks = _targets(2)
        self.imgs = [self.img, self.img.flip(-1)]
        self.tg = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab), "masks": torch.from_numpy(m)}
                   for b, lab, m in zip(boxes, labels, masks)]
        self.sd0 = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.opt_sd0 = copy.deepcopy(self.opt.state_dict())
        _release_freed_memory()

    def reset(self):  # every timed step starts from the initial weights (see the module doc)
        if self.phase == "train":
            self.model.load_state_dict(self.sd0)
            self.opt.load_state_dict(self.opt_sd0)

    def call(self):
        if self.phase == "infer":
            with self.torch.no_grad():
                self.res["num_detections"] = len(self.model([self.img])[0]["boxes"])
            return
        self.opt.zero_grad()
        loss = sum(self.model(self.imgs, self.tg).values())
        loss.backward()
        self.opt.step()
        self.res["train_loss"] = float(loss)


class SegjaxSide:
    def __init__(self, phase: str, args):
        from segjax.xla_flags import setup_cpu

        # NOTE: the train worker keeps glibc's default malloc, as train.py does: with the
        # host-memory reuse, the state copy of each reset lands in the freed temporary
        # buffer of the last step, and the next step's buffer goes above it (peak RSS
        # +1.4 GB from the second step on, benchmarks/README.md).
        setup_cpu(host_memory=phase != "train")  # before the backend starts
        import jax
        import jax.numpy as jnp
        import numpy as np

        from segjax import models
        from segjax.convert import maskrcnn as conv
        from segjax.train_loop import compile_ahead

        self.jax, self.jnp, self.phase, self.res = jax, jnp, phase, {}
        with np.load(args.weights) as sd:
            params, meta, _ = conv.from_state_dict(dict(sd), model_kwargs={"min_size": SIZE,
                                                                            "max_size": max(1333, SIZE)})
        model = models.build(meta["model"], **meta["model_kwargs"])
        self.img = _image()
        t = time.perf_counter()
        if phase == "infer":
            from segjax.inference import MaskRCNNPredictor

            self.pred = MaskRCNNPredictor(model, params, meta)
            self.call()
            self.res["compile_s"] = time.perf_counter() - t
            _release_freed_memory()
            return
        boxes, labels, masks = _targets(2)
        self.batch, self.params0, self.opt_init, self.step = segjax_train_step(
            model, params, [self.img, self.img[:, ::-1]], boxes, labels, masks, 0.02)
        del params
        self.params0 = jax.block_until_ready(self.params0)
        self.reset()
        t = time.perf_counter()
        # as train_loop's first step: compile, hand the memory compiling freed back, run
        compile_ahead(self.step, self.state, self.batch, jax.random.key(0))
        self.call()
        self.res["compile_s"] = time.perf_counter() - t

    def reset(self):  # every timed step starts from the initial weights (see the module doc)
        if self.phase == "train":
            self.state = None  # the donated buffers of the previous step are gone already
            params = self.jax.tree_util.tree_map(self.jnp.copy, self.params0)
            self.state = self.jax.block_until_ready((params, self.opt_init(params)))

    def call(self):
        if self.phase == "infer":
            self.res["num_detections"] = len(self.pred(self.img)["boxes"])
            return
        self.state, loss = self.step(self.state, self.batch, self.jax.random.key(0))
        self.res["train_loss"] = float(loss)  # waits for the step


def _reply(obj):
    print(_TAG + json.dumps(obj), flush=True)


def serve(args) -> int:
    """Worker loop: set up, then one line per request on stdin ("call" / "finish")."""
    if args.worker == "weights":
        import numpy as np

        np.savez(args.weights, **{k: v.numpy() for k, v in _torch_model().state_dict().items()})
        _reply({})
        return 0
    side = {"segjax": SegjaxSide, "torch": TorchSide}[args.worker](args.phase, args)
    _reply({"ready": True, "peak_mb": _peak_mb()})
    for line in sys.stdin:
        if line.strip() == "finish":
            break
        side.reset()
        load = os.getloadavg()[0]
        t = time.perf_counter()
        side.call()
        _reply({"s": time.perf_counter() - t, "load": [load, os.getloadavg()[0]]})
    _reply({**side.res, "peak_mb": _peak_mb()})
    return 0


class _Worker:
    """A worker subprocess of the parent: request / reply over its stdin / stdout."""

    def __init__(self, name: str, phase: str, args, weights: str, env, logdir: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--phase", phase,
               "--size", str(args.size), "--weights", weights]
        self.name = name
        self.log = open(os.path.join(logdir, f"{name}_{phase}.log"), "w+")  # stderr: never blocks the pipe
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=_REPO, env=env)

    def ask(self, request: str | None = None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        self.proc.wait()
        self.log.seek(0)
        print(self.log.read()[-3000:], file=sys.stderr)
        raise SystemExit(f"{self.name} worker failed (exit {self.proc.returncode})")


def _phase(phase: str, sides: list[str], args, weights: str, env, logdir: str) -> dict:
    """Runs one phase: workers set up one after the other, then `iters` + 1 rounds of one
    call per side (the first round is the warm-up), the side that goes first alternating."""
    workers = {}
    for name in sides:  # set up (and compile) one at a time: the other's setup is not load
        workers[name] = _Worker(name, phase, args, weights, env, logdir)
        workers[name].ask()
    times = {name: [] for name in sides}
    loads = []
    for i in range(args.iters + 1):
        for name in sides if i % 2 == 0 else sides[::-1]:
            r = workers[name].ask("call")
            if i:
                times[name].append(r["s"])
                loads += r["load"]
    out = {}
    for name, w in workers.items():
        res = w.ask("finish")
        w.proc.wait()
        out[name] = {**res, "s": statistics.median(times[name]), "min_s": min(times[name]), "times": times[name]}
    out["load"] = [min(loads), max(loads)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--size", type=int, default=800, help="square image side; the models' min_size too")
    p.add_argument("--worker", choices=("segjax", "torch", "weights"))
    p.add_argument("--phase", choices=("infer", "train"), default="infer")
    p.add_argument("--weights", help="(workers) the .npz state dict the weights worker writes")
    args = p.parse_args(argv)
    global SIZE
    SIZE = args.size
    if args.worker:
        return serve(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    sides = ["segjax"] + ([] if args.skip_torch else ["torch"])
    phases = [ph for ph, skip in (("infer", args.skip_infer), ("train", args.skip_train)) if not skip]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "maskrcnn_r50_fpn.npz")
        w = _Worker("weights", "infer", args, weights, env, tmp)
        w.ask()
        w.proc.wait()
        for ph in phases:
            results[ph] = _phase(ph, sides, args, weights, env, tmp)
    print(f"Mask R-CNN R50-FPN, {SIZE}x{SIZE}, fp32, {os.cpu_count()} CPUs, {args.iters} timed calls per side")
    print(f"{'phase':6s} {'side':7s} {'median s':>9s} {'min s':>7s} {'compile s':>10s} {'peak MB':>8s}"
          f" {'dets / loss':>12s} {'load':>10s}")
    for ph, res in results.items():
        for name in sides:
            r = res[name]
            extra = r.get("num_detections", r.get("train_loss", float("nan")))
            comp = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
            print(f"{ph:6s} {name:7s} {r['s']:9.3f} {r['min_s']:7.3f} {comp:>10s} {r['peak_mb']:8.0f}"
                  f" {extra:12.3f} {res['load'][0]:4.1f}-{res['load'][1]:<4.1f}")
        if "torch" in res:
            print(f"{ph:6s} ratio (torchvision / segjax): time {res['torch']['s'] / res['segjax']['s']:.2f}x,"
                  f" peak memory segjax / torchvision {res['segjax']['peak_mb'] / res['torch']['peak_mb']:.2f}x")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
