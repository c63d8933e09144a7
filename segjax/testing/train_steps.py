"""Sharded == one device, step by step, for the task tests: a `Trainer`'s train step
compiled with given XLA options, and one step of a sharded and a one-device trainer
from the same state, compared through the loss metrics, Adam's moments and the params.

Why through the moments: after a step from the same state, Adam's `mu` and `nu` are
linear in the gradient and its square, so they compare the gradients themselves; the
parameter update lr * m / (sqrt(v) + eps) is ~lr * sign(g) where a gradient is near
zero, and there rounding noise of another reduction order flips it, so parameters can
only be held to the update's bound. Each step starts both sides from the same state
instead of chaining each side's own, which would compare that amplified noise (it
moves the next step's sampled prompts, RoIs and scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

# XLA backend optimisation level 0: the same program (HLO) on both sides, compiled in a
# fraction of the time (LLVM's optimisation passes skipped). For tests only.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled_step(tr, state: Any, batch: dict[str, np.ndarray], options: dict | None = FAST_COMPILE):
    """`tr.train_step` lowered for (state, batch) and compiled with XLA `options` (None:
    the default compile, as train.py runs it). Call it inside `with tr.mesh:`."""
    with tr.mesh:
        return tr.train_step.lower(state, tr.put_batch(batch)).compile(options)


def adam_moments(opt_state: Any) -> dict[str, np.ndarray]:
    """{path: value} of every leaf under an optax `mu` / `nu` field (host arrays)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(opt_state))[0]:
        if any(getattr(k, "name", None) in ("mu", "nu") for k in path):
            out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def assert_steps_match(tr, one, batches: Sequence[dict[str, np.ndarray]], metrics: Sequence[str], lr: float,
                       options: dict | None = FAST_COMPILE, step=None, rtol: float = 1e-5,
                       moment_rtol: float = 1e-4) -> tuple[dict, dict]:
    """Steps `tr` (sharded) and `one` (one device) over `batches`, each step from the
    same state (the first from `tr`'s init, the next from `one`'s state), and asserts:
    the scalar `metrics` within `rtol`; every Adam moment leaf within `moment_rtol` in
    norm (|a - b| / |b|, |b| at least 1e-3 of all mu (nu) leaves' norm); trained
    parameters within 2 * lr (Adam's bound on two updates of opposite sign), frozen ones
    (no moment) unchanged.

    step: `tr`'s compiled step (else compiled here with `options`).
    Returns (initial params, one-device params after the last step), host arrays.
    """
    start = tr.init_state()
    init = jax.device_get(start["params"])
    state_one = one.state_from_params(init)
    step = step or compiled_step(tr, start, batches[0], options)
    step_one = compiled_step(one, state_one, batches[0], options)
    state = start
    for i, batch in enumerate(batches):
        if i:
            with tr.mesh:
                state = jax.device_put(jax.device_get(state_one), tr.state_shardings)
        with tr.mesh:
            state, m = step(state, tr.put_batch(batch))
        with one.mesh:
            state_one, m_one = step_one(state_one, one.put_batch(batch))
        for k in metrics:
            np.testing.assert_allclose(float(m[k]), float(m_one[k]), rtol=rtol, atol=1e-7,
                                       err_msg=f"step {i + 1}: {k}")
        moments, moments_one = adam_moments(state["opt_state"]), adam_moments(state_one["opt_state"])
        assert moments and set(moments) == set(moments_one)
        # a leaf's error relative to its norm, floored at 1e-3 of all mu (nu) leaves' norm:
        # some gradients are zero in exact arithmetic (attention key biases) and noise here
        total = {m: np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for p, v in moments_one.items()
                                if f".{m}" in p)) for m in ("mu", "nu")}
        errs = {path: float(np.linalg.norm(moments[path] - want)) / max(
                    float(np.linalg.norm(want)), 1e-3 * total["mu" if ".mu" in path else "nu"], 1e-30)
                for path, want in moments_one.items()}
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
        print(f"step {i + 1}: worst Adam-moment errors (norm, relative)",
              {p: f"{e:.1e}" for p, e in worst})
        assert worst[0][1] <= moment_rtol, f"step {i + 1}: {worst}"
        mu = {p: v for p, v in moments_one.items() if ".mu" in p}
        params = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
        params_one = jax.tree_util.tree_leaves(jax.device_get(state_one["params"]))
        for (path, a), b in zip(params, params_one):
            key = jax.tree_util.keystr(path)
            diff = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0))
            if any(p.endswith(".mu" + key) for p in mu):
                assert diff <= 2 * lr, f"step {i + 1}: {key} off by {diff:.2e}"
            else:  # no moment (a frozen leaf): never updated
                assert diff == 0, f"step {i + 1}: frozen {key} moved"
    return init, jax.device_get(state_one["params"])
