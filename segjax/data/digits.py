"""`digits`: scikit-learn's handwritten digits as a tensorflow-datasets builder.

1797 greyscale 8x8 images of the digits 0-9 (the UCI "optdigits" test set, shipped
inside scikit-learn, so it needs no download). It is the offline stand-in for an
image-classification dataset in tests, smoke runs and tiny MAE pre-training.

Features: `image` (8, 8, 1) uint8, the 0..16 counts rescaled by round(v * 255 / 16);
`label` ClassLabel(10). Splits: `train` 1497 and `test` 300 examples, stratified by
class with a fixed seed (`SPLIT_SEED`), so every machine builds identical splits.

The builder yields PNG bytes (encoded with PIL) instead of numpy arrays because
tfds encodes numpy images with TensorFlow, which this project does not install.
It is written as ArrayRecord and read back with `tfds.data_source`, also without
TensorFlow. `prepare_digits` is the one entry point that writes it: idempotent and
safe when several processes (hosts) call it at once.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data.tfds_builder import LocalBuilder, LocalDatasetInfo, prepare_once

NUM_CLASSES = 10
NUM_TEST = 300
SPLIT_SEED = 0
FILE_FORMAT = "array_record"

_log = logging.getLogger(__name__)


def stratified_split(labels: np.ndarray, num_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into train and test with per-class proportions kept.

    Class c gets round(num_test * n_c / N) test examples (largest-remainder
    rounding, so the quotas sum to `num_test`), drawn by a permutation from
    `np.random.default_rng(seed)`, visited in class order.

    Args:
      labels: (N,) int class ids.
      num_test: number of test examples, 0 < num_test < N.
      seed: seed of the permutation.

    Returns:
      train: (N - num_test,) int64 sorted indices; test: (num_test,) sorted indices.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < num_test < n:
        raise ValueError(f"num_test must be in (0, {n}), got {num_test}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * num_test / n
    quota = np.floor(exact).astype(np.int64)
    # Largest remainder; the stable sort breaks ties by class order.
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[: num_test - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    is_test = np.zeros(n, bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def to_uint8(counts: np.ndarray) -> np.ndarray:
    """counts (..., 8, 8) in 0..16 -> (..., 8, 8) uint8 round(v * 255 / 16)."""
    return np.round(np.asarray(counts, np.float64) * 255.0 / 16.0).astype(np.uint8)


def _encode_png(image: np.ndarray) -> bytes:
    """image (H, W) uint8 -> PNG bytes (greyscale)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="png")
    return buffer.getvalue()


class Digits(LocalBuilder):
    """scikit-learn's 8x8 handwritten digits; registered in tfds as `digits`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Stratified 1497/300 train/test split, seed 0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description=(
                "scikit-learn's load_digits (UCI optdigits test set): 8x8 greyscale "
                "digits, 0..16 counts rescaled to 0..255."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8, encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download: scikit-learn ships the data.
        # Imported here so that reading a prepared dataset does not import sklearn.
        from sklearn.datasets import load_digits

        data = load_digits()
        train, test = stratified_split(data.target, NUM_TEST, SPLIT_SEED)
        return {
            "train": self._generate_examples(data.images, data.target, train),
            "test": self._generate_examples(data.images, data.target, test),
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict]]:
        """Yields (sklearn index, {image: PNG bytes, label: int})."""
        for i in indices:
            yield int(i), {"image": _encode_png(to_uint8(images[i])), "label": int(labels[i])}


def prepare_digits(data_dir: str | os.PathLike) -> Digits:
    """Writes `digits` as ArrayRecord under `data_dir` unless it is already there.

    Cheap when prepared (one directory check). Concurrent callers serialise on a
    lock file `data_dir/.digits.lock`; the first writes (tfds builds into a
    temporary directory and renames it, so a reader never sees a partial
    dataset) and the others find it prepared.

    Returns:
      The builder, prepared, for `data_dir`.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    return prepare_once(lambda: Digits(data_dir=data_dir, file_format=FILE_FORMAT), data_dir, ".digits.lock",
                        "digits", FILE_FORMAT)
