"""The one generic training loop and checkpoint evaluation (tasks plug in through `segjax.tasks`).

The train state is a plain pytree {'params', 'opt_state', 'step', 'rng'}; the data
position lives beside it in the checkpoint. The step is one `jax.jit` with
`NamedSharding`s (the pjit path): params and optimizer state are created already
sharded from the logical axis names, and the batch is sharded over `batch` rules.

What a run guarantees (tests/test_resume.py, test_reliability.py):
  - the config is validated before anything starts (`validate_config`);
  - one writer per workdir (`runtime.WorkdirLock`, held by process 0);
  - a step whose loss, gradient, new params or optimizer state is not finite stops
    the run before anything of it is saved;
  - at a step with a checkpoint, the eval runs first and every metric logged so far is
    flushed before the checkpoint is saved, so a finalised checkpoint implies its
    metrics and eval are on disk; a resumed run hides (TensorBoard purge) what a killed
    run logged after the restored step and logs it again, and reruns the restored
    step's eval if it did not complete (`workdir/evals_done/`);
  - resume takes the newest readable checkpoint; one that does not fit the config
    stops the run (`checkpoint.ConfigMismatchError`) and is never deleted.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from segjax import checkpoint, models, optim, runtime, sharding, xla_flags
from segjax import tasks as tasks_lib
from segjax.convert import init_maps
from segjax.metrics_writer import MetricWriter

log = logging.getLogger(__name__)

PyTree = Any


class NonFiniteLossError(FloatingPointError):
    """A step produced a non-finite loss, gradient, params or optimizer state; nothing of
    it was saved."""


class ConfigError(ValueError):
    """A config that cannot run, found before anything started."""


# Failures a user can act on: the entry points report them in one line (no traceback).
USER_ERRORS = (ConfigError, checkpoint.CheckpointError, runtime.WorkdirError,
               NonFiniteLossError, OSError)


def validate_config(config: ml_collections.ConfigDict, training: bool = True) -> None:
    """Checks every field the loop relies on; raises `ConfigError` listing each bad field.

    Runs before the workdir, the data or the model is touched (train.py and eval.py).
    `training=False` (eval) skips the fields only training uses.
    """
    errors: list[str] = []

    def get(path: str):
        node = config
        for part in path.split("."):
            if not hasattr(node, "get") or part not in node:
                return _MISSING
            node = node[part]
        return node

    def check(path: str, ok, rule: str, optional: bool = False) -> None:
        value = get(path)
        if value is _MISSING:
            if not optional:
                errors.append(f"config.{path} is missing ({rule})")
            return
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            errors.append(f"config.{path}={value!r}: {rule}")

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def positive_int(v) -> bool:
        return is_int(v) and v >= 1

    def regexes(v) -> bool:
        for pattern in v:
            re.compile(pattern)
        return isinstance(v, (tuple, list))

    check("task", lambda v: v in tasks_lib.TASKS, f"must be one of {sorted(tasks_lib.TASKS)}")
    check("model.name", lambda v: v in models.MODELS, "must be a registered model (segjax.models.MODELS)")
    check("seed", is_int, "must be an int")
    check("eval_batch_size", positive_int, "must be a positive int", optional=True)
    check("compute_dtype", lambda v: v in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'",
          optional=True)
    mesh = get("mesh")
    for axis in (mesh.keys() if hasattr(mesh, "keys") else ()):
        check(f"mesh.{axis}", lambda v: is_int(v) and (v >= 1 or v == -1),
              "must be a positive int or -1 (the remaining devices)")
    if hasattr(mesh, "values") and list(mesh.values()).count(-1) > 1:
        errors.append(f"config.mesh={dict(mesh)}: at most one axis may be -1")
    check("batch_size", positive_int, "must be a positive int (the global batch)")
    if training:
        check("total_steps", positive_int, "must be a positive int")
        check("log_every", positive_int, "must be a positive int")
        check("eval_every", lambda v: is_int(v) and v >= 0, "must be an int >= 0 (0: no eval)",
              optional=True)
        check("checkpoint.save_every", positive_int, "must be a positive int")
        check("checkpoint.keep", positive_int,
              "must be a positive int: the newest checkpoints kept (0 would delete them all)")
        check("optim.name", lambda v: v in optim.OPTIMIZERS, f"must be one of {list(optim.OPTIMIZERS)}")
        check("optim.schedule", lambda v: v in optim.SCHEDULES, f"must be one of {list(optim.SCHEDULES)}",
              optional=True)
        check("optim.warmup_steps", lambda v: is_int(v) and v >= 0, "must be an int >= 0", optional=True)
        if get("optim.lr") in (None, _MISSING):
            check("optim.base_lr", lambda v: math.isfinite(v) and v >= 0,
                  "must be a finite number >= 0 (or set optim.lr)")
        else:
            check("optim.lr", lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0")
        check("optim.min_lr", lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0",
              optional=True)
        check("optim.weight_decay", lambda v: math.isfinite(v) and v >= 0,
              "must be a finite number >= 0", optional=True)
        check("optim.layer_decay", lambda v: v is None or 0 < v <= 1, "must be None or in (0, 1]",
              optional=True)
        check("optim.grad_clip_norm", lambda v: v is None or (math.isfinite(v) and v > 0),
              "must be None or a finite number > 0", optional=True)
        for path in ("optim.frozen", "optim.no_decay", "init_from.allow_missing",
                     "init_from.allow_unexpected"):
            check(path, regexes, "must be a tuple of valid regular expressions", optional=True)
        check("init_from.mapping", lambda v: v in ("", *init_maps.MAPPINGS),
              f"must be '' or one of {sorted(init_maps.MAPPINGS)}", optional=True)
        check("init_from.rules", lambda v: regexes([r for r, _ in v]),
              "must be a tuple of (source regex, target template) pairs", optional=True)
        check("init_from.transforms", lambda v: regexes([r for r, _ in v]) and all(
            t in init_maps.TRANSFORMS for _, t in v),
              f"must be a tuple of (target regex, one of {init_maps.TRANSFORMS}) pairs", optional=True)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


_MISSING = object()


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
        self.batch_shards = sharding.batch_divisor(self.mesh, self.rules)
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

            with nn.logical_axis_rules(self.rules), sharding.batch_shards(self.batch_shards):
                (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = jax.tree_util.tree_map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
            grad_norm = optax.global_norm(grads)
            metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                       "lr": self.schedule(state["step"]),
                       # what would be saved: an overflowing update (lr 1e40) leaves the
                       # loss and gradient finite and only the new params non-finite
                       STATE_FINITE: _all_finite((params, opt_state))}
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                         "rng": state["rng"]}
            return new_state, metrics

        # a task's XLA:CPU compiler options (e.g. Mask R-CNN's memory-optimized scheduler)
        cpu = all(d.platform == "cpu" for d in self.mesh.devices.flat)
        self.train_step = jax.jit(
            train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=(0,),
            compiler_options=getattr(self.task, "CPU_COMPILER_OPTIONS", None) if cpu else None)

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


STATE_FINITE = "state_finite"  # a train_step metric; the loop pops it (never logged)


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


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
    position; unreadable steps are moved aside, and a step that does not fit the config
    raises `checkpoint.ConfigMismatchError`); 2. `config.init_from` (params only, for
    fine-tuning; undeclared missing or unexpected params fail); 3. fresh init."""
    config = trainer.config
    params_t, opt_t = trainer.targets()
    restored = ckpt.restore_latest(params_t, opt_t, model=config.model.name)
    if restored is not None:
        step, params, opt_state, data = restored
        log.info("resumed from %s step %d", ckpt.directory, step)
        return ({"params": params, "opt_state": opt_state, **trainer.step_and_rng(step)},
                {"resumed_step": step, **data})
    if config.get("init_from") and config.init_from.get("path"):
        # NOTE: process_allgather, not device_get: FSDP params may live on other hosts.
        fresh = multihost_utils.process_allgather(trainer.init_state()["params"], tiled=True)
        loaded, meta = checkpoint.load_params(config.init_from.path)
        # by path (merge_params), or through the declared mapping (init_from.mapping / rules)
        params, report = init_maps.init_params(fresh, loaded, meta, config.init_from)
        log.info("initialised from %s (%s): %d loaded, missing (kept from init) %s, unused %s",
                 config.init_from.path, meta.get("model"), len(report["loaded"]),
                 report["missing"], report["unexpected"])
        return trainer.state_from_params(params), {"init_from": report}
    return trainer.init_state(), {}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) training to `config.total_steps`; returns the last metrics."""
    validate_config(config)
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise runtime.WorkdirError(f"cannot create workdir {workdir}: "
                                   f"{checkpoint.write_cause(e)}") from e
    lock = _lock_workdir(workdir)
    try:
        return _train(config, workdir)
    finally:
        if lock is not None:
            lock.release()


def _lock_workdir(workdir: str) -> runtime.WorkdirLock | None:
    """Process 0 takes the workdir's lock; every process raises if it could not."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = runtime.WorkdirLock(workdir).acquire()
        except runtime.WorkdirError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - the other processes must hear of it too
            error = runtime.WorkdirError(f"cannot lock workdir {workdir}: {type(e).__name__}: {e}")
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise runtime.WorkdirError(f"process 0 could not lock workdir {workdir} (see its log)")
    if error is not None:
        raise error
    return lock


def _eval_due(config, step: int, total_steps: int) -> bool:
    every = config.get("eval_every") or 0
    return bool(every) and (step % every == 0 or step == total_steps)


class _EvalRecord:
    """`workdir/evals_done/step_N`: the eval of step N completed (metrics flushed)."""

    def __init__(self, workdir: str, enabled: bool):
        self.dir = os.path.join(workdir, "evals_done")
        self.enabled = enabled
        if enabled:
            os.makedirs(self.dir, exist_ok=True)

    def _path(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step:09d}")

    def done(self, step: int) -> bool:
        return os.path.exists(self._path(step))

    def mark(self, step: int) -> None:
        if self.enabled:
            with open(self._path(step), "w"):
                pass


def compile_ahead(fn, *args) -> None:
    """Compiles the jitted `fn` for `args` before its first call (the call then reuses
    the executable) and hands the host memory that compiling freed back to the OS
    (glibc `malloc_trim`; elsewhere a no-op). glibc keeps freed memory otherwise, and the
    first step's temporary buffers would come on top of it: about 0.8 GB of a Mask R-CNN
    R50-FPN train step's peak on XLA:CPU (benchmarks/README.md)."""
    fn.lower(*args).compile()
    xla_flags.release_host_memory()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    trainer = Trainer(config)
    task = trainer.task
    is_main = jax.process_index() == 0
    loader = task.make_loader(config, config.data.get("train_split", "train"), jax.process_index(),
                              jax.process_count())
    ckpt = checkpoint.TrainCheckpointer(workdir, config.checkpoint.save_every,
                                        config.checkpoint.keep, config.checkpoint.get("async_save", True))
    writer = progress = batches = None
    try:
        state, info = restore_or_init(trainer, ckpt)
        start = int(jax.device_get(state["step"]))
        # A killed run may have logged steps after the restored one: the resumed run
        # logs them again, and TensorBoard hides the orphans from purge_step on.
        writer = MetricWriter(os.path.join(workdir, "tensorboard"), enabled=is_main, purge_step=start + 1)
        evals = _EvalRecord(workdir, enabled=is_main)
        if "init_from" in info:
            writer.text("init_from", str(info["init_from"]), start)
        last: dict[str, float] = {}
        redo_eval = bool(start) and _eval_due(config, start, trainer.total_steps) and not evals.done(start)
        if jax.process_count() > 1:  # process 0's view decides: the eval is collective
            redo_eval = bool(multihost_utils.broadcast_one_to_all(np.int32(redo_eval)))
        if redo_eval:
            log.info("the eval of the restored step %d did not complete; running it again", start)
            last.update(_evaluate(trainer, state["params"], workdir, start, writer, evals))
        meta = _meta(config)
        progress = _progress(start, trainer.total_steps, is_main)
        t0, compile_logged = time.time(), False
        batches = loader.iterate(start)
        for step, local_batch in itertools.islice(batches, max(trainer.total_steps - start, 0)):
            batch = trainer.put_batch(local_batch)
            with trainer.mesh:
                if not compile_logged:
                    compile_ahead(trainer.train_step, state, batch)
                state, metrics = trainer.train_step(state, batch)
            metrics = jax.device_get(metrics)
            state_finite = bool(metrics.pop(STATE_FINITE))
            done = step + 1
            # Host-side finiteness check every step: a non-finite step must never reach a
            # checkpoint (saves below happen only after this check).
            if not (math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))
                    and state_finite):
                ckpt.wait()
                raise NonFiniteLossError(
                    f"non-finite {'loss/gradient' if state_finite else 'update'} at step {done} "
                    f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']}, params and "
                    f"optimizer state {'finite' if state_finite else 'NOT finite'}, "
                    f"lr={metrics['lr']}); stopped before saving. Last checkpoint: step "
                    f"{ckpt.latest_step()} in {ckpt.directory}")
            if not compile_logged:
                writer.scalar("perf/first_step_seconds", time.time() - t0, done)
                compile_logged = True
            last = {k: float(v) for k, v in metrics.items()}
            if done % config.log_every == 0 or done == trainer.total_steps:
                writer.scalars({f"train/{k}": v for k, v in last.items()}, done)
                progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
            progress.update(1)
            final = done == trainer.total_steps
            saving = ckpt.is_due(done, force=final)
            if _eval_due(config, done, trainer.total_steps):
                # The eval comes before the checkpoint of its step, so that a finalised
                # checkpoint implies a completed eval. If it raises, the step is still
                # saved (the resumed run redoes the eval: no evals_done record).
                try:
                    eval_metrics = _evaluate(trainer, state["params"], workdir, done, writer, evals)
                except Exception:
                    if saving:
                        writer.flush()
                        ckpt.save(done, state["params"], state["opt_state"], {"step": done}, meta,
                                  force=final)
                    raise
                progress.write(f"step {done} eval: " + " ".join(
                    f"{k.removeprefix('eval/')}={v:.4g}" for k, v in eval_metrics.items()))
                last.update(eval_metrics)
            if saving:
                writer.flush()  # every point up to `done` is on disk before its checkpoint
                ckpt.save(done, state["params"], state["opt_state"], {"step": done}, meta, force=final)
        batches.close()
        progress.close()
        ckpt.close()
    except BaseException:
        if progress is not None:
            progress.close()  # ends its line: the error report starts on a line of its own
        if batches is not None:
            batches.close()
        # Pending saves finish (or fail) quietly: the error being raised is the report.
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing checkpoints after an error: %s", e)
        raise
    finally:
        if writer is not None:
            writer.close()
    return last


def _evaluate(trainer, params, workdir: str, step: int, writer, evals: _EvalRecord) -> dict[str, float]:
    """Runs the task's eval at `step`, logs it, flushes and records it as done."""
    metrics = trainer.task.evaluate(trainer, params, workdir, step, writer)
    writer.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
    writer.flush()
    evals.mark(step)
    log.info("step %d eval: %s", step, {k: round(v, 5) for k, v in metrics.items()})
    return {f"eval/{k}": v for k, v in metrics.items()}


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
    """Restores the newest readable params in `workdir` and runs the task's evaluation."""
    validate_config(config, training=False)
    trainer = Trainer(config)
    params_t, _ = trainer.targets()
    meta = checkpoint.load_meta(workdir)
    if meta.get("model") != config.model.name:
        raise checkpoint.ConfigMismatchError(
            f"checkpoint step {meta['step']} in {checkpoint.resolve_dir(workdir)} holds model "
            f"{meta.get('model')!r}, but the config builds {config.model.name!r}")
    params, meta = checkpoint.load_params(workdir, target=params_t)
    step = int(meta["step"])
    writer = MetricWriter(os.path.join(workdir, "tensorboard_eval"), enabled=jax.process_index() == 0)
    try:
        metrics = trainer.task.evaluate(trainer, params, workdir, step, writer)
        writer.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
    finally:
        writer.close()
    return metrics


def run_entry_point(fn, *args, label: str) -> dict[str, float]:
    """`train.py` / `eval.py`: runs `fn(*args)` and prints its metrics as `label: k=v ...`.

    A `USER_ERRORS` exception (a config, checkpoint or workdir problem) prints one line
    `error: ...` and exits 1; its traceback is logged at DEBUG (`--verbosity=1`).
    """
    try:
        metrics = fn(*args)
    except USER_ERRORS as e:
        log.debug("traceback of the error below", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    log.info("%s metrics: %s", label, metrics)
    print(f"{label}:", " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                dynamic_ncols=True)
