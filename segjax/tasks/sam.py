"""Segment Anything task: the paper's interactive training (11 prompt rounds per mask),
class-agnostic mask data, the interactive click evaluation + pictures.

Legend: B images, S model input side, M masks per image, G loss resolution, h / w the
embedding grid, C its width.

Training (`loss_fn`): the image encoder runs once per image (drop path with the
'dropout' stream), then `segjax.models.sam.rollout.rollout_loss` simulates the rounds
with every random choice from the 'prompts' stream; the loop folds both with the step,
so a step is a pure function of (params, batch, step) and resumption is bit-exact.
Decoder-only training (`config.sam.cached_embeddings`): the batch carries `embeddings`
(B, h, w, C) computed once per image by the frozen encoder
(`segjax.data.embedding_cache`), the step never runs the encoder, and the image
encoder must be frozen (`config.optim.frozen`).

Data: `segjax.data.sam` (`config.data`, see there). Evaluation (`config.eval`):
`segjax.evaluators.interactive` (first click farthest from the boundary, then the
centre of the largest error region): mIoU after 1 / 3 / 5 clicks, NoC@85 / NoC@90
(capped at max_clicks) and box-prompt mIoU; pictures to TensorBoard and
workdir/images/sam_step{N}.png.

A trained workdir holds the registry model's name and fields in its meta, so
`SamPredictor.from_checkpoint(workdir)`, the segment CLI and `python -m segjax.convert`
(back to the official .pth) read it as they read a converted checkpoint.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from segjax.data import embedding_cache
from segjax.data import sam as sam_data
from segjax.evaluators import interactive, visualize
from segjax.models.sam.rollout import check_rounds, rollout_loss
from segjax.tasks import common

RNG_STREAMS = ("prompts", "dropout")
# The batch keys the step reads (the rest, e.g. the split index, stays on the host).
MODEL_KEYS = ("image", "image_hw", "masks", "boxes", "valid")
CACHED_KEYS = ("embeddings", "image_hw", "masks", "boxes", "valid")


def build_model(config):
    model = common.build_model(config)
    s = int(config.data.img_size)
    if model.img_size != s:
        raise ValueError(f"config.data.img_size={s} must equal the model's img_size {model.img_size} "
                         f"(config.model.kwargs.img_size)")
    check_rounds(int(config.sam.num_rounds), int(config.sam.num_no_point_rounds))
    if config.sam.get("cached_embeddings"):
        _check_frozen_encoder(config, model)
    return model


def _check_frozen_encoder(config, model) -> None:
    """Cached embeddings are only right for an encoder that never changes."""
    frozen = list(config.optim.get("frozen", ()))
    probe = "image_encoder/blocks_0/attn/qkv/kernel"
    if not any(re.search(p, probe) for p in frozen):
        raise ValueError("config.sam.cached_embeddings needs the image encoder frozen: add r'^image_encoder/' "
                         f"to config.optim.frozen (now {frozen})")
    if config.data.get("hflip"):
        raise ValueError("config.sam.cached_embeddings caches one embedding per image: set config.data.hflip=False")
    if model.encoder_drop_path_rate:
        raise ValueError("config.sam.cached_embeddings: a frozen encoder runs without drop path; set "
                         "config.model.kwargs.encoder_drop_path_rate=0")


def example_batch(config, b: int) -> dict:
    s = int(config.data.img_size)
    return {"image": jnp.zeros((b, s, s, 3), jnp.float32),
            "image_hw": jnp.full((b, 2), s, jnp.int32)}


def model_inputs(batch: dict) -> dict:
    """Sam.__call__'s arguments for init: one foreground point per image."""
    b = batch["image"].shape[0]
    return {"images": batch["image"], "input_hw": batch["image_hw"],
            "coords": jnp.zeros((b, 1, 1, 2), jnp.float32), "labels": jnp.ones((b, 1, 1), jnp.int32)}


def rollout_kwargs(config) -> dict:
    """`config.sam`'s recipe fields as `rollout_loss` keywords."""
    s = config.sam
    ints = {k: int(s[k]) for k in ("num_rounds", "num_no_point_rounds")}
    return {**ints, **{k: float(s[k]) for k in ("box_prob", "box_noise_std", "box_noise_max", "focal_weight",
                                                "dice_weight", "iou_weight")}}


def loss_fn(model, params, batch, rngs, train: bool, config=None):
    """The rollout's summed loss; needs the 'prompts' rng (and 'dropout' for drop path)."""
    embeddings = batch.get("embeddings")
    return rollout_loss(model, params, batch, rngs["prompts"], train=train, image_embeddings=embeddings,
                        dropout_rng=rngs.get("dropout"), **rollout_kwargs(config))


class _StepBatches:
    """A loader whose batches carry only what the step reads (`keys`), with `embeddings`
    added by `cache` (decoder-only training) in place of the image."""

    def __init__(self, loader, keys, cache=None):
        self.loader, self.keys, self.cache = loader, keys, cache

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def _step_batch(self, batch: dict) -> dict:
        if self.cache is not None:
            batch = {**batch, "embeddings": self.cache.lookup(batch["index"], batch["image"], batch["image_hw"])}
        return {k: batch[k] for k in self.keys}

    def get_batch(self, step: int) -> dict:
        return self._step_batch(self.loader.get_batch(step))

    def iterate(self, start_step: int = 0):
        it = self.loader.iterate(start_step)
        try:
            for step, batch in it:
                yield step, self._step_batch(batch)
        finally:
            it.close()


def make_loader(config, split, process_index, process_count):
    loader = sam_data.make_loader(config, split, process_index, process_count, train=True)
    if not config.sam.get("cached_embeddings"):
        return _StepBatches(loader, MODEL_KEYS)
    cache = embedding_cache.EmbeddingCache.from_config(config, split, build_model(config))
    return _StepBatches(loader, CACHED_KEYS, cache)


# ----------------------------------------------------------------------------- evaluation


def evaluate(trainer, params, workdir: str, step: int, writer) -> dict[str, float]:
    """The interactive protocol on the eval split (every process evaluates the whole
    split with the gathered params: the metrics are the same everywhere); process 0
    writes the pictures."""
    config = trainer.config
    ev = config.get("eval", {})
    # NOTE: process_allgather, not device_get: FSDP params may live on other hosts.
    host_params = multihost_utils.process_allgather(params, tiled=True)
    loader = sam_data.make_loader(config, config.data.get("eval_split", "val"), 0, 1, train=False)
    examples = sam_data.iterate_examples(loader)
    metrics, pictures = interactive.evaluate_interactive(
        trainer.model, jax.tree_util.tree_map(jnp.asarray, host_params), examples,
        max_clicks=int(ev.get("max_clicks", 20)), num_draw=int(ev.get("num_draw", 4)))
    if jax.process_index() == 0 and pictures:
        picture = visualize.one_under_another(pictures)
        visualize.save_png(os.path.join(workdir, "images", f"sam_step{step:06d}.png"), picture)
        visualize.save_png(os.path.join(workdir, "images", "sam_latest.png"), picture)
        writer.image("eval/interactive", picture, step)
    return {k: float(v) for k, v in metrics.items()}

