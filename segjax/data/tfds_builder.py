"""What the tfds dataset builders that segjax defines (digits, coco_format, sa1b_format) share."""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

_log = logging.getLogger(__name__)


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """A `GeneratorBasedBuilder` whose `code_path` is the file that defines the subclass.

    NOTE: tfds's default `code_path` (where it looks for a checksums file) probes the
    package through `importlib_resources`, which tfds does not install; the answer it
    would compute is the defining module's file. This class is abstract, so tfds does
    not register it as a dataset.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The `DatasetInfo` of segjax's local builders: never looked up on tfds's GCS bucket.

    NOTE: tfds's `DatasetBuilder.__init__` calls `initialize_from_bucket` for every
    dataset not prepared yet, and that creates an empty `tmp*tfds` directory under the
    system's temporary directory before it finds that GCS is disabled, leaking one per
    builder constructed (every `prepare_once`, every test). Local datasets are never
    on the bucket, so this does nothing.
    """

    def initialize_from_bucket(self) -> None:
        return None


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Holds an exclusive flock on `path` (created if missing) for the block: one
    process prepares a dataset while the others wait."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(make_builder: Callable[[], tfds.core.DatasetBuilder], data_dir: str, lock_name: str,
                 what: str, file_format: str = "array_record") -> tfds.core.DatasetBuilder:
    """Prepares `make_builder()` unless it already is; returns the prepared builder.

    Cheap when prepared (one directory check). Concurrent callers serialise on the lock
    file `data_dir/lock_name`; the first writes (tfds builds into a temporary directory
    and renames it, so a reader never sees a partial dataset) and the others find it
    prepared. `what` names the dataset in the log.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, lock_name)):
        # Re-created under the lock: another process may have prepared it meanwhile.
        builder = make_builder()
        if not builder.is_prepared():
            _log.info("Preparing %s in %s", what, data_dir)
            builder.download_and_prepare(file_format=file_format)
    return builder


def image_record_features(objects: Mapping[str, tfds.features.FeatureConnector]) -> tfds.features.FeaturesDict:
    """One image per record, as segjax's instance datasets (coco_format, sa1b_format) store it:
    image (the file's bytes, decoded by the pipeline), image_id () int64, height () int32,
    width () int32, file_name () bytes, and the dataset's `objects` features."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
        "image_id": tfds.features.Tensor(shape=(), dtype=np.int64),
        "height": tfds.features.Tensor(shape=(), dtype=np.int32),
        "width": tfds.features.Tensor(shape=(), dtype=np.int32),
        "file_name": tfds.features.Tensor(shape=(), dtype=np.object_),
        "objects": tfds.features.FeaturesDict(dict(objects)),
    })
