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
