"""The only module that talks to Orbax.

A segjax checkpoint directory is an Orbax `CheckpointManager` root: one sub-directory
per step, each with the items

  params     the model parameters (pytree of arrays)
  opt_state  optimizer state, step and RNG (training runs only)
  data       the input pipeline position (JSON)
  meta       JSON: {'model': registry name, 'model_kwargs': {...}, ...}

so `from_checkpoint(dir)` and `init_from` need nothing else. A training workdir keeps
its checkpoints in `workdir/checkpoints`; every function here accepts either.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

PyTree = Any
FORMAT_VERSION = 1


def resolve_dir(directory: str | os.PathLike) -> str:
    """Returns the CheckpointManager root for a workdir or a checkpoint directory."""
    directory = os.path.abspath(os.fspath(directory))
    sub = os.path.join(directory, "checkpoints")
    return sub if os.path.isdir(sub) else directory


def _manager(directory: str, create: bool = True, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=create, **options),
        item_names=("params", "opt_state", "data", "meta"),
    )


def _valid_steps_newest_first(mngr: ocp.CheckpointManager) -> list[int]:
    # Orbax lists only finalised steps; a save killed mid-write leaves a temporary
    # directory that is not listed (and is cleaned up on the next save).
    return sorted(mngr.all_steps(), reverse=True)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def save_params(directory: str | os.PathLike, params: PyTree, meta: dict, step: int = 0) -> str:
    """Writes a params-only checkpoint (converters, exported models). Returns the root."""
    directory = os.path.abspath(os.fspath(directory))
    meta = {"format_version": FORMAT_VERSION, **meta}
    with _manager(directory, enable_async_checkpointing=False) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)), force=True)
        mngr.wait_until_finished()
    return directory


def load_meta(directory: str | os.PathLike) -> dict:
    """The `meta` item of the newest readable checkpoint."""
    return load_params(directory, meta_only=True)[1]


def load_params(directory: str | os.PathLike, target: PyTree | None = None,
                meta_only: bool = False) -> tuple[PyTree | None, dict]:
    """Restores `(params, meta)` from the newest readable step.

    `target`, if given, is a pytree of `jax.ShapeDtypeStruct` (with shardings) or
    arrays describing how to place the result; otherwise params come back as numpy.
    A step that fails to restore is reported and the previous one is tried.
    """
    root = resolve_dir(directory)
    if not os.path.isdir(root):
        raise CheckpointError(f"no checkpoint directory at {root}")
    # Handlers named up front (not inferred from the first restore) so that
    # `item_metadata` describes params before they are restored.
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"params": ocp.StandardCheckpointHandler(),
                                              "meta": ocp.JsonCheckpointHandler()}) as mngr:
        steps = _valid_steps_newest_first(mngr)
        if not steps:
            raise CheckpointError(f"{root} holds no finalised checkpoint")
        errors = []
        for step in steps:
            try:
                meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                meta = {**meta, "step": step}
                if meta_only:
                    return None, meta
                # NOTE: without a target Orbax rebuilds the saving run's shardings, which
                # fails under another process or device count (a checkpoint written by
                # a multi-host run); numpy leaves restore on the host for any topology.
                host = target is None and jax.tree_util.tree_map(
                    lambda m: np.empty(m.shape, m.dtype), mngr.item_metadata(step)["params"].tree)
                params = mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(host or target)))["params"]
                if target is None:
                    params = jax.tree_util.tree_map(np.asarray, params)
                return params, meta
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                            step, root, type(e).__name__, e)
                errors.append((step, e))
        raise CheckpointError(f"no readable checkpoint in {root}: {errors}")


def merge_params(init: PyTree, loaded: PyTree, allow_missing: Sequence[str] = (),
                 allow_unexpected: Sequence[str] = ()) -> tuple[PyTree, dict[str, list[str]]]:
    """Fills `init` with `loaded` leaves by '/'-joined path.

    Args:
      init: freshly initialised params (the model being fine-tuned).
      loaded: params from a checkpoint (e.g. MAE pretraining).
      allow_missing: regexes of `init` paths that may be absent from `loaded` (kept
        from init, e.g. a new classifier `head`).
      allow_unexpected: regexes of `loaded` paths that may go unused (e.g. the MAE
        decoder).
    Returns:
      (params, report) with report {'missing', 'unexpected', 'loaded'} path lists.
    Raises:
      ValueError on an undeclared missing/unexpected path or a shape mismatch.
    """
    flat_init = _flatten(init)
    flat_loaded = _flatten(loaded)
    missing = sorted(set(flat_init) - set(flat_loaded))
    unexpected = sorted(set(flat_loaded) - set(flat_init))
    bad_missing = [p for p in missing if not _matches(p, allow_missing)]
    bad_unexpected = [p for p in unexpected if not _matches(p, allow_unexpected)]
    shape_errors = [f"{p}: checkpoint {np.shape(flat_loaded[p])} vs model {np.shape(flat_init[p])}"
                    for p in set(flat_init) & set(flat_loaded)
                    if np.shape(flat_loaded[p]) != np.shape(flat_init[p])]
    if bad_missing or bad_unexpected or shape_errors:
        raise ValueError(
            "checkpoint does not fit the model:\n"
            f"  missing (not declared in allow_missing): {bad_missing}\n"
            f"  unexpected (not declared in allow_unexpected): {bad_unexpected}\n"
            f"  shape mismatches: {sorted(shape_errors)}")
    out = {p: (flat_loaded[p] if p in flat_loaded else v) for p, v in flat_init.items()}
    report = {"missing": missing, "unexpected": unexpected,
              "loaded": sorted(set(flat_init) & set(flat_loaded))}
    return _unflatten_like(init, out), report


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def _flatten(tree: PyTree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in flat}


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _unflatten_like(tree: PyTree, flat: dict[str, Any]) -> PyTree:
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    treedef = jax.tree_util.tree_structure(tree)
    leaves = [flat["/".join(_key_str(k) for k in path)] for path, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def flatten_paths(tree: PyTree) -> dict[str, Any]:
    """'/'-joined path -> leaf (public for converters and reports)."""
    return _flatten(tree)


class TrainCheckpointer:
    """Periodic async saves of the whole train state, keep-K, resume from the newest.

    Resume falls back to older steps when the newest is corrupt (reported in the log).
    """

    def __init__(self, directory: str | os.PathLike, save_every: int, keep: int,
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.fspath(directory)), "checkpoints")
        self.save_every = int(save_every)
        if self.save_every <= 0:
            raise ValueError(f"checkpoint.save_every must be positive, got {save_every}")
        self._mngr = _manager(self.directory, max_to_keep=keep,
                              enable_async_checkpointing=async_save)

    def latest_step(self) -> int | None:
        steps = _valid_steps_newest_first(self._mngr)
        return steps[0] if steps else None

    def save(self, step: int, params: PyTree, opt_state: PyTree, data: dict, meta: dict,
             force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started."""
        # NOTE: the due-check is ours, not Orbax's interval logic, which also saves the
        # very first step it sees.
        if not (force or step % self.save_every == 0) or step in self._mngr.all_steps():
            return False
        return self._mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, **meta})), force=True)

    def restore_latest(self, params_target: PyTree, opt_target: PyTree):
        """Returns (step, params, opt_state, data) of the newest readable step, or None."""
        for step in _valid_steps_newest_first(self._mngr):
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target),
                    opt_state=ocp.args.StandardRestore(opt_target),
                    data=ocp.args.JsonRestore()))
                return step, out["params"], out["opt_state"], out["data"]
            except Exception as e:  # noqa: BLE001
                log.error("checkpoint step %d in %s is unreadable (%s: %s); falling back to an "
                          "older step", step, self.directory, type(e).__name__, e)
        return None

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
