"""Deterministic, resumable, multi-host batch loaders on grain's `MapDataset`.

Legend: N examples in the split, G global batch, B = G / P per-process batch,
P process count, p process index, H/W image size.

Training stream: example k of the infinite stream is record
`shuffle_e[k mod N]` of epoch e = k // N, where each epoch's permutation is seeded
by (seed, e); its augmentation rng is seeded by (seed, k). Global batch `step` is
examples [step*G, (step+1)*G), and process p holds rows [p*B, (p+1)*B) of it. So
a batch is a pure function of (seed, step, p, P): the loader's whole state is the
step, checkpointed as `{"step": next_step}` and resumed with
`iterate(start_step=state["step"])` or `get_batch(step)`.

Typical use::

    src = make_source("digits", "train", data_dir)
    pre = ImagePreprocess(image_size=32, random_resized_crop_scale=(0.2, 1.0))
    loader = Loader(src, pre, global_batch_size=256, seed=0,
                    process_index=jax.process_index(), process_count=jax.process_count())
    for step, batch in loader.iterate(start_step):
        ...
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from segjax.data.decode import DecodedSource
from segjax.data.source import make_source  # noqa: F401 - re-exported: sources are built here.

Batch = dict[str, np.ndarray]


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """G / P, after checking that P divides G and 0 <= p < P."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    return global_batch_size // process_count


def _prefetched(batches: grain.MapDataset, start: int, num_threads: int, prefetch: int) -> Iterator[Batch]:
    """Yields batches[start], batches[start+1], ... computed ahead by grain's thread pool."""
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    it = iter(batches[start:].to_iter_dataset(read_options))
    try:
        yield from it
    finally:
        it.close()  # Stops the worker threads when the consumer stops early.


def _numbered(start: int, batches: Iterator[Batch]) -> Iterator[tuple[int, Batch]]:
    """Pairs batches with their step; closing it closes `batches` (and its threads)."""
    try:
        yield from zip(itertools.count(start), batches)
    finally:
        batches.close()


def _decoded(source: Sequence[dict] | DecodedSource, image_key: str, label_key: str) -> DecodedSource:
    return source if isinstance(source, DecodedSource) else DecodedSource(source, image_key, label_key)


class Loader:
    """Training batches: shuffled every epoch, augmented, infinite, random access.

    Attributes:
      num_examples: N.
      global_batch_size: G.
      local_batch_size: B = G / P, the rows this process returns.
    """

    def __init__(
        self,
        source: Sequence[dict] | DecodedSource,
        preprocess: Callable[[dict, np.random.Generator], dict],
        *,
        global_batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 2,
        prefetch: int = 2,
        image_key: str = "image",
        label_key: str = "label",
    ):
        """Builds the stream.

        Args:
          source: raw records (e.g. `make_source(...)`), each a dict with an image
            (encoded bytes, PIL or array) under `image_key` and optionally a label;
            or a `DecodedSource` (e.g. Mask R-CNN's `DetectionSource`), used as is.
          preprocess: (decoded example, rng) -> example of fixed-shape arrays, e.g.
            `ImagePreprocess`; rng is a per-example `np.random.Generator`.
          global_batch_size: G, summed over processes.
          seed: seeds the per-epoch shuffles and the augmentations.
          process_index, process_count: this host's p and P (jax.process_index(),
            jax.process_count()).
          num_threads, prefetch: `iterate`'s worker threads and batches computed ahead.
        """
        self.global_batch_size = global_batch_size
        self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
        self._decoded = _decoded(source, image_key, label_key)
        self.num_examples = len(self._decoded)
        self._num_threads = num_threads
        self._prefetch = prefetch
        # grain derives distinct seeds for the shuffle and the random_map from `seed`;
        # the shuffle reseeds every epoch (seed + epoch) and random_map keys its Philox
        # rng on the element index, which after repeat() is the global example index k.
        examples = (grain.MapDataset.source(self._decoded).seed(seed)
                    .shuffle().repeat().random_map(preprocess))
        # Chunk c holds examples [c*B, (c+1)*B); global step s is chunks s*P .. s*P+P-1.
        chunks = examples.batch(self.local_batch_size, drop_remainder=True)
        self._batches = chunks[process_index::process_count]

    @property
    def num_corrupt(self) -> int:
        """Distinct records that failed to decode (and were substituted) so far in this process."""
        return self._decoded.num_corrupt

    def epoch(self, step: int) -> int:
        """Epoch of the first example of global batch `step`: step * G // N."""
        return step * self.global_batch_size // self.num_examples

    def get_batch(self, step: int) -> Batch:
        """This process's rows of global batch `step`.

        Returns:
          {image: (B, H, W, 3) float32, label: (B,) int32 when the source has labels}
          (whatever `preprocess` returns, stacked).
        """
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        return self._batches[step]

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yields (step, get_batch(step)) for step = start_step, start_step+1, ... forever.

        Batches are computed ahead in background threads, so loading overlaps the
        train step. Close the generator (or drop it) to stop the threads.
        """
        if start_step < 0:
            raise IndexError(f"start_step must be >= 0, got {start_step}")
        batches = _prefetched(self._batches, start_step, self._num_threads, self._prefetch)
        return _numbered(start_step, batches)


class EvalLoader:
    """One pass over a split in order, in fixed-size batches with a validity mask.

    The last global batch is padded (with records from the start of the split) so
    every batch has static shape; `valid_key` (default `valid`) is False on padding
    and `index` holds each row's split position (mod N on padding). Global batch
    `step` holds split indices [step*G, (step+1)*G); process p returns rows
    [p*B, (p+1)*B).

    Attributes:
      num_examples: N.
      num_steps: ceil(N / G) batches per pass.
      local_batch_size: B = G / P.
    """

    def __init__(
        self,
        source: Sequence[dict] | DecodedSource,
        preprocess: Callable[[dict], dict],
        *,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 2,
        prefetch: int = 2,
        image_key: str = "image",
        label_key: str = "label",
        max_examples: int | None = None,
        valid_key: str = "valid",
    ):
        """Args as `Loader`, except `preprocess` is called without an rng (no augmentation).

        max_examples: evaluate only the first max_examples records (None: all).
        valid_key: the name of the per-row validity flag (Mask R-CNN batches already
          use `valid` for instances).
        """
        self.global_batch_size = global_batch_size
        self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
        self._decoded = _decoded(source, image_key, label_key)
        n = len(self._decoded)
        self.num_examples = n = min(n, max_examples) if max_examples else n
        self.num_steps = math.ceil(n / global_batch_size)
        self._num_threads = num_threads
        self._prefetch = prefetch

        def finish(i: int, ex: Batch) -> Batch:
            return {**ex, valid_key: np.asarray(i < n), "index": np.asarray(i % n, np.int32)}

        examples = grain.MapDataset.source(self._decoded)[:n].map(preprocess)
        padded = examples.repeat()[: self.num_steps * global_batch_size].map_with_index(finish)
        self._batches = padded.batch(self.local_batch_size, drop_remainder=True)[process_index::process_count]

    @property
    def num_corrupt(self) -> int:
        """Distinct records that failed to decode (and were substituted) so far in this process."""
        return self._decoded.num_corrupt

    def __len__(self) -> int:
        return self.num_steps

    def get_batch(self, step: int) -> Batch:
        """This process's rows of eval batch `step`, 0 <= step < num_steps.

        Returns:
          {image: (B, H, W, 3) float32, label: (B,) int32 when present, valid: (B,) bool}.
        """
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step must be in [0, {self.num_steps}), got {step}")
        return self._batches[step]

    def __iter__(self) -> Iterator[Batch]:
        """Yields get_batch(0), ..., get_batch(num_steps - 1), computed ahead in threads."""
        return _prefetched(self._batches, 0, self._num_threads, self._prefetch)
