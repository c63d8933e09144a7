"""A run that cannot go on stops with one clear line and never destroys work.

Restarting with another config, a corrupt newest checkpoint, an eval lost after its
checkpoint, a second writer, an invalid config, all-corrupt checkpoints under eval.py,
a checkpoint of another architecture, a full disk and a read-only workdir. (Kills at
random moments: tests/test_resume.py.)
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs.mae import digits
from segjax import checkpoint, runtime, train_loop
from segjax.metrics_writer import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVE_EVERY = 4, 2
_FLAGS = {"total_steps": STEPS, "batch_size": 16, "eval_batch_size": 64, "log_every": 1,
          "eval_every": STEPS, "checkpoint.save_every": SAVE_EVERY, "checkpoint.keep": 3}


def _config(data_dir, **overrides):
    c = digits.get_config("runlocal")
    c.unlock()
    for key, value in {**_FLAGS, "data.data_dir": str(data_dir), **overrides}.items():
        node, *path = key.split(".")
        target = c
        for part in [node, *path][:-1]:
            target = target[part]
        target[key.split(".")[-1]] = value
    return c


def _cmd(script, workdir, data_dir, config="configs/mae/digits.py:runlocal", flags=_FLAGS):
    return [sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, config),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in flags.items())]


def _run(cmd, **kw):
    # the test process's environment: 8 CPU devices and the persistent compilation
    # cache, so the subprocess reuses the programs the in-process run compiled
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """MAE digits, 4 steps: checkpoints 2 and 4, an eval at 4. Tests copy the workdir."""
    tmp = tmp_path_factory.mktemp("reliability")
    train_loop.train(_config(tmp / "data"), str(tmp / "w"))
    return tmp


@pytest.fixture
def workdir(mae_run, tmp_path):
    shutil.copytree(mae_run / "w", tmp_path / "w")
    return tmp_path / "w"


def _files(root):
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)),
                   os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(root) for f in fs)


def _truncate(step_dir, data_only=False):
    """Truncates the files of a checkpoint item: all, or only the array data (the
    metadata then still reads)."""
    for dirpath, _, files in os.walk(step_dir):
        if data_only and os.path.basename(dirpath) != "d":
            continue
        for f in files:
            with open(os.path.join(dirpath, f), "r+b") as fh:
                fh.truncate(1)


def _assert_one_clear_error(result, *needles):
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # nothing but that line at ERROR level (absl's "E..." lines, Python's "ERROR:")
    noisy = [ln for ln in result.stderr.splitlines() if ln.startswith(("E0", "E1", "ERROR"))]
    assert not noisy, noisy[:5]
    return errors[0]


# -- restarting with another config (item 4) ----------------------------------------------
@pytest.mark.parametrize("change", [{"model.kwargs": {"img_size": 32, "patch_size": 8,
                                                      "norm_pix_loss": True, "mask_ratio": 0.75}},
                                    {"optim.name": "sgd"}], ids=["patch_size", "optimizer"])
def test_restart_with_another_config_stops_and_keeps_checkpoints(mae_run, workdir, change):
    before = _files(workdir / "checkpoints")
    with pytest.raises(RuntimeError) as err:
        train_loop.train(_config(mae_run / "data", **change), str(workdir))
    assert type(err.value).__name__ == "ConfigMismatchError"
    text = str(err.value)
    assert f"checkpoint step {STEPS} in {workdir / 'checkpoints'}" in text
    if "model.kwargs" in change:
        assert "params/patch_embed/proj/kernel: checkpoint (4, 4, 3, 64) float32 vs config (8, 8, 3, 64)" in text
    else:
        assert "opt_state/0/0/mu/" in text or "opt_state/" in text, text
        assert "not in the config" in text and "not in the checkpoint" in text
    assert _files(workdir / "checkpoints") == before  # nothing deleted, moved or written
    assert not os.path.exists(workdir / "LOCK")


# -- a corrupt newest checkpoint is moved aside and written again (item 6) ----------------
def test_corrupt_newest_checkpoint_is_moved_aside_and_written_again(mae_run, workdir):
    original, _ = checkpoint.load_params(workdir)
    evals_before = read_scalars(str(workdir / "tensorboard"))["eval/loss"]
    _truncate(workdir / "checkpoints" / str(STEPS) / "params", data_only=True)
    train_loop.train(_config(mae_run / "data"), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "4.corrupt"]
    again, meta = checkpoint.load_params(workdir)
    assert meta["step"] == STEPS
    for path, x in checkpoint.flatten_paths(original).items():
        np.testing.assert_array_equal(checkpoint.flatten_paths(again)[path], x, err_msg=path)
    # steps 3-4 were logged again; TensorBoard shows each step once
    scalars = read_scalars(str(workdir / "tensorboard"))
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert scalars["eval/loss"] == evals_before


# -- an eval lost after its checkpoint is run again (item 7) ------------------------------
def test_eval_missing_after_its_checkpoint_is_redone(mae_run, workdir):
    expected = read_scalars(str(workdir / "tensorboard"))["eval/loss"]
    assert [s for s, _ in expected] == [STEPS]
    # what a kill right after checkpoint 4 leaves when the eval of step 4 had not
    # written anything yet
    shutil.rmtree(workdir / "tensorboard")
    shutil.rmtree(workdir / "evals_done", ignore_errors=True)
    train_loop.train(_config(mae_run / "data"), str(workdir))
    assert read_scalars(str(workdir / "tensorboard")).get("eval/loss") == expected
    assert os.path.exists(workdir / "evals_done" / f"step_{STEPS:09d}")


# -- one writer per workdir (item 5) ------------------------------------------------------
def test_second_writer_is_refused(tmp_path):
    import json
    import socket

    work = tmp_path / "w"
    os.makedirs(work)
    with open(work / "LOCK", "w") as f:  # a run in progress: this (live) process
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}, f)
    with pytest.raises(RuntimeError, match=rf"in use by a running process \(pid {os.getpid()} on host "):
        train_loop.train(_config(tmp_path / "data"), str(work))
    assert os.listdir(work) == ["LOCK"]  # the holder's lock, nothing else


@pytest.mark.slow
def test_two_train_py_on_one_workdir(mae_run, tmp_path):
    """Two real processes: the second exits naming the first, which finishes."""
    import time

    work = tmp_path / "w"
    cmd = _cmd("train.py", work, mae_run / "data", flags={**_FLAGS, "total_steps": 40})
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while not os.path.exists(work / "LOCK") and time.time() < deadline:
                time.sleep(0.05)
            second = _run(cmd)
            _assert_one_clear_error(second, f"workdir {work} is in use by a running process (pid {first.pid} ")
            assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
    assert checkpoint.load_meta(work)["step"] == 40


def test_workdir_lock_stale_and_foreign_owners(tmp_path):
    import json
    import socket

    lock = runtime.WorkdirLock(str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(lock.path, "w") as f:  # a run killed on this host
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}, f)
    with lock:  # stale: taken over
        with open(lock.path) as f:
            assert json.load(f)["pid"] == os.getpid()
        with pytest.raises(runtime.WorkdirLockedError, match="in use by a running process"):
            runtime.WorkdirLock(str(tmp_path)).acquire()
    assert not os.path.exists(lock.path)
    with open(lock.path, "w") as f:  # another host: cannot be checked, so respected
        json.dump({"host": "elsewhere.example", "pid": os.getpid(), "since": "then"}, f)
    with pytest.raises(runtime.WorkdirLockedError,
                       match=rf"locked by pid {os.getpid()} on host elsewhere.example.*delete {lock.path}"):
        lock.acquire()
    # a recycled pid (another process now) is not the owner
    with open(lock.path, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": 1, "since": "then"}, f)
    with lock:
        pass


# -- invalid configs fail before anything starts (item 8) ---------------------------------
@pytest.mark.parametrize("field,value", [("checkpoint.keep", 0), ("total_steps", 0), ("total_steps", -5),
                                         ("log_every", 0), ("mesh.data", 0), ("optim.name", "adamx"),
                                         ("checkpoint.save_every", 0)])
def test_invalid_config_fails_before_anything(tmp_path, field, value):
    c = _config(tmp_path / "data", **{field: value})
    with pytest.raises(ValueError, match=rf"config\.{field}={value!r}"):  # train_loop.ConfigError
        train_loop.train(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "data")


def test_config_arguments_are_strict(tmp_path):
    from configs.classification import digits_finetune
    from configs.common import parse_arg
    from configs.mae import vit_b16_imagenet
    from configs.maskrcnn import coco_r50_fpn, shapes

    for mod in (digits, shapes, coco_r50_fpn):
        assert mod.get_config("runlocal").total_steps < mod.get_config().total_steps
        assert mod.get_config("runlocal=False").total_steps == mod.get_config().total_steps
        with pytest.raises(ValueError, match="'typo'.*runlocal"):
            mod.get_config("typo")
    assert digits_finetune.get_config("scratch").init_from.path == ""
    assert digits_finetune.get_config("variant=linear_probe").optim.frozen
    with pytest.raises(ValueError, match="variants finetune, scratch, linear_probe"):
        digits_finetune.get_config("scratchh")
    assert vit_b16_imagenet.get_config("l16").model.name == "mae_vit_l16"
    with pytest.raises(ValueError, match="b16, l16, h14"):
        vit_b16_imagenet.get_config("b32")
    arg = parse_arg("res=384,fast,name=x", res=224, fast=False, name="a", scale=1.0)
    assert (arg.res, arg.fast, arg.name, arg.scale, arg.variant) == (384, True, "x", 1.0, None)
    for bad, match in [("res=big", "expected int"), ("fast=maybe", "expected a bool"),
                       ("res=1,res=2", "given twice"), ("other=1", "unknown config argument 'other'")]:
        with pytest.raises(ValueError, match=match):
            parse_arg(bad, res=224, fast=False)
    # through train.py: exit non-zero naming the argument and the choices; nothing runs
    r = _run(_cmd("train.py", tmp_path / "w", tmp_path / "data", config="configs/mae/digits.py:typo",
                  flags={}))
    assert r.returncode != 0 and "unknown config argument 'typo'" in r.stderr and "runlocal" in r.stderr
    assert not os.path.exists(tmp_path / "w")


# -- one clear line from the entry points (item 9) ----------------------------------------
def test_eval_py_on_all_corrupt_checkpoints_is_one_line(mae_run, workdir):
    _truncate(workdir / "checkpoints" / str(STEPS) / "params", data_only=True)
    _truncate(workdir / "checkpoints" / str(SAVE_EVERY) / "params")  # metadata too
    r = _run(_cmd("eval.py", workdir, mae_run / "data", flags={}))
    line = _assert_one_clear_error(r, f"no readable checkpoint in {workdir / 'checkpoints'}",
                                   f"step {STEPS}: ", f"step {SAVE_EVERY}: ")
    assert len(line) < 1000, line


def test_eval_py_on_another_architecture_names_it(mae_run, workdir):
    r = _run(_cmd("eval.py", workdir, mae_run / "data", config="configs/classification/digits_finetune.py:scratch",
                  flags={}))
    _assert_one_clear_error(r, f"checkpoint step {STEPS} in {workdir / 'checkpoints'} holds model "
                               "'mae_vit_tiny', but the config builds 'vit_tiny'")
    # the same registry model with other settings: the leaves that differ are named
    c = _config(mae_run / "data", **{"model.kwargs": {"img_size": 32, "patch_size": 8}})
    with pytest.raises(checkpoint.ConfigMismatchError,
                       match=r"patch_embed/proj/kernel: checkpoint \(4, 4, 3, 64\) float32 vs config \(8, 8, 3, 64\)"):
        train_loop.evaluate_checkpoint(c, str(workdir))


# train.py with a fault injected at the write layer (as root, chmod cannot make a
# directory read-only, and no small filesystem can be mounted to fill up)
_FAULT_DRIVER = """
import errno, os, runpy, sys
fault, root = os.environ["FAULT"], os.path.abspath(os.environ["FAULT_ROOT"])
def under(path):
    path = os.path.abspath(os.fspath(path))
    return path == root or path.startswith(root + os.sep)
if fault == "enospc":  # Orbax's metadata writes (epath) under root fail: disk full
    from etils import epath
    cls = type(epath.Path("/"))
    real = cls.write_text
    def write_text(self, *args, **kwargs):
        if under(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)
    cls.write_text = write_text
else:  # a read-only file system under root
    real_open, real_mkdir = os.open, os.mkdir
    def open_(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)
    def mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)
    os.open, os.mkdir = open_, mkdir
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_train_py_on_full_disk_is_one_line(mae_run, tmp_path):
    work = tmp_path / "w"
    cmd = _cmd("train.py", work, mae_run / "data", flags={**_FLAGS, "eval_every": 0})
    # one device: 8 would add ~150 tiny per-shard compilations to the 2 steps
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    r = _run([sys.executable, "-c", _FAULT_DRIVER, *cmd[1:]],
             env={**os.environ, "FAULT": "enospc", "FAULT_ROOT": str(work / "checkpoints"),
                  "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=1".strip()})
    _assert_one_clear_error(r, f"cannot write checkpoint step {SAVE_EVERY} to {work / 'checkpoints'}",
                            "no space left on device")
    assert not os.path.exists(work / "LOCK")


def test_train_py_on_read_only_workdir_is_one_line(workdir, mae_run):
    before = _files(workdir)
    cmd = _cmd("train.py", workdir, mae_run / "data", flags={**_FLAGS, "total_steps": 6})
    r = _run([sys.executable, "-c", _FAULT_DRIVER, *cmd[1:]],
             env={**os.environ, "FAULT": "erofs", "FAULT_ROOT": str(workdir)})
    _assert_one_clear_error(r, f"workdir {workdir} is not writable", "Read-only file system")
    assert _files(workdir) == before
