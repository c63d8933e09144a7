"""MAE pretraining -> fine-tuning / linear probe through configs, and eval.py's path."""

import glob
import os

import numpy as np
import pytest

from configs.classification import digits_finetune
from configs.mae import digits as mae_digits
from segjax import checkpoint, train_loop


def _small(c, tmp, steps=4):
    c.unlock()
    c.batch_size, c.eval_batch_size, c.total_steps = 16, 64, steps
    c.eval_every, c.log_every = steps, 1
    c.checkpoint.save_every = steps
    c.data.data_dir = str(tmp / "data")
    return c


@pytest.fixture(scope="module")
def mae_workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mae")
    c = _small(mae_digits.get_config("runlocal"), tmp)
    metrics = train_loop.train(c, str(tmp / "w"))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval/loss"])
    return tmp


def test_mae_run_writes_checkpoint_metrics_and_picture(mae_workdir):
    w = mae_workdir / "w"
    assert checkpoint.load_meta(w)["model"] == "mae_vit_tiny"
    assert glob.glob(str(w / "tensorboard" / "events.out.tfevents.*"))
    png = w / "images" / "mae_latest.png"
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    # eval.py's library path on the same workdir
    c = _small(mae_digits.get_config("runlocal"), mae_workdir)
    m = train_loop.evaluate_checkpoint(c, str(w))
    assert np.isfinite(m["loss"])


def _finetune(tmp, mode, init_from):
    c = _small(digits_finetune.get_config(mode), tmp)
    c.init_from.path = str(init_from) if init_from else ""
    trainer = train_loop.Trainer(c)
    return c, trainer


def test_finetune_loads_encoder_and_trains(mae_workdir, tmp_path):
    c, trainer = _finetune(tmp_path, "finetune", mae_workdir / "w")
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "ft", 4, 1)
    state, info = train_loop.restore_or_init(trainer, ckpt)
    rep = info["init_from"]
    assert "head/kernel" in rep["missing"] and "fc_norm/scale" in rep["missing"]
    assert any(p.startswith("decoder_blocks_0") for p in rep["unexpected"])
    mae, _ = checkpoint.load_params(mae_workdir / "w")
    got = np.asarray(state["params"]["blocks_1"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(got, mae["blocks_1"]["mlp"]["fc1"]["kernel"])
    metrics = train_loop.train(c, str(tmp_path / "ft2"))
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/examples"] == 300


def test_init_from_undeclared_mismatch_fails(mae_workdir, tmp_path):
    c, trainer = _finetune(tmp_path, "finetune", mae_workdir / "w")
    c.init_from.allow_unexpected = ()
    with pytest.raises(ValueError, match="unexpected"):
        train_loop.restore_or_init(trainer, checkpoint.TrainCheckpointer(tmp_path / "x", 4, 1))


def test_linear_probe_trains_only_the_head(mae_workdir, tmp_path):
    c = _small(digits_finetune.get_config("linear_probe"), tmp_path, steps=3)
    c.init_from.path = str(mae_workdir / "w")
    c.eval_every = 0
    c.optim.warmup_steps = 1
    train_loop.train(c, str(tmp_path / "probe"))
    after, _ = checkpoint.load_params(tmp_path / "probe")
    mae, _ = checkpoint.load_params(mae_workdir / "w")
    np.testing.assert_array_equal(after["blocks_0"]["attn"]["qkv"]["kernel"],
                                  mae["blocks_0"]["attn"]["qkv"]["kernel"])
    assert np.abs(after["head"]["kernel"]).max() > 2e-4  # moved well past its 2e-5-std init


def test_every_config_builds():
    import importlib

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
        if rel.endswith("__init__"):
            continue
        mod = importlib.import_module(rel)
        if not hasattr(mod, "get_config"):  # shared pieces (configs/base.py, common.py, ...)
            continue
        c = mod.get_config()
        assert c.task and c.model.name, rel
