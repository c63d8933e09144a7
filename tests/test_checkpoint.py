"""checkpoint: params-only save/load, fallback past a corrupt step (moved aside and
written again), a config mismatch that touches nothing, write failures in one line,
declared merges."""

import os
import re
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
    # moved aside, so the step is written again and does not hold a keep slot
    assert os.path.isdir(os.path.join(ck.directory, "6.corrupt"))
    assert ck.save(6, _tree(6.5), {"mu": _tree(-6.5)}, {"step": 6}, {"model": "m"})
    assert ck.save(8, _tree(8.0), {"mu": _tree(-8.0)}, {"step": 8}, {"model": "m"})
    ck.wait()
    assert sorted(os.listdir(ck.directory)) == ["6", "6.corrupt", "8"]  # keep=2 ignores .corrupt
    np.testing.assert_array_equal(checkpoint.load_params(ck.directory)[0]["enc"]["kernel"], 8.0)
    ck.close()


def _files(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)),
                   os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("change", ["shape", "optimizer", "model"])
def test_checkpoint_of_another_config_stops_and_is_kept(tmp_path, change):
    import jax
    import optax

    sds = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)  # noqa: E731
    ck = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep=1, async_save=False)
    adam = optax.adam(1e-3)
    ck.save(1, _tree(1.0), adam.init(_tree(1.0)), {"step": 1}, {"model": "m"})
    ck.close()
    ck = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep=1)  # a restarted run
    before = _files(ck.directory)
    params_t, model = sds(_tree(0.0)), "m"
    opt_t = sds(adam.init(_tree(0.0)))
    if change == "shape":  # e.g. another patch_size
        params_t["enc"]["kernel"] = jax.ShapeDtypeStruct((5, 4), np.float32)
        opt_t = sds(adam.init({"enc": {"kernel": np.zeros((5, 4), np.float32)},
                               "head": {"bias": np.zeros(2, np.float32)}}))
        expect = [r"params/enc/kernel: checkpoint \(3, 4\) float32 vs config \(5, 4\) float32",
                  r"opt_state/0/mu/enc/kernel"]
    elif change == "optimizer":  # e.g. adamw -> sgd with momentum
        opt_t = sds(optax.sgd(1e-3, momentum=0.9).init(_tree(0.0)))
        expect = [r"opt_state/0/mu/enc/kernel: in the checkpoint \(\(3, 4\) float32\), not in the config",
                  r"opt_state/0/trace/enc/kernel: not in the checkpoint"]
    else:
        model = "other"
        expect = [r"holds model 'm' but the config builds 'other'"]
    with pytest.raises(checkpoint.ConfigMismatchError) as err:
        ck.restore_latest(params_t, opt_t, model=model)
    for pattern in expect + [str(ck.directory), "nothing was changed or deleted"]:
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
    ck.close()
    assert _files(ck.directory) == before  # not moved aside, not deleted, not rewritten


def test_params_target_of_another_architecture_is_named(tmp_path):
    import jax

    checkpoint.save_params(tmp_path / "c", _tree(1.0), {"model": "m"})
    target = {"enc": {"kernel": jax.ShapeDtypeStruct((3, 8), np.float32)}}
    with pytest.raises(checkpoint.ConfigMismatchError,
                       match=r"enc/kernel: checkpoint \(3, 4\) float32 vs config \(3, 8\)"):
        checkpoint.load_params(tmp_path / "c", target=target)


def test_full_disk_is_one_clear_error(tmp_path, monkeypatch, caplog):
    import errno

    from etils import epath

    ck = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep=2, async_save=True)
    ck.save(1, _tree(1.0), {"mu": _tree(1.0)}, {"step": 1}, {"model": "m"})
    ck.wait()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    # the write layer under Orbax's metadata files (array data goes through TensorStore)
    monkeypatch.setattr(type(epath.Path(tmp_path)), "write_text", full)
    caplog.clear()
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=f"cannot write checkpoint step 2 to {re.escape(ck.directory)}: no space left on device"):
        ck.save(2, _tree(2.0), {"mu": _tree(2.0)}, {"step": 2}, {"model": "m"})
        ck.wait()
    ck.close()
    assert [r for r in caplog.records if r.levelno >= 40] == []  # Orbax's tracebacks went to DEBUG
    assert checkpoint.load_params(tmp_path)[1]["step"] == 1



def test_write_failure_inside_tensorstore_is_one_clear_error(tmp_path, caplog):
    """A real OS write failure under TensorStore: a file size limit (EFBIG) while the
    array data is written."""
    import resource
    import signal

    ck = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep=2, async_save=True)
    big = {"w": np.random.default_rng(0).standard_normal((300, 400)).astype(np.float32)}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    caplog.clear()
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
        with pytest.raises(checkpoint.CheckpointWriteError,
                           match=f"cannot write checkpoint step 1 to {re.escape(ck.directory)}: file too large"):
            ck.save(1, big, {"mu": big}, {"step": 1}, {"model": "m"})
            ck.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    ck.close()
    assert [r for r in caplog.records if r.levelno >= 40] == []
    assert ck.latest_step() is None
