"""Tasks: each module builds its model, loss, loader and evaluation for the loop.

A task module provides RNG_STREAMS, build_model(config), example_batch(config, b),
model_inputs(batch), loss_fn(model, params, batch, rngs, train, config) -> (loss, metrics),
make_loader(config, split, process_index, process_count) and
evaluate(trainer, params, workdir, step, writer) -> metrics.
"""

from __future__ import annotations

import importlib

TASKS = {"mae": "segjax.tasks.mae", "classification": "segjax.tasks.classification"}
TASKS["maskrcnn"] = "segjax.tasks.maskrcnn"
TASKS["sam"] = "segjax.tasks.sam"


def get(name: str):
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])
