"""A killed run resumes exactly (params and TensorBoard curve); a NaN or overflowing
step is never saved; a typo in a flag fails."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from segjax import checkpoint
from segjax.metrics_writer import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY, LOG_EVERY, EVAL_EVERY = 30, 5, 5, 15


def _cmd(workdir, data_dir, steps=STEPS, extra=()):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config",
            os.path.join(ROOT, "configs/mae/digits.py") + ":runlocal", "--workdir", str(workdir),
            f"--config.total_steps={steps}", "--config.batch_size=16",
            f"--config.eval_every={EVAL_EVERY}", "--config.eval_batch_size=100",
            f"--config.checkpoint.save_every={SAVE_EVERY}", "--config.checkpoint.keep=2",
            f"--config.data.data_dir={data_dir}", f"--config.log_every={LOG_EVERY}", *extra]


def _env(**extra):
    # one device per process: the test is about resumption, not sharding
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu", **extra}


def _finalised_steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.exists(os.path.join(root, d, "_CHECKPOINT_METADATA")))


def _writing(workdir):
    """Whether a checkpoint is being written (Orbax's temporary directory exists)."""
    root = os.path.join(workdir, "checkpoints")
    return os.path.isdir(root) and any("tmp" in d for d in os.listdir(root))


# train.py that SIGKILLs itself inside the eval of step KILL_IN_EVAL: after that step's
# checkpoint is finalised if the loop saved it before the eval (waits up to 3 s for it),
# as a kill during a long eval would.
_KILL_IN_EVAL = """
import os, runpy, signal, sys, time
from segjax.tasks import mae
kill_at, workdir = int(os.environ["KILL_IN_EVAL"]), os.environ["KILL_WORKDIR"]
evaluate = mae.evaluate
def evaluate_then_die(trainer, params, wd, step, writer):
    if step == kill_at:
        deadline = time.time() + 3
        while time.time() < deadline and not os.path.exists(
                os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(trainer, params, wd, step, writer)
mae.evaluate = evaluate_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _kill_while_writing(cmd, work, rng):
    """Starts `cmd`; SIGKILLs it a random 0-20 ms after the checkpoint of step 10 starts
    being written (Orbax's temporary directory appears), or right after it is finalised
    if the write was too quick to catch."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read()[-2000:]
            done = _finalised_steps(work)
            if done and (_writing(work) or done[-1] >= 2 * SAVE_EVERY):
                time.sleep(rng.uniform(0, 0.02))
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, possibly mid-save
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr.close()


def test_sigkill_then_resume_gives_identical_params_and_curve(tmp_path):
    """Three runs on one workdir: killed while a checkpoint is written, killed inside an
    eval, then to the end. Final params are bit-identical to an uninterrupted run's, and
    the TensorBoard curve has every logged step once, with the same values."""
    data_dir = tmp_path / "data"
    ref = subprocess.run(_cmd(tmp_path / "ref", data_dir), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = tmp_path / "killed"
    _kill_while_writing(_cmd(work, data_dir), work, random.Random())
    first_kill = max(_finalised_steps(work), default=0)
    assert first_kill < EVAL_EVERY, first_kill
    killed = subprocess.run([sys.executable, "-c", _KILL_IN_EVAL, *_cmd(work, data_dir)[1:]],
                            env=_env(KILL_IN_EVAL=str(EVAL_EVERY), KILL_WORKDIR=str(work)),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "resumed from" in killed.stderr or first_kill == 0

    resumed = subprocess.run(_cmd(work, data_dir), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, meta_a = checkpoint.load_params(tmp_path / "ref")
    b, meta_b = checkpoint.load_params(work)
    assert meta_a["step"] == meta_b["step"] == STEPS
    for (path, x), y in zip(checkpoint.flatten_paths(a).items(), checkpoint.flatten_paths(b).values()):
        np.testing.assert_array_equal(x, y, err_msg=path)  # bit-identical

    # TensorBoard as it shows the curve: every logged step once, values as uninterrupted
    want, got = read_scalars(tmp_path / "ref" / "tensorboard"), read_scalars(work / "tensorboard")
    assert [s for s, _ in want["train/loss"]] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [s for s, _ in want["eval/loss"]] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for tag in ("train/loss", "train/grad_norm", "train/lr", "eval/loss"):
        assert got[tag] == want[tag], tag



@pytest.mark.slow
def test_many_random_kills_resume_exactly(tmp_path):
    """Six SIGKILLs, each a random 0-20 ms after a checkpoint write starts or at a random
    time, then a run to the end: the same params and curve as without kills."""
    data_dir = tmp_path / "data"
    ref = subprocess.run(_cmd(tmp_path / "ref", data_dir), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    work, rng = tmp_path / "killed", random.Random()
    for i in range(6):
        before = max(_finalised_steps(work), default=0)
        if before >= STEPS - SAVE_EVERY:
            break
        proc = subprocess.Popen(_cmd(work, data_dir), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + (rng.uniform(3, 15) if i % 2 else 600)
        while proc.poll() is None and time.time() < deadline:
            done = _finalised_steps(work)
            if i % 2 == 0 and done and done[-1] > before and _writing(work):
                time.sleep(rng.uniform(0, 0.02))
                break
            time.sleep(0.002)
        proc.kill()
        proc.wait(timeout=60)
    resumed = subprocess.run(_cmd(work, data_dir), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, _ = checkpoint.load_params(tmp_path / "ref")
    b, meta = checkpoint.load_params(work)
    assert meta["step"] == STEPS
    for (path, x), y in zip(checkpoint.flatten_paths(a).items(), checkpoint.flatten_paths(b).values()):
        np.testing.assert_array_equal(x, y, err_msg=path)
    want, got = read_scalars(tmp_path / "ref" / "tensorboard"), read_scalars(work / "tensorboard")
    for tag in ("train/loss", "train/grad_norm", "train/lr", "eval/loss"):
        assert got[tag] == want[tag], tag

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


def test_overflowing_update_stops_before_saving(tmp_path):
    """lr 1e40 * 16 / 256 overflows float32: the loss and gradient of step 1 are finite,
    its update is not. Nothing non-finite is saved."""
    from configs.mae import digits
    from segjax import train_loop

    c = digits.get_config("runlocal")
    c.unlock()
    c.batch_size, c.total_steps, c.eval_every, c.log_every = 16, 3, 0, 1
    c.optim.base_lr, c.optim.warmup_steps = 1e40, 0
    c.checkpoint.save_every, c.checkpoint.async_save = 1, False
    c.data.data_dir = str(tmp_path / "data")
    with pytest.raises(train_loop.NonFiniteLossError, match=r"non-finite update at step 1 .*NOT finite"):
        train_loop.train(c, str(tmp_path / "w"))
    assert _finalised_steps(tmp_path / "w") == []
