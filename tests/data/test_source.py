"""make_source on a tfds dataset segjax does not prepare itself (RGB JPEGs, one corrupt)."""

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from segjax.data.pipeline import EvalLoader, Loader
from segjax.data.preprocess import ImagePreprocess
from segjax.data.source import make_source
from segjax.data.tfds_builder import LocalBuilder

NUM = 12
CORRUPT = 5


class SegjaxTestRgb(LocalBuilder):
    """12 RGB JPEGs of varying size; record 5's bytes are not an image."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=3),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM):
            buffer = io.BytesIO()
            size = (int(rng.integers(5, 20)), int(rng.integers(5, 20)), 3)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(buffer, format="jpeg")
            yield i, {"image": b"truncated" if i == CORRUPT else buffer.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds_rgb"))
    builder = SegjaxTestRgb(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return data_dir


def test_prepared_dataset_reads_as_encoded_bytes(rgb_dir):
    src = make_source("segjax_test_rgb", "train", rgb_dir)
    assert len(src) == NUM
    assert isinstance(src[0]["image"], bytes)
    decoded = make_source("segjax_test_rgb", "train[:2]", rgb_dir, decode_images=True)
    assert len(decoded) == 2 and decoded[0]["image"].ndim == 3


def test_loaders_on_prepared_dataset_survive_corrupt_record(rgb_dir):
    src = make_source("segjax_test_rgb", "train", rgb_dir)
    loader = Loader(src, ImagePreprocess(image_size=8, random_resized_crop_scale=(0.2, 1.0), hflip=True),
                    global_batch_size=4, seed=0)
    batches = [loader.get_batch(s) for s in range(NUM // 4)]
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)
    assert loader.num_corrupt == 1
    eval_loader = EvalLoader(src, ImagePreprocess(image_size=8), global_batch_size=5)
    valid = np.concatenate([b["valid"] for b in eval_loader])
    assert valid.sum() == NUM and len(valid) == 15
