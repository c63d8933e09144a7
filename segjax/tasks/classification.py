"""Image classification (ViT fine-tuning / linear probe): cross-entropy, top-1 accuracy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from segjax.tasks import common

RNG_STREAMS = ("dropout",)


def build_model(config):
    return common.build_model(config)


def example_batch(config, b: int) -> dict:
    s = common.image_size(config)
    return {"image": jnp.zeros((b, s, s, 3), jnp.float32), "label": jnp.zeros((b,), jnp.int32)}


def model_inputs(batch: dict) -> dict:
    return {"imgs": batch["image"]}


def loss_fn(model, params, batch, rngs, train: bool, config=None):
    logits = model.apply({"params": params}, batch["image"], train=train, rngs=rngs)["logits"]
    n = logits.shape[-1]
    smoothing = float(config.get("label_smoothing", 0.0)) if config is not None else 0.0
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], n), smoothing) if smoothing else \
        jax.nn.one_hot(batch["label"], n)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    acc = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"accuracy": acc}


def make_loader(config, split, process_index, process_count):
    return common.make_loader(config, split, process_index, process_count, train=True)


def evaluate(trainer, params, workdir: str, step: int, writer) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over the eval split."""
    model, config = trainer.model, trainer.config

    def fn(p, batch):
        logits = model.apply({"params": p}, batch["image"])["logits"]
        v = batch["valid"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": ((logits.argmax(-1) == batch["label"]) * v).sum(),
                "loss": (ce * v).sum(), "count": v.sum()}

    t = common.run_eval(trainer, params, fn, config.data.get("eval_split", "test"),
                        config.get("eval_batch_size", config.batch_size))
    n = max(t["count"], 1.0)
    return {"accuracy": t["correct"] / n, "loss": t["loss"] / n, "examples": t["count"]}
