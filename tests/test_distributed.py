"""Two hosts: `train.py` in two processes joined by `jax.distributed` (gloo on CPU, 2
devices each, 4 global) trains one MAE run into one shared workdir, saves one
checkpoint, resumes from it in both processes, and ends with the params of a
single-process run on 4 devices.

The global batch of step s is the same in both set-ups by construction (process p
loads rows [p*B, (p+1)*B) of it), so only the cross-device reduction differs.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import portpicker

from segjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEPS, TOTAL_STEPS, LR = 2, 3, 1e-3
TIMEOUT_S = 420  # per run; a hang (e.g. one process waiting on a dead peer) fails, never blocks


def _cmd(workdir, data_dir, steps, *extra):
    # A constant schedule: the resumed run (larger total_steps) then follows exactly the
    # lr sequence of the reference, which runs straight to TOTAL_STEPS. It also keeps
    # the jitted step identical across the two runs, so the second one loads it from the
    # persistent compilation cache.
    return [sys.executable, os.path.join(ROOT, "train.py"),
            "--config", os.path.join(ROOT, "configs/mae/digits.py") + ":runlocal",
            "--workdir", str(workdir), f"--config.total_steps={steps}",
            "--config.batch_size=16", "--config.eval_every=0", "--config.log_every=1",
            f"--config.checkpoint.save_every={FIRST_STEPS}", "--config.checkpoint.keep=5",
            f"--config.optim.lr={LR}", "--config.optim.warmup_steps=0",
            "--config.optim.schedule=constant", f"--config.data.data_dir={data_dir}", *extra]


def _env(num_devices, cache_dir):
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()}


class _Runs:
    """Subprocesses with their output in log files; `wait` kills all of them on any
    failure or timeout (a peer of a crashed process would otherwise wait on it)."""

    def __init__(self, log_dir):
        self.log_dir, self.procs = log_dir, {}

    def start(self, name, cmd, env):
        log = open(os.path.join(self.log_dir, f"{name}.log"), "w")
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


def test_two_processes_train_save_resume_match_single_process(tmp_path):
    data_dir, cache = tmp_path / "data", tmp_path / "jax_cache"
    multi = tmp_path / "multi"
    runs = _Runs(tmp_path)
    try:
        first = _start_pair(runs, "first", _cmd(multi, data_dir, FIRST_STEPS), _env(2, cache))
        # The reference is computed while the two processes run (this process waits on
        # them anyway); all three prepare `digits` in one data_dir at once (the lock's job).
        ref = _single_process_params(data_dir)
        out = runs.wait(first)
        assert "process 1/2, 2 local / 4 global devices" in out["first1"], out["first1"][-3000:]
        assert _steps(multi) == [FIRST_STEPS]  # one checkpoint, written by both processes
        shutil.copytree(multi, tmp_path / "multi_at_first")

        out = runs.wait(_start_pair(runs, "resumed", _cmd(multi, data_dir, TOTAL_STEPS),
                                    _env(2, cache)))
        for name, text in out.items():
            assert re.search(rf"resumed from \S+ step {FIRST_STEPS}\b", text), (name, text[-3000:])
        # global metrics (replicated arrays) agree on both hosts
        assert _final_line(out["resumed0"]) == _final_line(out["resumed1"])
        assert _steps(multi) == [FIRST_STEPS, TOTAL_STEPS]
    finally:
        runs.kill_all()

    got, meta = checkpoint.load_params(multi)
    assert meta["step"] == TOTAL_STEPS
    got = checkpoint.flatten_paths(got)
    at_first = checkpoint.flatten_paths(checkpoint.load_params(tmp_path / "multi_at_first")[0])
    assert got.keys() == ref.keys() == at_first.keys()
    # the resumed run trained (Adam moves every unfrozen param by about lr per step), so
    # the comparison below is between trained params, not between two restored copies
    assert np.abs(got["blocks_0/attn/qkv/kernel"] - at_first["blocks_0/attn/qkv/kernel"]).max() > LR / 2
    # Tolerance: same program and data on a 4-device mesh; only the all-reduce differs
    # (gloo across processes vs in-process), so fp32 rounding of the gradient sums. Adam
    # divides by sqrt(v), which turns relative gradient rounding into update differences
    # of that relative size times lr (1e-3): rtol 1e-4, atol 1e-5 (1% of one step). The
    # attention key bias has a mathematically zero gradient, so Adam normalises pure
    # rounding noise there into steps of up to lr: 3 * lr for it.
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
    print("max |two processes - one process|, worst:", sorted(diffs.items(), key=lambda kv: -kv[1])[:4])
