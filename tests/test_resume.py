"""A killed run resumes exactly; a NaN step is never saved; a typo in a flag fails."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from segjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, data_dir, steps=40, extra=()):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs/mae/digits.py") + ":runlocal", "--workdir", str(workdir),
            f"--config.total_steps={steps}", "--config.batch_size=16", "--config.eval_every=0",
            "--config.checkpoint.save_every=5", "--config.checkpoint.keep=2",
            f"--config.data.data_dir={data_dir}", "--config.log_every=5", *extra]


def _env():
    # one device per process: the test is about resumption, not sharding
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu"}


def _finalised_steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.exists(os.path.join(root, d, "_CHECKPOINT_METADATA")))


def test_sigkill_then_resume_gives_identical_params(tmp_path):
    data_dir = tmp_path / "data"
    ref = subprocess.run(_cmd(tmp_path / "ref", data_dir), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(work, data_dir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not [s for s in _finalised_steps(work) if s >= 10]:
            assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, possibly mid-save
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = max(_finalised_steps(work))
    assert 10 <= killed_at < 40

    resumed = subprocess.run(_cmd(work, data_dir), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, meta_a = checkpoint.load_params(tmp_path / "ref")
    b, meta_b = checkpoint.load_params(work)
    assert meta_a["step"] == meta_b["step"] == 40
    for (path, x), y in zip(checkpoint.flatten_paths(a).items(), checkpoint.flatten_paths(b).values()):
        np.testing.assert_array_equal(x, y, err_msg=path)  # bit-identical


def test_misspelled_override_fails_loudly(tmp_path):
    r = subprocess.run(_cmd(tmp_path / "w", tmp_path / "d", extra=["--config.optim.lrr=0.1"]),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "lrr" in r.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_nonfinite_loss_stops_before_saving(tmp_path, monkeypatch):
    from configs.mae import digits
    from segjax import train_loop
    from segjax.tasks import common

    c = digits.get_config("runlocal")
    c.unlock()
    c.batch_size, c.total_steps, c.eval_every, c.log_every = 8, 12, 0, 1
    c.checkpoint.save_every, c.checkpoint.async_save = 4, False
    c.data.data_dir = str(tmp_path / "data")
    real = common.make_loader

    class PoisonAt:
        def __init__(self, loader, bad_step):
            self.loader, self.bad_step = loader, bad_step

        def iterate(self, start):
            for step, batch in self.loader.iterate(start):
                if step == self.bad_step:
                    batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
                yield step, batch

    monkeypatch.setattr(common, "make_loader",
                        lambda *a, **k: PoisonAt(real(*a, **k), bad_step=6))
    with pytest.raises(train_loop.NonFiniteLossError, match="step 7"):
        train_loop.train(c, str(tmp_path / "w"))
    assert _finalised_steps(tmp_path / "w") == [4]
    params, _ = checkpoint.load_params(tmp_path / "w")
    assert all(np.isfinite(x).all() for x in checkpoint.flatten_paths(params).values())
