"""Two hosts: `train.py` in two processes joined by `jax.distributed` (gloo on CPU, 2
devices each, 4 global) trains one MAE run into one shared workdir, saves one
checkpoint, resumes from it in both processes and (slow) ends with the params of a
single-process run on 4 devices.

The global batch of step s is the same in both set-ups by construction (process p
loads rows [p*B, (p+1)*B) of it), so only the cross-device reduction differs.
Every subprocess runs under a deadline and all are killed on any failure.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from segjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEPS, TOTAL_STEPS, LR = 2, 3, 1e-3
TIMEOUT_S = 420  # per run; a hang (e.g. one process waiting on a dead peer) fails, never blocks


def _cmd(workdir, data_dir, steps, *extra):
    # A constant schedule: the resumed run (larger total_steps) then follows exactly the
    # lr sequence of the reference, which runs straight to TOTAL_STEPS, and its jitted
    # step is the first run's (a persistent compilation cache hit on process 0).
    return [sys.executable, os.path.join(ROOT, "train.py"),
            "--config", os.path.join(ROOT, "configs/mae/digits.py") + ":runlocal",
            "--workdir", str(workdir), f"--config.total_steps={steps}",
            "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1",
            f"--config.checkpoint.save_every={FIRST_STEPS}", "--config.checkpoint.keep=5",
            f"--config.optim.lr={LR}", "--config.optim.warmup_steps=0",
            "--config.optim.schedule=constant", f"--config.data.data_dir={data_dir}", *extra]


def _env(num_devices):
    # conftest's persistent compilation cache (JAX_COMPILATION_CACHE_DIR) is inherited
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()}


class _Runs:
    """Subprocesses with their output in log files; `wait` kills all of them on any
    failure or timeout (a peer of a crashed process would otherwise wait on it)."""

    def __init__(self, log_dir):
        self.log_dir, self.procs = log_dir, {}

    def start(self, name, cmd, env):
        # open for the child's lifetime; closed in kill_all
        log = open(os.path.join(self.log_dir, f"{name}.log"), "w")  # noqa: SIM115
        self.procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=ROOT), log)

    def output(self, name):
        with open(os.path.join(self.log_dir, f"{name}.log")) as f:
            return f.read()

    def report(self, names):
        return "\n".join(f"===== {n} (rc={self.procs[n][0].returncode}), last lines:\n"
                         f"{self.output(n)[-4000:]}" for n in names)

    def wait(self, names, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        crashed_at = {}
        try:
            while True:
                codes = [self.procs[n][0].poll() for n in names]
                if all(c == 0 for c in codes):
                    return {n: self.output(n) for n in names}
                if any(c not in (None, 0) for c in codes):
                    raise AssertionError("a process failed:\n" + self.report(names))
                # A process that raised stays alive in jax.distributed's shutdown barrier
                # (5 min) while its peer waits on it: fail 30 s after the traceback.
                for n in names:
                    if n not in crashed_at and "Traceback (most recent call last)" in self.output(n):
                        crashed_at[n] = time.monotonic()
                if crashed_at and time.monotonic() > min(crashed_at.values()) + 30:
                    raise AssertionError(f"{sorted(crashed_at)} raised:\n" + self.report(names))
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout}s:\n" + self.report(names))
                time.sleep(0.2)
        except BaseException:
            self.kill_all()
            raise

    def kill_all(self):
        for proc, log in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            log.close()


def _start_pair(runs, name, cmd, env):
    port = portpicker.pick_unused_port()
    for i in range(2):
        runs.start(f"{name}{i}", cmd + [f"--coordinator_address=127.0.0.1:{port}",
                                        "--num_processes=2", f"--process_id={i}"], env)
    return [f"{name}{i}" for i in range(2)]


def _steps(workdir):
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root)
                  if d.isdigit() and os.path.exists(os.path.join(root, d, "_CHECKPOINT_METADATA")))


def _final_line(out):
    return [ln for ln in out.splitlines() if ln.startswith("final:")][-1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Two processes train FIRST_STEPS (one checkpoint), then the same command with
    TOTAL_STEPS resumes from it. Returns the tmp dir and each process's output."""
    tmp = tmp_path_factory.mktemp("distributed")
    data_dir = tmp / "data"
    # In the resumed run process 0 loads the train step from the persistent compilation
    # cache while process 1 compiles it (JAX writes the cache from process 0 only), so
    # the processes reach the first collective a compile apart.
    env = _env(2)
    runs = _Runs(tmp)
    try:
        # Both processes prepare `digits` in the empty data_dir at once (the lock's job).
        first = runs.wait(_start_pair(runs, "first", _cmd(tmp / "multi", data_dir, FIRST_STEPS), env))
        steps_after_first = _steps(tmp / "multi")
        shutil.copytree(tmp / "multi", tmp / "multi_at_first")
        resumed = runs.wait(_start_pair(runs, "resumed", _cmd(tmp / "multi", data_dir, TOTAL_STEPS), env))
    finally:
        runs.kill_all()
    return {"tmp": tmp, "first": first, "resumed": resumed, "steps_after_first": steps_after_first}


def test_two_processes_train_save_and_resume(two_process_run):
    r = two_process_run
    assert "process 1/2, 2 local / 4 global devices" in r["first"]["first1"], r["first"]["first1"][-3000:]
    assert r["steps_after_first"] == [FIRST_STEPS]  # one checkpoint, written by both processes
    for name, text in r["resumed"].items():  # both processes restored it
        assert re.search(rf"resumed from \S+ step {FIRST_STEPS}\b", text), (name, text[-3000:])
    # global metrics (replicated arrays) agree on both hosts
    assert _final_line(r["resumed"]["resumed0"]) == _final_line(r["resumed"]["resumed1"])
    assert _steps(r["tmp"] / "multi") == [FIRST_STEPS, TOTAL_STEPS]
    params, meta = checkpoint.load_params(r["tmp"] / "multi")
    assert meta["step"] == TOTAL_STEPS
    before, _ = checkpoint.load_params(r["tmp"] / "multi_at_first")
    # the resumed run trained: Adam moves every unfrozen param by about lr per step
    moved = np.abs(params["blocks_0"]["attn"]["qkv"]["kernel"] - before["blocks_0"]["attn"]["qkv"]["kernel"])
    assert moved.max() > LR / 2


def _single_process_params(data_dir):
    """Params after TOTAL_STEPS of the same config in this process, on 4 of its devices,
    through the loop's own pieces (loader, Trainer, train_step)."""
    import jax

    from configs.mae import digits
    from segjax import sharding, train_loop

    c = digits.get_config("runlocal")
    c.unlock()
    c.total_steps, c.batch_size = TOTAL_STEPS, 16
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = LR, 0, "constant"
    c.data.data_dir = str(data_dir)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 1}, devices=jax.devices()[:4])
    trainer = train_loop.Trainer(c, mesh=mesh)
    loader = trainer.task.make_loader(c, "train", 0, 1)
    state = trainer.init_state()
    for step in range(TOTAL_STEPS):
        with trainer.mesh:
            state, _ = trainer.train_step(state, trainer.put_batch(loader.get_batch(step)))
    return checkpoint.flatten_paths(jax.device_get(state["params"]))


def _assert_close(got, ref):
    """Asserts two flat param dicts match; returns the max abs difference per leaf.

    Tolerance: same program and data on a 4-device mesh; only the order of the fp32
    gradient sums may differ (gloo across processes vs in-process, or arrival order).
    Adam divides by sqrt(v), which turns relative gradient rounding into update
    differences of that relative size times lr (1e-3): rtol 1e-4, atol 1e-5 (1% of one
    step). The attention key bias has a mathematically zero gradient, so Adam
    normalises pure rounding noise there into steps of up to lr: 3 * lr for it.
    """
    diffs = {}
    for path, x in got.items():
        y = ref[path]
        if path.endswith("qkv/bias"):
            d = x.shape[0] // 3
            np.testing.assert_allclose(x[d:2 * d], y[d:2 * d], atol=3 * LR, err_msg=path)
            diffs[path + "[key]"] = float(np.abs(x[d:2 * d] - y[d:2 * d]).max())
            x, y = np.concatenate([x[:d], x[2 * d:]]), np.concatenate([y[:d], y[2 * d:]])
        diffs[path] = float(np.abs(x - y).max())
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=path)
    return diffs


@pytest.mark.slow
def test_two_processes_match_single_process(two_process_run):
    got, _ = checkpoint.load_params(two_process_run["tmp"] / "multi")
    got = checkpoint.flatten_paths(got)
    ref = _single_process_params(two_process_run["tmp"] / "data")
    assert got.keys() == ref.keys()
    diffs = _assert_close(got, ref)
    worst = sorted(diffs.items(), key=lambda kv: -kv[1])
    print("max |two processes - one process|: key biases", [kv for kv in worst if "[key]" in kv[0]][:2],
          "others", [kv for kv in worst if "[key]" not in kv[0]][:3])


# train.py with process 1 held back after restoring, so its first train step (the
# first collective over all devices) starts DELAY_S after process 0's.
_LATE_DRIVER = """
import os, runpy, sys, time
import jax
from segjax import train_loop
restore = train_loop.restore_or_init
def restore_then_wait(*args):
    out = restore(*args)
    if jax.process_index() == 1:
        time.sleep(float(os.environ["DELAY_S"]))
    return out
train_loop.restore_or_init = restore_then_wait
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_process_arriving_45s_late_at_first_collective(two_process_run, tmp_path):
    # gloo gives up on a peer 30 s late when it first connects a set of devices; a
    # compile-time skew that large is common on a loaded host. runtime.setup connects
    # all devices up front, so the first train step waits for the late process instead.
    tmp = two_process_run["tmp"]
    shutil.copytree(tmp / "multi_at_first", tmp_path / "multi")
    cmd = _cmd(tmp_path / "multi", tmp / "data", TOTAL_STEPS)
    cmd = [sys.executable, "-c", _LATE_DRIVER, *cmd[1:]]
    runs = _Runs(tmp_path)
    try:
        out = runs.wait(_start_pair(runs, "late", cmd, {**_env(2), "DELAY_S": "45"}))
    finally:
        runs.kill_all()
    for name, text in out.items():
        assert re.search(rf"resumed from \S+ step {FIRST_STEPS}\b", text), (name, text[-3000:])
    # the same run as the on-time one, up to the order of the gradient sums
    late, _ = checkpoint.load_params(tmp_path / "multi")
    on_time, _ = checkpoint.load_params(tmp / "multi")
    _assert_close(checkpoint.flatten_paths(late), checkpoint.flatten_paths(on_time))
