"""checkpoint: params-only save/load, fallback past a corrupt step, declared merges."""

import os
import shutil

import numpy as np
import pytest

from segjax import checkpoint


def _tree(v):
    return {"enc": {"kernel": np.full((3, 4), v, np.float32)}, "head": {"bias": np.full((2,), v, np.float32)}}


def test_save_load_params_roundtrip(tmp_path):
    checkpoint.save_params(tmp_path / "c", _tree(1.0), {"model": "m", "model_kwargs": {"a": 1}})
    p, meta = checkpoint.load_params(tmp_path / "c")
    np.testing.assert_array_equal(p["enc"]["kernel"], 1.0)
    assert meta["model"] == "m" and meta["model_kwargs"] == {"a": 1} and meta["step"] == 0


def test_corrupt_latest_falls_back(tmp_path, caplog):
    root = tmp_path / "c"
    checkpoint.save_params(root, _tree(1.0), {"model": "m"}, step=1)
    checkpoint.save_params(root, _tree(2.0), {"model": "m"}, step=2)
    # corrupt every data file of the newest step's params
    for dirpath, _, files in os.walk(root / "2" / "params"):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(os.path.getsize(path) // 3, 1))
    p, meta = checkpoint.load_params(root)
    assert meta["step"] == 1
    np.testing.assert_array_equal(p["enc"]["kernel"], 1.0)
    assert "unreadable" in caplog.text
    shutil.rmtree(root / "1")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_params(root)


def test_missing_dir_is_clear(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load_params(tmp_path / "nope")


def test_merge_params_declared_only():
    init = {"enc": {"kernel": np.zeros((3, 4))}, "head": {"kernel": np.zeros((4, 2))}}
    loaded = {"enc": {"kernel": np.ones((3, 4))}, "decoder_x": {"k": np.ones(2)}}
    with pytest.raises(ValueError, match="missing"):
        checkpoint.merge_params(init, loaded)
    out, rep = checkpoint.merge_params(init, loaded, allow_missing=[r"^head/"],
                                       allow_unexpected=[r"^decoder_"])
    np.testing.assert_array_equal(out["enc"]["kernel"], 1.0)
    np.testing.assert_array_equal(out["head"]["kernel"], 0.0)
    assert rep["missing"] == ["head/kernel"] and rep["unexpected"] == ["decoder_x/k"]
    with pytest.raises(ValueError, match="shape"):
        checkpoint.merge_params(init, {"enc": {"kernel": np.ones((4, 4))}, "head": {"kernel": np.ones((4, 2))}})


def test_train_checkpointer_keeps_k_and_falls_back_past_corrupt_latest(tmp_path, caplog):
    import jax

    ck = checkpoint.TrainCheckpointer(tmp_path, save_every=2, keep=2, async_save=True)
    for step in range(1, 7):
        assert ck.save(step, _tree(float(step)), {"mu": _tree(-float(step))}, {"step": step},
                       {"model": "m"}) == (step % 2 == 0)
    ck.wait()
    assert ck.latest_step() == 6
    assert sorted(int(d) for d in os.listdir(ck.directory) if d.isdigit()) == [4, 6]  # keep=2
    # truncate the newest step's array files
    for dirpath, _, files in os.walk(os.path.join(ck.directory, "6", "params")):
        for f in files:
            with open(os.path.join(dirpath, f), "r+b") as fh:
                fh.truncate(1)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(0.0))
    step, params, opt, data = ck.restore_latest(target, {"mu": target})
    assert step == 4 and data == {"step": 4}
    np.testing.assert_array_equal(params["enc"]["kernel"], 4.0)
    np.testing.assert_array_equal(opt["mu"]["head"]["bias"], -4.0)
    assert "step 6" in caplog.text and "unreadable" in caplog.text
    ck.close()
