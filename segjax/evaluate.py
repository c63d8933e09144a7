"""Evaluate a checkpoint with a training config (the library side of eval.py)."""

from __future__ import annotations

import os

import jax

from segjax import checkpoint
from segjax.metrics_writer import MetricWriter
from segjax.train_loop import Trainer


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
    """Restores the newest readable params in `workdir` and runs the task's evaluation."""
    trainer = Trainer(config)
    params_t, _ = trainer.targets()
    params, meta = checkpoint.load_params(workdir, target=params_t)
    if meta.get("model") != config.model.name:
        raise ValueError(f"checkpoint in {workdir} holds model {meta.get('model')!r}, but the "
                         f"config builds {config.model.name!r}")
    step = int(meta["step"])
    writer = MetricWriter(os.path.join(workdir, "tensorboard_eval"), enabled=jax.process_index() == 0)
    metrics = trainer.task.evaluate(trainer, params, workdir, step, writer)
    writer.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
    writer.close()
    return metrics

