"""Pieces shared by the image tasks: model building, loaders, global-batch eval."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from segjax import data, models, sharding
from segjax.data import shapes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, **extra):
    """The registry model from `config.model` with `config.compute_dtype` compute.

    Parameters stay float32 (master weights) under bfloat16 compute.
    """
    dtype = config.get("compute_dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return models.build(config.model.name, **dict(config.model.get("kwargs", {})), **extra,
                        dtype=DTYPES[dtype])


def image_size(config) -> int:
    return int(config.model.kwargs.get("img_size") or models.MODELS[config.model.name].defaults.get(
        "img_size", 224))


def _preprocess(config, train: bool) -> data.ImagePreprocess:
    d = config.data
    crop = d.get("random_resized_crop_scale") if train else None
    return data.ImagePreprocess(image_size(config), random_resized_crop_scale=tuple(crop) if crop else None,
                                hflip=bool(d.get("hflip", False)) and train)


def _source(config, split: str):
    """Split `split` of tfds dataset `config.data.name`; with data.kind 'shapes', the
    generated shapes images (`config.data.shapes`, a ShapesSpec; prepared on first use)
    as an unlabeled image dataset (MAE pretraining on the detection data)."""
    d = config.data
    if d.get("kind") == "shapes":
        data_dir = data.resolve_data_dir(d.get("data_dir") or None)
        name = shapes.prepare_shapes(data_dir, shapes.ShapesSpec(**dict(d.get("shapes", {}))))
        return data.make_source(f"coco_format/{name}", split, data_dir)
    return data.make_source(d.name, split, d.get("data_dir") or None)


def make_loader(config, split: str, process_index: int, process_count: int, train: bool = True):
    """The task's training stream: batch `step` is a pure function of (seed, step)."""
    return data.Loader(_source(config, split), _preprocess(config, train),
                       global_batch_size=config.batch_size, seed=config.seed,
                       process_index=process_index, process_count=process_count)


def eval_batches(config, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size, padded eval batches for this process, with 'valid' and the split
    'index' of every row."""
    yield from data.EvalLoader(_source(config, split),
                               _preprocess(config, False), global_batch_size=batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count())


def run_eval(trainer, params, fn: Callable, split: str, batch_size: int) -> dict[str, float]:
    """Sums `fn(params, batch) -> dict of per-example sums` over a split, globally.

    `fn` is traced with the batch's shard count declared (`sharding.batch_shards`), as
    the train step is, so that a model's per-image loops stay on each device.
    """
    def traced(params, batch):
        with sharding.batch_shards(trainer.batch_shards):
            return fn(params, batch)

    step = jax.jit(traced, in_shardings=(trainer.param_shardings, trainer.batch_sharding))
    totals: dict[str, float] = {}
    for batch in eval_batches(trainer.config, split, batch_size):
        out = jax.device_get(step(params, trainer.put_batch(batch)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals
