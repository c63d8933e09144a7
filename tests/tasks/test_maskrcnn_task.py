"""Mask R-CNN task: a short train + eval through the generic loop (detections JSON, PNG,
COCO metrics), eval.py's path, and data-parallel on 8 devices == one device."""

import json
import os

import jax
import numpy as np
import pytest

from configs.maskrcnn import shapes as shapes_config
from segjax import sharding, train_loop
from segjax.evaluators import coco as coco_eval
from segjax.tasks import maskrcnn

SHAPES = {"image_size": 64, "num_train": 16, "num_val": 8, "max_objects": 3, "min_size": 10,
          "max_size": 28, "seed": 0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **kw):
    c = shapes_config.get_config("runlocal")
    c.unlock()
    c.data.data_dir = data_dir
    c.data.shapes = dict(SHAPES)
    c.data.min_size, c.data.max_size, c.data.pad_size, c.data.max_instances = 64, 64, (64, 64), 4
    c.model.kwargs = {"num_classes": 4, "min_size": 64, "max_size": 64}
    c.batch_size = c.eval_batch_size = 8
    c.total_steps = 3
    c.eval_every = 3
    c.eval.max_images = 8
    c.eval.num_draw = 2
    c.checkpoint.save_every = 3
    c.checkpoint.async_save = False
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    for k, v in kw.items():
        c[k] = v
    return c


def test_train_then_eval_writes_detections_and_metrics(data_dir, tmp_path):
    c = _config(data_dir)
    workdir = str(tmp_path / "wd")
    metrics = train_loop.train(c, workdir)
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    for name in coco_eval.METRIC_NAMES:
        for t in ("bbox", "segm"):
            assert -1 <= metrics[f"eval/{t}/{name}"] <= 1
    assert metrics["eval/images"] == 8
    dets = os.path.join(workdir, "eval", "detections_step000003.json")
    with open(dets) as f:
        results = json.load(f)
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(r) for r in results)
    assert {r["category_id"] for r in results} <= {1, 2, 3}
    assert os.path.exists(os.path.join(workdir, "images", "maskrcnn_step000003.png"))
    # eval.py's path: the saved checkpoint gives the same numbers.
    again = train_loop.evaluate_checkpoint(c, workdir)
    for k, v in again.items():
        assert v == pytest.approx(metrics[f"eval/{k}"], abs=1e-6), k


def test_loader_batches_carry_model_keys_only(data_dir):
    loader = maskrcnn.make_loader(_config(data_dir), "train", 0, 1)
    batch = loader.get_batch(0)
    assert set(batch) == set(maskrcnn.MODEL_KEYS)
    assert batch["image"].shape == (8, 64, 64, 3) and batch["masks"].shape == (8, 4, 64, 64)
    assert batch["valid"].any(axis=1).all()  # every training image has a target


def _run(config, mesh, batches):
    tr = train_loop.Trainer(config, mesh=mesh)
    state = tr.init_state()
    losses = []
    for b in batches:
        with tr.mesh:
            state, metrics = tr.train_step(state, tr.put_batch(b))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state["params"]), losses


def test_data_parallel_equals_single_device(data_dir):
    c = _config(data_dir)
    loader = maskrcnn.make_loader(c, "train", 0, 1)
    batches = [loader.get_batch(s) for s in range(2)]
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    ref_params, ref_losses = _run(c, one, batches)
    params, losses = _run(c, eight, batches)
    # Same math, different reduction order (fp32); discrete choices (top-k, NMS,
    # sampling) see the same rng and near-equal scores.
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    flat = jax.tree_util.tree_leaves_with_path(params)
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_params))
    # Adam divides by sqrt(v): where a gradient is near zero its rounding noise becomes
    # an update of up to lr, so params agree to 15% of one step (lr 1e-3; measured
    # worst 1.1e-4), not to fp32 precision.
    for path, a in flat:
        np.testing.assert_allclose(a, ref[path], rtol=0, atol=1.5e-4, err_msg=jax.tree_util.keystr(path))
    init = jax.device_get(train_loop.Trainer(c, mesh=one).init_state()["params"])
    moved = np.abs(ref_params["roi_heads"]["box_head"]["fc6"]["kernel"]
                   - init["roi_heads"]["box_head"]["fc6"]["kernel"]).max()
    assert moved > 1.5e-3  # two Adam steps really moved the weights (not two untouched inits)


def test_configs_build_and_class_check(data_dir):
    from configs.maskrcnn import coco_r50_fpn

    c = coco_r50_fpn.get_config()
    assert c.model.name == "mask_rcnn_r50_fpn" and c.data.kind == "coco"
    assert c.data.splits["val"][1] == "{root}/annotations/instances_val2017.json"
    assert coco_r50_fpn.get_config("runlocal").batch_size == 2
    with pytest.raises(ValueError, match="runlocal"):
        shapes_config.get_config("fast")
    meta = {"category_ids": [1, 2, 3]}
    c = _config(data_dir)
    maskrcnn.check_num_classes(c, meta)  # 3 classes + background fit num_classes=4
    c.model.kwargs = {"num_classes": 3}
    with pytest.raises(ValueError, match="num_classes=4"):
        maskrcnn.check_num_classes(c, meta)


@pytest.mark.slow  # ~7 CPU-minutes: a short real training run
def test_tiny_mask_rcnn_learns_shapes(data_dir, tmp_path):
    """400 steps on 64 px shapes take box and mask AP from ~0 (untrained, AP50 < 0.05)
    to clearly above it (AP > 0.06, AP50 > 0.25); recorded results of this test and of
    the 128 px, 1200-step config (configs/maskrcnn/shapes.py) are in benchmarks/README.md."""
    from segjax.metrics_writer import MetricWriter

    c = _config(data_dir, total_steps=400, eval_every=400)
    c.data.shapes = {**SHAPES, "num_train": 400, "num_val": 50}
    c.eval.max_images = 0
    c.optim.warmup_steps = 50
    c.checkpoint.save_every = 400
    tr = train_loop.Trainer(c)
    untrained = maskrcnn.evaluate(tr, tr.init_state()["params"], str(tmp_path / "init"), 0,
                                  MetricWriter(str(tmp_path / "tb"), enabled=False))
    assert untrained["bbox/AP50"] < 0.05 and untrained["segm/AP50"] < 0.05, untrained
    metrics = train_loop.train(c, str(tmp_path / "wd"))
    assert metrics["eval/images"] == 50
    for t in ("bbox", "segm"):
        assert metrics[f"eval/{t}/AP"] > 0.06 and metrics[f"eval/{t}/AP50"] > 0.25, metrics
