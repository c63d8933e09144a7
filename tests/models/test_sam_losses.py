"""SAM training losses against the reference (`sam2` 1.1.0 training/loss_fns.py): values
and gradients (w.r.t. mask logits and IoU predictions) of each term and of the
multi-step, multi-mask combination; padding objects contribute exactly nothing.

Tolerance: float32 on both sides; values within 1e-5 relative, gradients within 1e-5
of the largest gradient entry (reduction orders differ)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models.sam import losses as L

RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    from segjax.testing import sam2_losses

    return sam2_losses.load()


def _data(n=6, k=3, hw=24, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, k, hw, hw)) * 3).astype(np.float32)
    yy, xx = np.mgrid[:hw, :hw]
    targets = np.stack([(yy - rng.uniform(4, hw - 4)) ** 2 + (xx - rng.uniform(4, hw - 4)) ** 2
                        < rng.uniform(9, 60) for _ in range(n)])
    targets[-1] = False  # an empty target
    # predictions near the targets for some masks, so IoUs are not all ~0
    logits[: n // 2, 0] += np.where(targets[: n // 2], 6.0, -6.0)
    ious = rng.uniform(0, 1, (n, k)).astype(np.float32)
    return logits, ious, targets


def _close(ours, theirs, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = max(float(np.abs(theirs).max()), 1e-12)
    err = float(np.abs(ours - theirs).max()) / scale
    assert err < RTOL, f"{what}: relative error {err:.2e}"


def test_terms_match_reference(ref):
    torch = pytest.importorskip("torch")
    logits, ious, targets = _data()
    x = torch.tensor(logits, requires_grad=True)
    s = torch.tensor(ious, requires_grad=True)
    t = torch.tensor(targets[:, None].repeat(3, 1), dtype=torch.float32)
    n_obj = 4.0
    cases = {
        "focal": (lambda: ref.sigmoid_focal_loss(x, t, n_obj, loss_on_multimask=True),
                  lambda a, b: L.sigmoid_focal_loss(a, targets[:, None]) / n_obj),
        "focal_a-1_g0": (lambda: ref.sigmoid_focal_loss(x, t, n_obj, alpha=-1, gamma=0, loss_on_multimask=True),
                         lambda a, b: L.sigmoid_focal_loss(a, targets[:, None], -1, 0) / n_obj),
        "focal_g1.5": (lambda: ref.sigmoid_focal_loss(x, t, n_obj, alpha=0.4, gamma=1.5, loss_on_multimask=True),
                       lambda a, b: L.sigmoid_focal_loss(a, targets[:, None], 0.4, 1.5) / n_obj),
        "dice": (lambda: ref.dice_loss(x, t, n_obj, loss_on_multimask=True),
                 lambda a, b: L.dice_loss(a, targets[:, None]) / n_obj),
        "iou_mse": (lambda: ref.iou_loss(x, t, s, n_obj, loss_on_multimask=True),
                    lambda a, b: L.iou_loss(a, targets[:, None], b) / n_obj),
        "iou_l1": (lambda: ref.iou_loss(x, t, s, n_obj, loss_on_multimask=True, use_l1_loss=True),
                   lambda a, b: L.iou_loss(a, targets[:, None], b, use_l1_loss=True) / n_obj),
    }
    w = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)  # a non-uniform cotangent
    for name, (theirs_fn, ours_fn) in cases.items():
        x.grad = s.grad = None
        theirs = theirs_fn()
        (theirs * torch.tensor(w)).sum().backward()
        ours, vjp = jax.vjp(ours_fn, jnp.asarray(logits), jnp.asarray(ious))
        gx, gs = vjp(jnp.asarray(w))
        _close(ours, theirs.detach().numpy(), name)
        _close(gx, x.grad.numpy() if x.grad is not None else np.zeros_like(logits), name + " d/dlogits")
        _close(gs, s.grad.numpy() if s.grad is not None else np.zeros_like(ious), name + " d/dious")


def _reference_multistep(ref, steps, targets, weights, **kwargs):
    """The reference loss, its components and gradients for steps [(logits, ious)]."""
    import torch

    xs = [torch.tensor(lg, requires_grad=True) for lg, _ in steps]
    ss = [torch.tensor(io, requires_grad=True) for _, io in steps]
    n = targets.shape[0]
    outs = {"multistep_pred_multimasks_high_res": xs, "multistep_pred_ious": ss,
            "multistep_object_score_logits": [torch.zeros(n, 1) for _ in steps]}
    loss_fn = ref.MultiStepMultiMasksAndIous(dict(weights), **kwargs)
    losses = loss_fn([outs], torch.tensor(targets[None], dtype=torch.float32))
    losses["core_loss"].backward()
    comps = {k: float(losses[k].detach()) for k in ("loss_mask", "loss_dice", "loss_iou")}

    def grad(t):  # None: the loss does not depend on t
        return np.zeros(tuple(t.shape), np.float32) if t.grad is None else t.grad.numpy()

    return float(losses["core_loss"].detach()), comps, [grad(x) for x in xs], [grad(s) for s in ss]


@pytest.mark.parametrize("opts", [{}, {"supervise_all_iou": True}, {"iou_use_l1_loss": True},
                                  {"focal_alpha": 0.5, "focal_gamma": 1.0}], ids=["default", "all_iou", "l1",
                                                                                  "alpha_gamma"])
def test_multistep_multimask_matches_reference(ref, opts):
    """3 steps as in the rollout: 3 masks (the lowest-loss one trained), then single masks."""
    pytest.importorskip("torch")
    weights = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0}
    logits, ious, targets = _data()
    l1, i1, _ = _data(k=1, seed=2)
    l2, i2, _ = _data(k=1, seed=3)
    steps = [(logits, ious), (l1, i1), (l2, i2)]
    loss, comps, gx, gs = _reference_multistep(ref, steps, targets, weights, **opts)

    def ours(step_arrays):
        valid = jnp.ones((targets.shape[0],), bool)
        return L.multistep_loss(step_arrays, jnp.asarray(targets), valid, weights=weights, **opts)

    (our_loss, our_comps), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(
        [(jnp.asarray(a), jnp.asarray(b)) for a, b in steps])
    _close(our_loss, loss, "core loss")
    for k in comps:
        _close(our_comps[k], comps[k], k)
    for i, (ga, gb) in enumerate(grads):
        _close(ga, gx[i], f"step {i} d/dlogits")
        _close(gb, gs[i], f"step {i} d/dious")
    # the multi-mask minimum is per object and not always the same mask
    s = L.step_losses(jnp.asarray(logits), jnp.asarray(ious), jnp.asarray(targets), jnp.ones(6, bool), 6.0)
    assert len(set(np.asarray(s.best).tolist())) > 1
    # only the selected mask gets a mask-loss gradient (IoU gradient aside)
    zero = np.abs(gx[0]).sum(axis=(2, 3)) == 0
    assert zero.sum() == 2 * logits.shape[0]


def test_single_mask_case_and_weights(ref):
    pytest.importorskip("torch")
    weights = {"loss_mask": 3.0, "loss_dice": 0.5, "loss_iou": 0.0}
    steps = [_data(k=1, seed=4)[:2]]
    targets = _data(k=1, seed=4)[2]
    loss, comps, gx, gs = _reference_multistep(ref, steps, targets, weights)
    (our_loss, our_comps), grads = jax.value_and_grad(
        lambda st: L.multistep_loss(st, jnp.asarray(targets), jnp.ones(6, bool), weights=weights),
        has_aux=True)([(jnp.asarray(a), jnp.asarray(b)) for a, b in steps])
    _close(our_loss, loss, "core loss")
    _close(grads[0][0], gx[0], "d/dlogits")
    assert not np.any(np.asarray(grads[0][1])) and not np.any(gs[0])  # zero IoU weight: no IoU gradient


def test_padding_contributes_exactly_zero(ref):
    """Padding objects (valid False), even with NaN / inf logits, change neither the loss
    nor any gradient, and their own gradients are exactly zero; the loss is the
    reference's on the real objects alone (normalised by their count)."""
    pytest.importorskip("torch")
    logits, ious, targets = _data(n=8)
    valid = np.array([1, 1, 0, 1, 1, 0, 1, 0], bool)
    l1, i1, _ = _data(n=8, k=1, seed=5)
    garbage = logits.copy()
    garbage[~valid] = np.nan
    garbage[2, 1] = np.inf
    g1 = l1.copy()
    g1[~valid] = -np.inf
    weights = dict(L.DEFAULT_WEIGHTS)
    loss, comps, gx, gs = _reference_multistep(ref, [(logits[valid], ious[valid]), (l1[valid], i1[valid])],
                                               targets[valid], weights)

    def ours(st):
        return L.multistep_loss(st, jnp.asarray(targets), jnp.asarray(valid), weights=weights)

    (our_loss, _), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(
        [(jnp.asarray(garbage), jnp.asarray(ious)), (jnp.asarray(g1), jnp.asarray(i1))])
    _close(our_loss, loss, "core loss")
    for i, (ga, gb) in enumerate(grads):
        ga, gb = np.asarray(ga), np.asarray(gb)
        assert np.all(ga[~valid] == 0) and np.all(gb[~valid] == 0), i
        _close(ga[valid], gx[i], f"step {i} d/dlogits")
        _close(gb[valid], gs[i], f"step {i} d/dious")
    # no real object: loss 0 (num_objects clamps to 1), finite
    none = L.multistep_loss([(jnp.asarray(garbage), jnp.asarray(ious))], jnp.asarray(targets),
                            jnp.zeros(8, bool))[0]
    assert float(none) == 0.0
