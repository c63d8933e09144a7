"""SAM image embeddings cached on disk, keyed by image content and checkpoint.

Key: sha256 of the checkpoint identity and the decoded pixels (shape + bytes), so a
renamed or re-saved copy of the same picture hits the cache and another checkpoint
never does. One `.npz` per image (features (1, h, w, C) widened to float32 with their
dtype's name, original and input sizes), written atomically; a few embeddings are also kept in memory (LRU).
`CachingSamPredictor.embed_images` goes through the cache, so the automatic mask
generator (which embeds the image itself) reuses it as well.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from collections.abc import Sequence

import jax
import numpy as np

from segjax.atomic_write import atomic_open
from segjax.inference.sam.predictor import SamImage, SamPredictor

MEMORY_ITEMS = 8


def checkpoint_identity(directory: str | os.PathLike, meta: dict) -> str:
    """A string that changes when the checkpoint's files or meta change."""
    directory = os.path.realpath(os.fspath(directory))
    files = []
    for dirpath, _, filenames in os.walk(directory):
        for f in sorted(filenames):
            st = os.stat(os.path.join(dirpath, f))
            files.append((os.path.relpath(os.path.join(dirpath, f), directory), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"dir": directory, "files": sorted(files), "meta": meta}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def image_key(image: np.ndarray, identity: str) -> str:
    h = hashlib.sha256(identity.encode())
    h.update(repr(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """Embeddings under `directory` (created on first write)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._memory: collections.OrderedDict[str, SamImage] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _file(self, key: str) -> str:
        return os.path.join(self.directory, key[:2], key + ".npz")

    def get(self, key: str) -> SamImage | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        try:
            with np.load(self._file(key)) as z:
                features = jax.device_put(z["features"]).astype(str(z["dtype"]))  # exact: stored widened
                image = SamImage(features, tuple(int(v) for v in z["original_size"]),
                                 tuple(int(v) for v in z["input_size"]))
        except (OSError, KeyError, ValueError):  # absent or a damaged file: embed again
            return None
        self._remember(key, image)
        return image

    def put(self, key: str, image: SamImage) -> None:
        self._remember(key, image)
        with atomic_open(self._file(key)) as f:
            np.savez(f, features=np.asarray(image.features, np.float32), dtype=str(image.features.dtype),
                     original_size=np.asarray(image.original_size), input_size=np.asarray(image.input_size))

    def _remember(self, key: str, image: SamImage) -> None:
        with self._lock:
            self._memory[key] = image
            self._memory.move_to_end(key)
            while len(self._memory) > MEMORY_ITEMS:
                self._memory.popitem(last=False)


class CachingSamPredictor(SamPredictor):
    """A `SamPredictor` whose `embed_images` reads and fills an `EmbeddingCache`.

    `last_hits` tells how many of the images of the last `embed_images` call came from
    the cache.
    """

    cache: EmbeddingCache | None = None
    identity: str = ""
    last_hits: int = 0

    def attach_cache(self, cache: EmbeddingCache, identity: str) -> CachingSamPredictor:
        self.cache, self.identity = cache, identity
        return self

    def embed_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> list[SamImage]:
        if self.cache is None:
            return super().embed_images(images, image_format)
        keys = [image_key(np.asarray(im), self.identity + image_format) for im in images]
        out: list[SamImage | None] = [self.cache.get(k) for k in keys]
        missing = [i for i, o in enumerate(out) if o is None]
        self.last_hits = len(images) - len(missing)
        if missing:
            for i, emb in zip(missing, super().embed_images([images[i] for i in missing], image_format)):
                self.cache.put(keys[i], emb)
                out[i] = emb
        return out
