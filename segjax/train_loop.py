"""The one generic training loop and checkpoint evaluation (tasks plug in through `segjax.tasks`).

The train state is a plain pytree {'params', 'opt_state', 'step', 'rng'}; the data
position lives beside it in the checkpoint. The step is one `jax.jit` with
`NamedSharding`s (the pjit path): params and optimizer state are created already
sharded from the logical axis names, and the batch is sharded over `batch` rules.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from segjax import checkpoint, optim, sharding
from segjax import tasks as tasks_lib
from segjax.metrics_writer import MetricWriter

log = logging.getLogger(__name__)

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss or gradient; nothing of it was saved."""


def _rng_streams(rng: jax.Array, names) -> dict[str, jax.Array]:
    return {n: jax.random.fold_in(rng, i) for i, n in enumerate(names)}


class Trainer:
    """Builds the model, state, shardings and jitted steps for one config.

    Usable without running the loop (tests lower `train_step` for other platforms).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
        self.config = config
        self.task = tasks_lib.get(config.task)
        self.model = self.task.build_model(config)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(dict(config.mesh))
        self.rules = tuple(tuple(r) for r in config.get("axis_rules", sharding.DEFAULT_RULES))
        self.global_batch = int(config.batch_size)
        if self.global_batch % sharding.batch_divisor(self.mesh, self.rules):
            raise ValueError(f"batch_size {self.global_batch} is not divisible by the "
                             f"{sharding.batch_divisor(self.mesh, self.rules)} batch shards of mesh "
                             f"{dict(self.mesh.shape)}")
        self.total_steps = int(config.total_steps)
        self.rng_names = self.task.RNG_STREAMS

        example = self.task.example_batch(config, self.global_batch)
        init_rngs = _rng_streams(jax.random.key(config.seed), ("params",) + self.rng_names)
        abstract = jax.eval_shape(lambda: self.model.init(init_rngs, **self.task.model_inputs(example)))
        self.param_shardings = sharding.shardings_from_boxed(abstract["params"], self.mesh, self.rules)
        abstract_params = nn.meta.unbox(abstract["params"])
        self.tx, self.schedule = optim.make_optimizer(
            config.optim, abstract_params, self.global_batch, self.total_steps,
            depth=getattr(self.model, "depth", None))
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        # Optimizer moments follow their parameter's sharding (ZeRO-3 style); leaves
        # that are not parameter-shaped (counts) are replicated.
        self.opt_shardings = _opt_shardings(abstract_opt, abstract_params, self.param_shardings, self.mesh)
        rep = sharding.replicated(self.mesh)
        self.state_shardings = {"params": self.param_shardings, "opt_state": self.opt_shardings,
                                "step": rep, "rng": rep}
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.abstract_params = abstract_params
        self.abstract_opt = abstract_opt

        model, task, tx = self.model, self.task, self.tx
        config = self.config

        def init_fn(rng):
            rngs = _rng_streams(rng, ("params",) + self.rng_names)
            variables = model.init(rngs, **task.model_inputs(example))
            params = nn.meta.unbox(variables["params"])
            return {"params": params, "opt_state": tx.init(params),
                    "step": jnp.zeros((), jnp.int32), "rng": jax.random.fold_in(rng, 1 << 20)}

        self._init = jax.jit(init_fn, out_shardings=self.state_shardings)
        # NOTE: replicated scalars are made inside jit, not with jax.device_put, which
        # cannot target a sharding spanning other processes' devices (multi-host resume).
        self._step_rng = jax.jit(
            lambda step: {"step": step.astype(jnp.int32),
                          "rng": jax.random.fold_in(jax.random.key(config.seed), 1 << 20)},
            out_shardings={"step": rep, "rng": rep})
        self._opt_init = jax.jit(tx.init, out_shardings=self.opt_shardings)

        def train_step(state, batch):
            rng = jax.random.fold_in(state["rng"], state["step"])
            rngs = _rng_streams(rng, self.rng_names)

            def loss_fn(params):
                return task.loss_fn(model, params, batch, rngs, train=True, config=config)

            with nn.logical_axis_rules(self.rules):
                (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = jax.tree_util.tree_map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
            grad_norm = optax.global_norm(grads)
            metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                       "lr": self.schedule(state["step"])}
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                         "rng": state["rng"]}
            return new_state, metrics

        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=(0,))

    # -- state ---------------------------------------------------------------------------
    def init_state(self) -> PyTree:
        with self.mesh:
            return self._init(jax.random.key(self.config.seed))

    def abstract_state(self) -> PyTree:
        return jax.eval_shape(lambda: self._init(jax.random.key(0)))

    def targets(self):
        """ShapeDtypeStructs with shardings for restoring params / opt_state."""
        def sds(a, s):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        params = jax.tree_util.tree_map(sds, self.abstract_params, self.param_shardings)
        opt = jax.tree_util.tree_map(sds, self.abstract_opt, self.opt_shardings)
        return params, opt

    def step_and_rng(self, step: int) -> dict[str, jax.Array]:
        """{'step', 'rng'} of a state at `step`, replicated on the mesh."""
        return self._step_rng(jnp.asarray(step, jnp.int32))

    def state_from_params(self, params: PyTree, step: int = 0) -> PyTree:
        """params: host (numpy) values, the same in full on every process."""
        # NOTE: each process fills its own shards (jax.device_put cannot target devices
        # of other processes).
        params = jax.tree_util.tree_map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
            params, self.param_shardings)
        return {"params": params, "opt_state": self._opt_init(params), **self.step_and_rng(step)}

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return sharding.global_batch_from_local(local_batch, self.batch_sharding)


def _opt_shardings(abstract_opt, abstract_params, param_shardings, mesh):
    by_shape: dict = {}
    for p, s in zip(jax.tree_util.tree_leaves(abstract_params), jax.tree_util.tree_leaves(param_shardings)):
        by_shape.setdefault((p.shape, p.dtype), s)
    rep = sharding.replicated(mesh)
    # Match moments to params structurally where the optimizer state embeds the
    # params' tree (Adam mu/nu); fall back to shape matching for anything else.
    params_def = jax.tree_util.tree_structure(abstract_params)

    def assign(sub):
        if jax.tree_util.tree_structure(sub) == params_def:
            return param_shardings
        return jax.tree_util.tree_map(lambda a: by_shape.get((a.shape, a.dtype), rep)
                                      if a.ndim else rep, sub)

    return _map_subtrees(abstract_opt, params_def, assign)


def _map_subtrees(tree, params_def, fn):
    if jax.tree_util.tree_structure(tree) == params_def:
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple optimizer states
        return type(tree)(*(_map_subtrees(t, params_def, fn) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_subtrees(t, params_def, fn) for t in tree)
    if isinstance(tree, dict):
        return {k: _map_subtrees(v, params_def, fn) for k, v in tree.items()}
    return fn(tree)


def _meta(config) -> dict:
    return {"model": config.model.name, "model_kwargs": dict(config.model.get("kwargs", {})),
            "task": config.task}


def restore_or_init(trainer: Trainer, ckpt: checkpoint.TrainCheckpointer) -> tuple[PyTree, dict]:
    """Resume order: 1. the workdir's newest readable checkpoint (full state and data
    position); 2. `config.init_from` (params only, for fine-tuning; undeclared missing or
    unexpected params fail); 3. fresh init."""
    config = trainer.config
    params_t, opt_t = trainer.targets()
    restored = ckpt.restore_latest(params_t, opt_t)
    if restored is not None:
        step, params, opt_state, data = restored
        log.info("resumed from %s step %d", ckpt.directory, step)
        return ({"params": params, "opt_state": opt_state, **trainer.step_and_rng(step)},
                {"resumed_step": step, **data})
    if config.get("init_from") and config.init_from.get("path"):
        # NOTE: process_allgather, not device_get: FSDP params may live on other hosts.
        fresh = multihost_utils.process_allgather(trainer.init_state()["params"], tiled=True)
        loaded, meta = checkpoint.load_params(config.init_from.path)
        params, report = checkpoint.merge_params(
            fresh, loaded, config.init_from.get("allow_missing", ()),
            config.init_from.get("allow_unexpected", ()))
        log.info("initialised from %s (%s): %d loaded, missing (kept from init) %s, unused %s",
                 config.init_from.path, meta.get("model"), len(report["loaded"]),
                 report["missing"], report["unexpected"])
        return trainer.state_from_params(params), {"init_from": report}
    return trainer.init_state(), {}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training to `config.total_steps`; returns the last metrics."""
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config)
    task = trainer.task
    is_main = jax.process_index() == 0
    loader = task.make_loader(config, config.data.get("train_split", "train"), jax.process_index(),
                              jax.process_count())
    ckpt = checkpoint.TrainCheckpointer(workdir, config.checkpoint.save_every,
                                        config.checkpoint.keep, config.checkpoint.get("async_save", True))
    writer = MetricWriter(os.path.join(workdir, "tensorboard"), enabled=is_main)
    state, info = restore_or_init(trainer, ckpt)
    start = int(jax.device_get(state["step"]))
    if "init_from" in info:
        writer.text("init_from", str(info["init_from"]), start)
    meta = _meta(config)
    last: dict[str, float] = {}
    progress = _progress(start, trainer.total_steps, is_main)
    t0, compile_logged = time.time(), False
    batches = loader.iterate(start)
    for step, local_batch in itertools.islice(batches, max(trainer.total_steps - start, 0)):
        batch = trainer.put_batch(local_batch)
        with trainer.mesh:
            state, metrics = trainer.train_step(state, batch)
        metrics = jax.device_get(metrics)
        done = step + 1
        # Host-side finiteness check every step: a non-finite step must never reach a
        # checkpoint (saves below happen only after this check).
        if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss/grad at step {done} (loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}); stopped before saving. Last checkpoint: "
                f"step {ckpt.latest_step()} in {ckpt.directory}")
        if not compile_logged:
            writer.scalar("perf/first_step_seconds", time.time() - t0, done)
            compile_logged = True
        last = {k: float(v) for k, v in metrics.items()}
        if done % config.log_every == 0 or done == trainer.total_steps:
            writer.scalars({f"train/{k}": v for k, v in last.items()}, done)
            progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
        progress.update(1)
        ckpt.save(done, state["params"], state["opt_state"], {"step": done}, meta,
                  force=done == trainer.total_steps)
        if config.get("eval_every") and (done % config.eval_every == 0 or done == trainer.total_steps):
            eval_metrics = task.evaluate(trainer, state["params"], workdir, done, writer)
            writer.scalars({f"eval/{k}": v for k, v in eval_metrics.items()}, done)
            log.info("step %d eval: %s", done, {k: round(v, 5) for k, v in eval_metrics.items()})
            progress.write(f"step {done} eval: " + " ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
            last.update({f"eval/{k}": v for k, v in eval_metrics.items()})
    batches.close()
    progress.close()
    ckpt.close()
    writer.close()
    return last


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


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)
