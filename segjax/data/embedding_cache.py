"""SAM image embeddings computed once per image, for decoder-only training.

Legend: B images, S model input side, h / w the embedding grid (S / 16), C its width.

With the image encoder frozen, an image's embedding never changes during training, so
the encoder runs once per image instead of once per step. `EmbeddingCache` holds them
keyed by (encoder parameters, data, image index): the key is a SHA-1 of every encoder
parameter's bytes, the model's name and fields and the data fields that shape the
image (dataset, split, input side), so a cache directory is never read for another
checkpoint or dataset. Entries live in host memory and, with `directory`, in
`directory/<key>/<index>.npy` (written atomically, reused by later runs and by every
process of a multi-host run).

The batch's `index` is the record actually read (`segjax.data.sam.SamSource`
substitutes unusable records), and the image of an index is deterministic when the
data has no augmentation, which the task checks (`config.data.hflip` off).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

import jax
import numpy as np

from segjax import checkpoint
from segjax.atomic_write import atomic_open

log = logging.getLogger(__name__)


def encoder_params(params: dict, where: str) -> dict:
    """`params['image_encoder']`, with a clear error when the checkpoint has none."""
    if set(params) == {"params"}:
        params = params["params"]
    if "image_encoder" not in params:
        raise ValueError(f"{where} holds no image_encoder parameters (top-level keys {sorted(params)}); "
                         "cached embeddings need the frozen encoder's checkpoint in config.init_from.path")
    return params["image_encoder"]


def fingerprint(tree, extra: dict) -> str:
    """SHA-1 over every leaf (path, dtype, shape, bytes) and `extra` (JSON)."""
    h = hashlib.sha1(json.dumps(extra, sort_keys=True, default=str).encode())
    for path, leaf in sorted(checkpoint.flatten_paths(tree).items()):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


class EmbeddingCache:
    """index -> (h, w, C) float32 embedding of that image under fixed encoder params.

    model: the `Sam` module; params: its `image_encoder` subtree; key: what the
    entries belong to (`fingerprint`); directory: '' or None for memory only.
    """

    def __init__(self, model, params: dict, key: str, directory: str | None = None):
        self.model = model
        self.key = key
        self.directory = os.path.join(os.path.expanduser(directory), key) if directory else None
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
        self._params = jax.device_put({"image_encoder": params}, jax.devices()[0])
        self._memory: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.num_computed = 0  # encoder runs (images), in this process
        self._embed = jax.jit(lambda p, x, hw: model.apply({"params": p}, x, hw, method="embed_image"))

    @classmethod
    def from_config(cls, config, split: str, model) -> EmbeddingCache:
        """The cache of `config`'s frozen encoder (from `config.init_from.path`) on `split`;
        model: the task's `Sam`."""
        path = config.init_from.get("path", "")
        if not path:
            raise ValueError("config.sam.cached_embeddings needs config.init_from.path: the checkpoint whose "
                             "(frozen) image encoder computes the cached embeddings")
        params, meta = checkpoint.load_params(path)
        enc = encoder_params(params, path)
        d = config.data
        data = {k: d.get(k) for k in ("kind", "dataset", "data_dir", "img_size", "max_area_fraction")}
        data["shapes"] = dict(d.get("shapes", {}) or {})
        extra = {"model": config.model.name, "model_kwargs": dict(config.model.get("kwargs", {})),
                 "data": data, "split": split, "checkpoint_model": meta.get("model")}
        return cls(model, enc, fingerprint(enc, extra), config.sam.get("embedding_cache_dir", "") or None)

    def _file(self, index: int) -> str:
        return os.path.join(self.directory, f"{index}.npy")

    def _get(self, index: int) -> np.ndarray | None:
        with self._lock:
            hit = self._memory.get(index)
        if hit is None and self.directory and os.path.exists(self._file(index)):
            try:
                hit = np.load(self._file(index))
            except (OSError, ValueError, EOFError) as e:  # not written by us: computed again
                log.warning("embedding cache: unreadable %s (%s); recomputing it", self._file(index), e)
                return None
            with self._lock:
                self._memory[index] = hit
        return hit

    def _put(self, index: int, emb: np.ndarray) -> None:
        with self._lock:
            self._memory[index] = emb
        if self.directory:
            with atomic_open(self._file(index)) as f:
                np.save(f, emb)

    def lookup(self, index: np.ndarray, image: np.ndarray, image_hw: np.ndarray) -> np.ndarray:
        """Embeddings of a batch, running the encoder only on the images not cached yet.

        index: (B,) int; image: (B, S, S, 3) float32; image_hw: (B, 2) int32.
        Returns: (B, h, w, C) float32.
        """
        index = np.asarray(index).reshape(-1)
        out: list[np.ndarray | None] = [self._get(int(i)) for i in index]
        todo = [r for r, e in enumerate(out) if e is None]
        if todo:
            # Rows of one image appear once per batch but may repeat across an epoch
            # boundary: compute each missing index once.
            first = {int(index[r]): r for r in reversed(todo)}
            rows = np.asarray(sorted(first.values()))
            # padded to the batch (repeating a row): one compiled shape
            padded = np.concatenate([rows, np.full(len(index) - len(rows), rows[0])])
            emb = np.asarray(jax.device_get(self._embed(self._params, np.asarray(image)[padded],
                                                        np.asarray(image_hw)[padded])))
            for e, r in zip(emb, rows):
                self._put(int(index[r]), e)
            self.num_computed += len(rows)
            out = [self._get(int(i)) for i in index]
        return np.stack(out)
