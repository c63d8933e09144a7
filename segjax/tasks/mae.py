"""MAE pretraining task: masked-patch reconstruction loss, reconstruction eval + PNG."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from segjax.evaluators import reconstruction
from segjax.models.mae import mae_loss
from segjax.tasks import common

RNG_STREAMS = ("masking", "dropout")
build_model = common.build_model


def example_batch(config, b: int) -> dict:
    s = common.image_size(config)
    return {"image": jnp.zeros((b, s, s, 3), jnp.float32)}


def model_inputs(batch: dict) -> dict:
    return {"imgs": batch["image"]}


def loss_fn(model, params, batch, rngs, train: bool, config=None):
    out = model.apply({"params": params}, batch["image"], rngs=rngs, train=train)
    return out["loss"], {"mask_ratio": out["mask"].mean()}


def make_loader(config, split, process_index, process_count):
    return common.make_loader(config, split, process_index, process_count, train=True)


def _eval_noise(seed: int, index: jax.Array, num_patches: int) -> jax.Array:
    """Per-example masking noise from its dataset index: the same mask every eval."""
    return jax.vmap(lambda i: jax.random.uniform(
        jax.random.fold_in(jax.random.key(seed), i), (num_patches,)))(index)


def evaluate(trainer, params, workdir: str, step: int, writer) -> dict[str, float]:
    """Mean masked-patch loss over the eval split (fixed per-example masks) and a PNG of
    masked input / reconstruction / paste / original for the first images."""
    config, model = trainer.config, trainer.model
    bs = config.get("eval_batch_size", config.batch_size)

    def fn(p, batch):
        noise = _eval_noise(config.seed, batch["index"], model.num_patches)
        out = model.apply({"params": p}, batch["image"], noise)
        # per-example loss, so padded examples can be dropped exactly
        target_loss = jax.vmap(lambda im, pr, m: mae_loss(im[None], pr[None], m[None],
                                                          model.patch_size, model.norm_pix_loss))(
            batch["image"], out["pred"], out["mask"])
        v = batch["valid"].astype(jnp.float32)
        return {"loss": (target_loss * v).sum(), "count": v.sum()}

    totals = common.run_eval(trainer, params, fn, config.data.get("eval_split", "test"), bs)
    metrics = {"loss": totals["loss"] / max(totals["count"], 1.0)}
    if jax.process_index() == 0:
        metrics.update(_write_picture(trainer, params, workdir, step, writer))
    return metrics


def _write_picture(trainer, params, workdir, step, writer) -> dict:
    config, model = trainer.config, trainer.model
    if jax.process_count() > 1:  # params may live on other hosts; skip the picture there
        return {}
    batch = next(iter(common.eval_batches(config, config.data.get("eval_split", "test"), 8)))
    noise = _eval_noise(config.seed, jnp.asarray(batch["index"]), model.num_patches)
    out = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n))(jax.device_get(params), batch["image"], noise)
    views = reconstruction.reconstruction_views(batch["image"], np.asarray(out["pred"]),
                                                np.asarray(out["mask"]), model.patch_size,
                                                model.norm_pix_loss)
    scale = max(1, 96 // batch["image"].shape[1])
    img = reconstruction.grid_image(views, scale=scale)
    reconstruction.save_png(os.path.join(workdir, "images", f"mae_step{step:06d}.png"), img)
    reconstruction.save_png(os.path.join(workdir, "images", "mae_latest.png"), img)
    writer.image("eval/reconstruction", img, step)
    return {}
