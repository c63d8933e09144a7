"""The `digits` tfds builder: prepared as ArrayRecord and read back without TensorFlow."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from segjax.data import digits as digits_lib
from segjax.data.decode import decode_image
from segjax.data.source import make_source
from segjax.data.tfds_builder import file_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _records(data_dir, split):
    """All (image bytes, label) of a split, as a sorted list."""
    src = make_source("digits", split, data_dir)
    return sorted((decode_image(r["image"]).tobytes(), int(r["label"])) for r in src)


def test_counts_shapes_labels_without_tensorflow(digits_dir):
    train = make_source("digits", "train", digits_dir)
    test = make_source("digits", "test", digits_dir)
    assert (len(train), len(test)) == (1497, 300)
    for src in (train, test):
        labels = np.array([int(src[i]["label"]) for i in range(len(src))])
        assert labels.min() == 0 and labels.max() == 9
        assert len(np.unique(labels)) == 10
        image = decode_image(src[0]["image"])
        assert image.shape == (8, 8, 1) and image.dtype == np.uint8
    # The records were written and read by tfds without TensorFlow.
    assert "tensorflow" not in sys.modules


def test_content_matches_sklearn_and_split(digits_dir):
    data = load_digits()
    images = digits_lib.to_uint8(data.images)[..., None]  # (1797, 8, 8, 1)
    train_idx, test_idx = digits_lib.stratified_split(data.target, 300, digits_lib.SPLIT_SEED)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        expected = sorted((images[i].tobytes(), int(data.target[i])) for i in idx)
        assert _records(digits_dir, split) == expected


def test_to_uint8_rescale():
    np.testing.assert_array_equal(
        digits_lib.to_uint8(np.array([0, 1, 8, 15, 16])), [0, 16, 128, 239, 255])


def test_stratified_split_is_deterministic_and_stratified():
    labels = load_digits().target
    train, test = digits_lib.stratified_split(labels, 300, seed=0)
    train2, test2 = digits_lib.stratified_split(labels, 300, seed=0)
    np.testing.assert_array_equal(test, test2)
    np.testing.assert_array_equal(train, train2)
    assert len(test) == 300 and len(train) == 1497
    assert len(np.union1d(train, test)) == 1797
    # Each class's test share is its proportional quota, rounded.
    quota = np.bincount(labels) * 300 / 1797
    assert np.all(np.abs(np.bincount(labels[test], minlength=10) - quota) < 1)
    _, other_seed = digits_lib.stratified_split(labels, 300, seed=1)
    assert not np.array_equal(test, other_seed)


def test_prepare_is_idempotent(digits_dir):
    files = sorted(os.listdir(os.path.join(digits_dir, "digits", "1.0.0")))
    mtimes = [os.stat(os.path.join(digits_dir, "digits", "1.0.0", f)).st_mtime_ns for f in files]
    t0 = time.perf_counter()
    digits_lib.prepare_digits(digits_dir)
    assert time.perf_counter() - t0 < 2.0
    assert sorted(os.listdir(os.path.join(digits_dir, "digits", "1.0.0"))) == files
    assert [os.stat(os.path.join(digits_dir, "digits", "1.0.0", f)).st_mtime_ns for f in files] == mtimes


def test_prepare_waits_for_the_lock(tmp_path):
    data_dir = str(tmp_path)
    done = threading.Event()
    with file_lock(os.path.join(data_dir, ".digits.lock")):
        worker = threading.Thread(target=lambda: (digits_lib.prepare_digits(data_dir), done.set()))
        worker.start()
        time.sleep(1.0)
        # Blocked on the lock another "host" holds: nothing written yet.
        assert not done.is_set() and os.listdir(data_dir) == [".digits.lock"]
    worker.join(timeout=60)
    assert done.is_set()
    assert len(make_source("digits", "test", data_dir)) == 300


@pytest.mark.slow  # ~10 s: two fresh interpreters import tfds, grain and sklearn.
def test_two_processes_prepare_concurrently(tmp_path):
    script = (
        "import sys; from segjax.data.source import make_source; "
        "print(len(make_source('digits', 'train', sys.argv[1])))")
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "1497"
    # No temporary build directory left behind.
    assert os.listdir(tmp_path / "digits") == ["1.0.0"]


def test_missing_dataset_error_names_dataset_and_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'no_such_dataset_xyz'.*" + str(tmp_path)):
        make_source("no_such_dataset_xyz", "train", tmp_path)
    # Known to tfds, but not prepared here.
    with pytest.raises(FileNotFoundError, match=r"'mnist'.*not prepared.*" + str(tmp_path)):
        make_source("mnist", "train", tmp_path)


@pytest.mark.parametrize("module, cls, config", [("digits", "Digits", None),
                                                ("coco", "CocoFormat", "CocoFormatConfig"),
                                                ("sa1b", "Sa1bFormat", "Sa1bFormatConfig")])
def test_builders_leave_no_temporary_directory(tmp_path, monkeypatch, module, cls, config):
    """Constructing a segjax builder for a dataset not prepared yet creates nothing in the
    system's temporary directory (tfds's GCS lookup made an empty `tmp*tfds` per builder)."""
    import importlib
    import tempfile

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    mod = importlib.import_module(f"segjax.data.{module}")
    kwargs = {"config": getattr(mod, config)(name="leak_check")} if config else {}
    builder = getattr(mod, cls)(data_dir=str(tmp_path / "data"), **kwargs)
    assert not builder.is_prepared()
    assert os.listdir(temp_root) == []
