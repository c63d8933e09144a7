"""What the tfds dataset builders that segjax defines (digits, coco_format) share."""

from __future__ import annotations

import contextlib
import fcntl
import inspect
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath


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
