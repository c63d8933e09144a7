"""Loader / EvalLoader: determinism, resumption, epochs, multi-process slices, padding."""

import io

import numpy as np
import pytest
from PIL import Image

from segjax.data.pipeline import EvalLoader, Loader
from segjax.data.preprocess import ImagePreprocess
from segjax.data.source import make_source

N = 40


def _source(n: int = N) -> list[dict]:
    """n records; record i has label i and a random 8x8 grey image (PNG bytes)."""
    rng = np.random.default_rng(123)
    records = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buffer, format="png")
        records.append({"image": buffer.getvalue(), "label": i})
    return records


# Augmentation on, so the per-example rng is covered by the determinism checks.
AUGMENT = ImagePreprocess(image_size=8, random_resized_crop_scale=(0.3, 1.0), hflip=True)


def _loader(**kwargs) -> Loader:
    kwargs = {"global_batch_size": 8, "seed": 0, **kwargs}
    return Loader(_source(), AUGMENT, **kwargs)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _loader(), _loader()
    batch = a.get_batch(7)
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    _assert_batches_equal(batch, b.get_batch(7))
    _assert_batches_equal(batch, a.get_batch(7))  # re-reading, after other steps too
    assert not np.array_equal(batch["label"], a.get_batch(8)["label"])
    other_seed = _loader(seed=1).get_batch(7)
    assert not np.array_equal(batch["image"], other_seed["image"])


def test_epochs_are_permutations_and_reshuffle():
    loader = _loader()
    steps_per_epoch = N // 8
    epochs = [
        np.concatenate([loader.get_batch(e * steps_per_epoch + s)["label"] for s in range(steps_per_epoch)])
        for e in range(3)]
    for labels in epochs:
        np.testing.assert_array_equal(np.sort(labels), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(N))
    assert loader.epoch(steps_per_epoch - 1) == 0 and loader.epoch(steps_per_epoch) == 1


def test_same_record_gets_different_augmentation_each_epoch():
    loader = Loader(_source(), AUGMENT, global_batch_size=N, seed=0)
    a, b = loader.get_batch(0), loader.get_batch(1)  # one whole epoch each
    ia, ib = np.argsort(a["label"]), np.argsort(b["label"])
    assert not np.array_equal(a["image"][ia], b["image"][ib])


def test_process_slices_concatenate_to_the_global_batch():
    global_batch = _loader(global_batch_size=12).get_batch(5)
    slices = [_loader(global_batch_size=12, process_index=p, process_count=4).get_batch(5) for p in range(4)]
    assert all(s["image"].shape[0] == 3 for s in slices)
    _assert_batches_equal(global_batch, {k: np.concatenate([s[k] for s in slices]) for k in global_batch})


def test_bad_process_arguments():
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        _loader(global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        _loader(process_index=2, process_count=2)
    with pytest.raises(IndexError):
        _loader().get_batch(-1)


def test_iterate_resumes_at_any_step():
    loader = _loader()
    it = loader.iterate(start_step=4)
    got = [next(it) for _ in range(3)]
    it.close()
    assert [s for s, _ in got] == [4, 5, 6]
    fresh = _loader()  # as after a restart from the checkpoint {"step": 4}
    for step, batch in got:
        _assert_batches_equal(batch, fresh.get_batch(step))


def test_eval_pads_last_batch_with_valid_mask():
    source = _source(10)
    loader = EvalLoader(source, ImagePreprocess(image_size=4), global_batch_size=4)
    batches = list(loader)
    assert len(loader) == loader.num_steps == len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 4, 4, 3) and b["valid"].shape == (4,) and b["valid"].dtype == bool
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
    np.testing.assert_array_equal(labels[:10], np.arange(10))  # in order, each once
    # Processes split each global batch into consecutive rows.
    parts = [EvalLoader(source, ImagePreprocess(image_size=4), global_batch_size=4, process_index=p,
                        process_count=2).get_batch(2) for p in range(2)]
    _assert_batches_equal(batches[2], {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    with pytest.raises(IndexError):
        loader.get_batch(3)


def test_corrupt_record_keeps_batch_shapes_and_is_counted():
    source = _source()
    source[11]["image"] = b"corrupt"
    loader = Loader(source, AUGMENT, global_batch_size=8, seed=0)
    labels = np.concatenate([loader.get_batch(s)["label"] for s in range(N // 8)])
    assert loader.num_corrupt == 1
    assert 11 not in labels and np.sum(labels == 12) == 2  # record 12 stands in for 11
    eval_loader = EvalLoader(source, ImagePreprocess(image_size=8), global_batch_size=16)
    assert all(b["image"].shape == (16, 8, 8, 3) for b in eval_loader)
    assert eval_loader.num_corrupt == 1


def test_digits_end_to_end(digits_dir):
    pre = ImagePreprocess(image_size=16, random_resized_crop_scale=(0.5, 1.0))
    loader = Loader(make_source("digits", "train", digits_dir), pre, global_batch_size=32, seed=0)
    step, batch = next(loader.iterate(100))
    assert step == 100 and batch["image"].shape == (32, 16, 16, 3)
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    assert loader.epoch(100) == 100 * 32 // 1497
    eval_loader = EvalLoader(make_source("digits", "test", digits_dir), ImagePreprocess(image_size=16),
                             global_batch_size=64)
    assert eval_loader.num_steps == 5
    assert sum(int(b["valid"].sum()) for b in eval_loader) == 300
