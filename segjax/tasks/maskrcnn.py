"""Mask R-CNN task: detection data, torchvision's five losses, COCO box/mask AP + pictures.

Data (`config.data`):
  kind: 'shapes' (generated, no download; `config.data.shapes` holds the
    `ShapesSpec` fields) or 'coco' (any COCO-format dataset: `config.data.dataset`
    names it, `config.data.splits` maps split -> (image folder, instances JSON) to
    build it on first use, "{root}" in them standing for `config.data.root`; leave
    it empty for an already prepared dataset).
  data_dir ('' = ~/tensorflow_datasets), train_split, eval_split,
  min_size (int or tuple: multi-scale training), max_size, pad_size (H, W),
  max_instances, hflip, label_key ('label' contiguous | 'category_id').
  lsj: {} or {'size', 'min_scale', 'max_scale'[, 'recompute_boxes']}: large-scale
    jitter in training (segjax.data.jitter) instead of the min_size resize.
Evaluation (`config.eval`): max_images (0 = the whole split), num_draw pictures,
  backend ('pycocotools' | 'faster_coco_eval'), annotation_file ('' = ground truth
  rebuilt from the dataset records; a JSON path gives the official numbers),
  score_threshold of the drawings.

Outputs of `evaluate` under the workdir: eval/detections_step{N}.json (COCO results
format, RLE masks), images/maskrcnn_step{N}.png (detections | ground truth).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from segjax import models, sharding
from segjax.data import coco, shapes
from segjax.data import maskrcnn as maskrcnn_data
from segjax.data.decode import decode_image
from segjax.data.pipeline import EvalLoader, Loader
from segjax.data.source import resolve_data_dir
from segjax.evaluators import coco as coco_eval
from segjax.evaluators import visualize
from segjax.models.maskrcnn.mask_rcnn import TRAIN_CPU_COMPILER_OPTIONS, MaskRCNN, rescale_boxes
from segjax.tasks import common

RNG_STREAMS = ("sampling", "dropout")  # dropout: ViTDet drop path
CPU_COMPILER_OPTIONS = TRAIN_CPU_COMPILER_OPTIONS  # the train step's, on CPU meshes (train_loop)
# What the model reads from a batch (the rest stays on the host).
MODEL_KEYS = ("image", "image_hw", "boxes", "labels", "masks", "valid")

_log = logging.getLogger(__name__)


def build_model(config):
    return common.build_model(config)


def pad_size(config) -> tuple[int, int]:
    s = config.data.pad_size
    return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))


def example_batch(config, b: int) -> dict:
    h, w = pad_size(config)
    return {"image": jnp.zeros((b, h, w, 3), jnp.float32),
            "image_hw": jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1))}


def model_inputs(batch: dict) -> dict:
    return {"image": batch["image"], "image_hw": batch["image_hw"]}


def loss_fn(model, params, batch, rngs, train: bool, config=None):
    """torchvision's summed RPN + Fast R-CNN + mask losses; needs the 'sampling' rng."""
    del train, config  # Mask R-CNN's loss is its train-mode forward.
    inputs = {k: batch[k] for k in MODEL_KEYS}
    return model.apply({"params": params}, inputs, method=MaskRCNN.losses, rngs=rngs)


# ----------------------------------------------------------------------------- data


def dataset(config) -> tuple[str, str]:
    """Prepares the configured dataset if needed; returns (data_dir, coco_format name)."""
    d = config.data
    data_dir = resolve_data_dir(d.get("data_dir") or None)
    kind = d.get("kind", "shapes")
    if kind == "shapes":
        spec = shapes.ShapesSpec(**dict(d.get("shapes", {})))
        return data_dir, shapes.prepare_shapes(data_dir, spec)
    if kind == "coco":
        root = d.get("root", "")
        splits = {k: tuple(str(p).replace("{root}", root) for p in v) for k, v in dict(d.get("splits", {})).items()}
        if splits:
            coco.prepare_coco(data_dir, d.dataset, splits)
        return data_dir, d.dataset
    raise ValueError(f"config.data.kind must be 'shapes' or 'coco', got {kind!r}")


def check_num_classes(config, metadata: dict) -> None:
    """The model's classifier must have a slot for every label the data produces."""
    kwargs = dict(config.model.get("kwargs", {}))
    n = kwargs.get("num_classes", models.MODELS[config.model.name].defaults.get("num_classes", 91))
    if config.data.get("label_key", "label") == "label":
        need = coco.num_classes(metadata)
    else:
        need = max(metadata["category_ids"]) + 1
    if n < need:
        raise ValueError(f"model {config.model.name} has num_classes={n}, but the dataset's labels need "
                         f"{need} (background + {len(metadata['category_ids'])} categories); set "
                         f"config.model.kwargs.num_classes={need}")


def preprocess(config, train: bool) -> maskrcnn_data.DetectionPreprocess:
    d = config.data
    min_size = d.min_size
    min_size = int(min_size) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    return maskrcnn_data.DetectionPreprocess(
        min_size=min_size, max_size=int(d.max_size), pad_size=pad_size(config),
        max_instances=int(d.max_instances), hflip=bool(d.get("hflip", False)) and train,
        label_key=d.get("label_key", "label"), with_masks=train,
        lsj=maskrcnn_data.LargeScaleJitter(**dict(d.lsj)) if train and d.get("lsj") else None)


class _ModelBatches:
    """A `Loader` over a `DetectionSource` whose batches carry only what the train step reads (the
    host-only image_id (int64) and orig_hw stay behind)."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def get_batch(self, step: int) -> dict:
        return {k: v for k, v in self.loader.get_batch(step).items() if k in MODEL_KEYS}

    def iterate(self, start_step: int = 0):
        it = self.loader.iterate(start_step)
        try:
            for step, batch in it:
                yield step, {k: v for k, v in batch.items() if k in MODEL_KEYS}
        finally:
            it.close()


def make_loader(config, split, process_index, process_count):
    data_dir, name = dataset(config)
    check_num_classes(config, coco.dataset_metadata(data_dir, name))
    loader = Loader(
        maskrcnn_data.DetectionSource(coco.open_split(data_dir, name, split), require_target=True),
        preprocess(config, train=True),
        global_batch_size=config.batch_size, seed=config.seed,
        process_index=process_index, process_count=process_count)
    return _ModelBatches(loader)


# ----------------------------------------------------------------------------- evaluation


def _predict_fn(trainer):
    model = trainer.model

    def predict(params, image, image_hw):
        with sharding.batch_shards(trainer.batch_shards):
            out = model.apply({"params": params}, image, image_hw)
        return {k: out[k] for k in ("boxes", "scores", "labels", "valid", "masks")}

    return jax.jit(predict, in_shardings=(trainer.param_shardings, trainer.batch_sharding,
                                          trainer.batch_sharding))


def _to_host(tree, trainer):
    """Batch-sharded global outputs -> this process's rows (numpy)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.device_get(multihost_utils.global_array_to_host_local_array(
        tree, trainer.mesh, trainer.batch_sharding.spec))


def postprocess(out: dict, i: int, image_hw, orig_hw) -> dict[str, np.ndarray]:
    """Row i's valid detections in the original frame (torchvision's `postprocess`):
    boxes (D, 4) rescaled, masks (D, h, w) pasted probabilities, scores, labels."""
    keep = np.asarray(out["valid"][i], bool)
    rh, rw = (int(v) for v in image_hw)
    h, w = (int(v) for v in orig_hw)
    boxes = rescale_boxes(np.asarray(out["boxes"][i])[keep], (rh, rw), (h, w))
    return {"boxes": boxes, "scores": np.asarray(out["scores"][i])[keep],
            "labels": np.asarray(out["labels"][i])[keep],
            "masks": coco_eval.paste_masks(np.asarray(out["masks"][i])[keep], boxes, h, w)}


def evaluate(trainer, params, workdir: str, step: int, writer) -> dict[str, float]:
    """COCO box and mask AP on the eval split; writes the detections JSON and a picture."""
    config = trainer.config
    ev_cfg = config.get("eval", {})
    data_dir, name = dataset(config)
    split = config.data.get("eval_split", "val")
    source = coco.open_split(data_dir, name, split)
    loader = EvalLoader(
        maskrcnn_data.DetectionSource(source), preprocess(config, train=False),
        global_batch_size=config.get("eval_batch_size", config.batch_size),
        process_index=jax.process_index(), process_count=jax.process_count(),
        max_examples=int(ev_cfg.get("max_images", 0)) or None, valid_key="example_valid")
    predict = _predict_fn(trainer)
    drawn = []
    num_draw = int(ev_cfg.get("num_draw", 8))
    meta = coco.dataset_metadata(data_dir, name)
    label_key = config.data.get("label_key", "label")
    category_ids = meta["category_ids"] if label_key == "label" else None
    collector = coco_eval.CocoEvaluator(None, category_ids)  # this process's results; gt on process 0
    for batch in loader:
        local = {k: batch[k] for k in ("image", "image_hw")}
        local = trainer.put_batch(local)
        with trainer.mesh:
            out = predict(params, local["image"], local["image_hw"])
        out = _to_host(out, trainer)
        for i in np.flatnonzero(batch["example_valid"]):
            det = postprocess(out, i, batch["image_hw"][i], batch["orig_hw"][i])
            collector.add(int(batch["image_id"][i]), det["boxes"], det["scores"], det["labels"], det["masks"])
            if len(drawn) < num_draw:
                drawn.append((int(batch["index"][i]), det))
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    part = collector.write(os.path.join(eval_dir, f".part_{step}_{jax.process_index()}.json"))
    with open(os.path.join(eval_dir, f".ids_{step}_{jax.process_index()}.json"), "w") as f:
        json.dump(collector.image_ids, f)
    multihost_utils.sync_global_devices(f"maskrcnn_eval_{step}")
    metrics: dict[str, float] = {}
    if jax.process_index() == 0:
        ann_file = ev_cfg.get("annotation_file", "")
        gt = ann_file or coco.ground_truth([source[i] for i in range(loader.num_examples)], meta)
        evaluator = coco_eval.CocoEvaluator(gt, category_ids=None, backend=ev_cfg.get("backend", "pycocotools"))
        for p in range(jax.process_count()):
            with open(os.path.join(eval_dir, f".part_{step}_{p}.json")) as f, \
                    open(os.path.join(eval_dir, f".ids_{step}_{p}.json")) as g:
                evaluator.extend(json.load(f), json.load(g))
        metrics = evaluator.evaluate(os.path.join(eval_dir, f"detections_step{step:06d}.json"))
        metrics["images"] = float(len(evaluator.image_ids))
        _draw(config, source, meta, drawn, workdir, step, writer)
    multihost_utils.sync_global_devices(f"maskrcnn_eval_done_{step}")
    os.remove(part)
    os.remove(os.path.join(eval_dir, f".ids_{step}_{jax.process_index()}.json"))
    return metrics


def _draw(config, source, meta, drawn, workdir, step, writer) -> None:
    """Rows: detections (score >= eval.score_threshold) | ground truth, original frame."""
    if not drawn:
        return
    threshold = float(config.get("eval", {}).get("score_threshold", 0.5))
    names = meta["category_names"]
    label_key = config.data.get("label_key", "label")
    rows = []
    for index, det in drawn:
        record = source[index]
        image = decode_image(record["image"])
        scale = max(1, 256 // max(image.shape[:2]))
        obj = record["objects"]
        gt_masks = maskrcnn_data.decode_masks(obj["rle"], int(record["height"]), int(record["width"]))
        labels = det["labels"] if label_key == "label" else _contiguous(det["labels"], meta)
        rows.append(visualize.side_by_side([
            visualize.draw_detections(image, det["boxes"], labels, det["scores"], det["masks"], names,
                                      score_threshold=threshold, scale=scale),
            visualize.draw_detections(image, obj["bbox"], obj["label"], None, gt_masks, names, scale=scale)]))
    picture = visualize.one_under_another(rows)
    visualize.save_png(os.path.join(workdir, "images", f"maskrcnn_step{step:06d}.png"), picture)
    visualize.save_png(os.path.join(workdir, "images", "maskrcnn_latest.png"), picture)
    writer.image("eval/detections", picture, step)


def _contiguous(category_ids: np.ndarray, meta: dict) -> np.ndarray:
    lookup = {c: i + 1 for i, c in enumerate(meta["category_ids"])}
    return np.asarray([lookup.get(int(c), 0) for c in category_ids], np.int64)
