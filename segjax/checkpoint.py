"""The only module that talks to Orbax.

A segjax checkpoint directory is an Orbax `CheckpointManager` root: one sub-directory
per step, each with the items

  params     the model parameters (pytree of arrays)
  opt_state  optimizer state, step and RNG (training runs only)
  data       the input pipeline position (JSON)
  meta       JSON: {'model': registry name, 'model_kwargs': {...}, ...}

so `from_checkpoint(dir)` and `init_from` need nothing else. A training workdir keeps
its checkpoints in `workdir/checkpoints`; every function here accepts either.

Failures are told apart and reported in one line each (Orbax's own tracebacks go to
the DEBUG logger `segjax.orbax`):
  unreadable step   its data cannot be read back (truncated, corrupt): readers fall back
                    to an older step; the training run (`TrainCheckpointer`) also moves
                    it aside to `<step>.corrupt`, which Orbax ignores, so the step is
                    written again and does not hold a keep slot
  config mismatch   a readable step whose tree (paths, shapes, dtypes) or model is not the
                    config's: `ConfigMismatchError` naming the leaves; nothing is touched
  write failure     full disk, read-only or unwritable directory: `CheckpointWriteError`
                    naming the directory and the cause
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback
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
    # Handlers named up front (not inferred from the first save or restore) so that
    # `item_metadata` describes a step before anything is restored from it.
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=create, **options),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def _valid_steps_newest_first(mngr: ocp.CheckpointManager) -> list[int]:
    # Orbax lists only finalised steps; a save killed mid-write leaves a temporary
    # directory that is not listed (and is cleaned up on the next save).
    return sorted(mngr.all_steps(), reverse=True)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class ConfigMismatchError(CheckpointError):
    """A readable checkpoint that does not fit the config (another model or optimizer)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, read-only or unwritable directory)."""


_orbax_log = logging.getLogger("segjax.orbax")


class _OrbaxErrorsToDebug(logging.Filter):
    """Orbax logs each failure of its worker threads as an ERROR with a traceback (dozens
    for one full disk); the same failure reaches our caller as an exception, which is
    reported once. Those records go to the DEBUG logger `segjax.orbax` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in (record.pathname or ""):
            return True
        # also its notes on read-only managers (every reader opens one)
        if record.levelno >= logging.ERROR or "read only" in record.getMessage() \
                or "read_only=True" in record.getMessage():
            _orbax_log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


class _OrbaxLeftoverFuturesToDebug(logging.Filter):
    """When one read or write of an Orbax operation fails, the operation raises (and is
    reported once) while its sibling TensorStore futures fail too; asyncio logs each of
    those at garbage collection as 'Future exception was never retrieved'. Those, and
    only those (the exception passed through Orbax or TensorStore), go to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage():
            return True
        exc = record.exc_info[1] if record.exc_info else None
        frames = [] if exc is None else [f.filename for f, _ in traceback.walk_tb(exc.__traceback__)]
        text = record.getMessage() + " " + str(exc)
        if any(f"{os.sep}orbax{os.sep}" in f or "tensorstore" in f for f in frames) \
                or "OCDBT" in text or "tensorstore" in text:
            _orbax_log.debug("%s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


def _closed_loop_callbacks_to_debug(previous):
    """After one write of an async save fails, Orbax closes its event loop while
    TensorStore still completes the other writes; each completion's callback then
    raises 'Event loop is closed' into `sys.unraisablehook` (hundreds of tracebacks).
    Those go to the DEBUG logger `segjax.orbax`; anything else to `previous`."""

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            _orbax_log.debug("callback after a failed async operation: %s", e)
            return
        previous(unraisable)

    hook.segjax_quiet = True
    return hook


if not any(isinstance(f, _OrbaxErrorsToDebug) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_OrbaxErrorsToDebug())
if not any(isinstance(f, _OrbaxLeftoverFuturesToDebug) for f in logging.getLogger("asyncio").filters):
    logging.getLogger("asyncio").addFilter(_OrbaxLeftoverFuturesToDebug())
if not getattr(sys.unraisablehook, "segjax_quiet", False):
    sys.unraisablehook = _closed_loop_callbacks_to_debug(sys.unraisablehook)


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (at most `limit` characters) for error messages."""
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def write_cause(e: BaseException) -> str:
    """What a failed write means, in words. Orbax and TensorStore wrap the OS error (e.g.
    'RESOURCE_EXHAUSTED: ... [os_error_code='28']'); the exception, its causes and
    contexts are searched for it."""
    words = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.EFBIG: "file too large (a file size limit)"}
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        code = x.errno if isinstance(x, OSError) else None
        if code is None:
            m = re.search(r"os_error_code='?(\d+)", str(x))
            code = int(m.group(1)) if m else None
        if code is not None:
            return words.get(code) or os.strerror(code).lower()
        for needle, code in (("No space left", errno.ENOSPC), ("RESOURCE_EXHAUSTED", errno.ENOSPC),
                             ("Read-only file system", errno.EROFS), ("Permission denied", errno.EACCES)):
            if needle in str(x):
                return words[code]
        todo += [x.__cause__, x.__context__]
    return one_line(e)


def _describe(leaf) -> str:
    return f"{tuple(getattr(leaf, 'shape', ()))} {np.dtype(leaf.dtype).name}"


def tree_mismatches(target: PyTree, saved: PyTree, limit: int = 4) -> list[str]:
    """Differences between a restore target and a checkpoint's metadata tree, one line
    per leaf ('path: checkpoint ... vs config ...'), at most `limit` of each kind
    (other shape or dtype, not in the checkpoint, not in the config) and a count of the
    rest; [] when they fit."""
    want, have = _flatten(target), _flatten(saved)  # None subtrees hold no leaves

    def sig(leaf):
        return tuple(getattr(leaf, "shape", ())), np.dtype(leaf.dtype)

    kinds = {
        "other shape or dtype": [f"{p}: checkpoint {_describe(have[p])} vs config {_describe(want[p])}"
                                 for p in sorted(set(want) & set(have)) if sig(want[p]) != sig(have[p])],
        "not in the checkpoint": [f"{p}: not in the checkpoint (config: {_describe(want[p])})"
                                  for p in sorted(set(want) - set(have))],
        "not in the config": [f"{p}: in the checkpoint ({_describe(have[p])}), not in the config"
                              for p in sorted(set(have) - set(want))],
    }
    lines = []
    for kind, items in kinds.items():
        lines += items[:limit]
        if len(items) > limit:
            lines.append(f"... and {len(items) - limit} more leaves with {kind}"
                         if kind.startswith("other") else f"... and {len(items) - limit} more {kind}")
    return lines


def _item_tree(metadata, item: str):
    """The metadata tree of one item of a step (raises if it cannot be read)."""
    md = metadata[item]
    if md is None:
        raise CheckpointError(f"no metadata for item {item!r}")
    return getattr(md, "tree", md)


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
    A step whose data cannot be read is reported (one line) and the previous one is
    tried; a readable step that does not fit `target` raises `ConfigMismatchError`.
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
                saved = _item_tree(mngr.item_metadata(step), "params")
            except Exception as e:  # noqa: BLE001 - any failure means "this step is unusable"
                errors.append(_unreadable(root, step, e, "trying an older one"))
                continue
            if target is not None:
                bad = tree_mismatches(target, saved)
                if bad:
                    raise ConfigMismatchError(
                        f"checkpoint step {step} in {root} (model {meta.get('model')!r}) does not "
                        "fit the config's params:\n  " + "\n  ".join(bad))
            try:
                # NOTE: without a target Orbax rebuilds the saving run's shardings, which
                # fails under another process or device count (a checkpoint written by
                # a multi-host run); numpy leaves restore on the host for any topology.
                host = target is None and jax.tree_util.tree_map(
                    lambda m: np.empty(m.shape, m.dtype), saved)
                params = mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(host or target)))["params"]
            except Exception as e:  # noqa: BLE001
                errors.append(_unreadable(root, step, e, "trying an older one"))
                continue
            if target is None:
                params = jax.tree_util.tree_map(np.asarray, params)
            return params, meta
        raise CheckpointError(f"no readable checkpoint in {root} ({'; '.join(errors)})")


def _unreadable(root: str, step: int, e: BaseException, then: str) -> str:
    """Logs one line for an unreadable step; returns 'step N: cause'."""
    cause = one_line(e, limit=200)
    log.warning("checkpoint step %d in %s is unreadable (%s); %s", step, root, cause, then)
    _orbax_log.debug("step %d in %s", step, root, exc_info=e)
    return f"step {step}: {cause}"


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

    Only the run that holds the workdir (its lock) creates one. On resume a step whose
    data cannot be read is moved aside to `<step>.corrupt` (so it is written again and
    holds no keep slot) and the next older one is tried; a readable step that does not
    fit the config raises `ConfigMismatchError` before anything is written or deleted.
    Write failures raise `CheckpointWriteError`.
    """

    def __init__(self, directory: str | os.PathLike, save_every: int, keep: int,
                 async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.fspath(directory)), "checkpoints")
        self.save_every = int(save_every)
        if self.save_every <= 0:
            raise ValueError(f"checkpoint.save_every must be positive, got {save_every}")
        if int(keep) < 1:
            raise ValueError(f"checkpoint.keep must be at least 1 (the newest checkpoint), got {keep}")
        try:
            self._mngr = _manager(self.directory, max_to_keep=int(keep),
                                  enable_async_checkpointing=async_save)
        except Exception as e:  # noqa: BLE001
            raise CheckpointWriteError(f"cannot create the checkpoint directory {self.directory}: "
                                       f"{write_cause(e)}") from e
        self._pending: int | None = None  # the step of a save that may still be running

    def latest_step(self) -> int | None:
        steps = _valid_steps_newest_first(self._mngr)
        return steps[0] if steps else None

    def is_due(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, ..., force)` would write (the step is due and not on disk)."""
        # NOTE: the due-check is ours, not Orbax's interval logic, which also saves the
        # very first step it sees.
        return (force or step % self.save_every == 0) and step not in self._mngr.all_steps()

    def save(self, step: int, params: PyTree, opt_state: PyTree, data: dict, meta: dict,
             force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started."""
        if not self.is_due(step, force):
            return False
        try:
            started = self._mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, **meta})), force=True)
        except Exception as e:  # noqa: BLE001 - also the failure of an earlier async save
            raise self._write_error(self._pending or step, e) from e
        self._pending = step
        return started

    def _write_error(self, step: int | None, e: BaseException) -> CheckpointWriteError:
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return CheckpointWriteError(f"cannot write {what} to {self.directory}: {write_cause(e)}")

    def restore_latest(self, params_target: PyTree, opt_target: PyTree, model: str | None = None):
        """Returns (step, params, opt_state, data) of the newest readable step, or None.

        Args:
          params_target, opt_target: ShapeDtypeStructs (with shardings) of the config's
            state; a step whose trees differ raises `ConfigMismatchError`.
          model: the config's registry model name; a step of another model raises too.
        """
        moved = False
        result = None
        for step in _valid_steps_newest_first(self._mngr):
            try:
                metadata = self._mngr.item_metadata(step)
                saved = {k: metadata[k] for k in ("params", "opt_state")}
                saved = {k: getattr(v, "tree", v) for k, v in saved.items()}
                meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - metadata unreadable: the step is unusable
                moved |= self._set_aside(step, e)
                continue
            self._check_fits(step, saved, meta, params_target, opt_target, model)
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_target),
                    opt_state=ocp.args.StandardRestore(opt_target),
                    data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001
                moved |= self._set_aside(step, e)
                continue
            result = step, out["params"], out["opt_state"], out["data"]
            break
        if moved:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("segjax_checkpoints_set_aside")
            self._mngr.reload()
        return result

    def _check_fits(self, step, saved, meta, params_target, opt_target, model) -> None:
        where = f"checkpoint step {step} in {self.directory}"
        missing = [k for k, v in saved.items() if v is None]
        if missing:  # not a training checkpoint (e.g. converted params): never moved aside
            raise ConfigMismatchError(f"{where} has no {' or '.join(missing)}: it is not a training "
                                      "checkpoint of this loop; nothing was changed or deleted")
        if model is not None and meta.get("model") not in (None, model):
            raise ConfigMismatchError(
                f"{where} holds model {meta.get('model')!r} but the config builds {model!r}: it was "
                "written by another config. Use another workdir or the config that wrote it; "
                "nothing was changed or deleted")
        bad = [f"params/{x}" for x in tree_mismatches(params_target, saved["params"])]
        bad += [f"opt_state/{x}" for x in tree_mismatches(opt_target, saved["opt_state"])]
        if bad:
            raise ConfigMismatchError(
                f"{where} does not fit the config's train state (it was written by another "
                "config: model, optimizer or their settings differ). Use another workdir or the "
                "config that wrote it; nothing was changed or deleted. Differences:\n  "
                + "\n  ".join(bad))

    def _set_aside(self, step: int, e: BaseException) -> bool:
        """Moves an unreadable step to `<step>.corrupt[.N]` (process 0); returns True."""
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt"
        n = 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.corrupt.{n}"
        _unreadable(self.directory, step, e, f"moved aside to {os.path.basename(dst)}, trying an older one")
        if jax.process_index() == 0:
            try:
                os.rename(src, dst)
            except OSError as err:
                raise CheckpointWriteError(f"cannot move the unreadable checkpoint {src} aside: "
                                           f"{write_cause(err)}") from err
        return True

    def wait(self) -> None:
        """Blocks until a started save is on disk."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._pending, e) from e
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._mngr.close()
            except Exception as e:  # noqa: BLE001 - already reported by wait()
                _orbax_log.debug("closing the checkpoint manager: %s", e, exc_info=e)
