"""SAM training rollout: with prompts fixed from outside it equals the official
`segment_anything` model run round by round in PyTorch (converted random tiny model:
logits and IoU predictions of every round, and the reference sam2 loss on the official
outputs); padding masks change nothing; randomness only from the key; the recipe's
no-point rounds; lowering of the jitted loss + gradient for TPU and GPU.

Slow: the gradient of the rollout loss w.r.t. every parameter equals autograd through
the official model round by round (mask prompts not detached, as sam2 trains).

Tolerance: logits within 1e-4 of the largest logit of their round, IoU predictions
within 1e-4 absolute, losses within 1e-4 relative, gradients within 1e-4 of each
parameter's largest gradient entry (float32; ours and torch sum in different orders and
round r feeds on round r - 1's logits)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import models
from segjax.models.sam import ABSENT
from segjax.models.sam.rollout import (
    FirstPrompt,
    FixedPrompts,
    check_rounds,
    rollout_loss,
    rollout_predictions,
    sample_no_point_rounds,
)
from segjax.testing import importorskip

R = 5  # rounds in the parity test: round 0, two points, a no-point round, the empty-region case


def _batch(s=256, g=64, b=1, m=3, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 255, (b, s, s, 3)).astype(np.float32)
    hw = np.array([[s, s * 3 // 4]] * b, np.int32)
    image[:, :, s * 3 // 4:] = 0  # zero padding bottom-right, as the loader pads
    masks = np.zeros((b, m, g, g), bool)
    boxes = np.zeros((b, m, 4), np.float32)
    r = s / g
    for i in range(b):
        for k in range(m):
            y0, x0 = rng.integers(2, g // 2, 2)
            hh, ww = rng.integers(6, g // 3, 2)
            masks[i, k, y0:y0 + hh, x0:x0 + ww] = True
            boxes[i, k] = [x0 * r, y0 * r, (x0 + ww) * r - 1, (y0 + hh) * r - 1]
    valid = np.ones((b, m), bool)
    valid[:, -1] = False  # the last slot is padding
    masks[:, -1] = False
    return dict(image=image, image_hw=hw, masks=masks, boxes=boxes, valid=valid)


def _fixed_prompts(batch):
    """Mask 0: a point first; mask 1: a box first; then per round a positive / negative
    point, a round without point (ABSENT) and one whose error region was empty (-1)."""
    b, m = batch["valid"].shape
    rng = np.random.default_rng(1)
    is_box = np.zeros((b, m), bool)
    is_box[:, 1] = True
    point = rng.uniform(20, 180, (b, m, 2)).astype(np.float32)
    box = batch["boxes"] + rng.normal(0, 3, (b, m, 4)).astype(np.float32)
    points = rng.uniform(0, 190, (b, m, R - 1, 2)).astype(np.float32)
    labels = np.array([[1, ABSENT, 0, -1], [0, 1, -1, ABSENT], [1, 1, 1, 1]], np.int32)[None].repeat(b, 0)
    first = FirstPrompt(jnp.asarray(is_box), jnp.asarray(point), jnp.ones((b, m), jnp.int32), jnp.asarray(box))
    return FixedPrompts(first, jnp.asarray(points), jnp.asarray(labels))


@pytest.fixture(scope="module")
def tiny_official():
    """(official random tiny SAM, our model, its converted params)."""
    importorskip("segment_anything")
    from segjax.convert import sam as conv
    from segjax.testing.sam_official import TINY, make_official

    official = make_official(TINY, seed=5)
    params, meta, _ = conv.from_state_dict({k: v.numpy() for k, v in official.state_dict().items()})
    return official, models.build(meta["model"], **meta["model_kwargs"]), params


def _official_rounds(official, batch, prompts, grad=False):
    """The official model, mask by mask and round by round: [(b, m, round, logits (K, L, L),
    iou (K,))] (numpy; torch tensors with `grad`), the mask prompt of round r the previous
    round's logits (the highest predicted IoU of 3), not detached (as sam2 trains)."""
    import torch

    out = []
    f = prompts.first
    with torch.set_grad_enabled(grad):
        for b in range(batch["image"].shape[0]):
            h, w = batch["image_hw"][b]
            x = torch.from_numpy(batch["image"][b, :h, :w]).permute(2, 0, 1)[None]
            emb = official.image_encoder(official.preprocess(x))
            pe = official.prompt_encoder.get_dense_pe()
            for m in range(batch["valid"].shape[1]):
                if not batch["valid"][b, m]:
                    continue
                is_box = bool(f.is_box[b, m])
                pts = [] if is_box else [np.array(f.point[b, m])]
                lbs = [] if is_box else [1]
                box = torch.from_numpy(np.array(f.box[b, m]))[None] if is_box else None
                mask_in = None
                for r in range(R):
                    if r and int(prompts.point_labels[b, m, r - 1]) in (0, 1):
                        pts.append(np.array(prompts.points[b, m, r - 1]))
                        lbs.append(int(prompts.point_labels[b, m, r - 1]))
                    points = None
                    if pts:
                        points = (torch.from_numpy(np.stack(pts))[None], torch.tensor([lbs], dtype=torch.int))
                    sparse, dense = official.prompt_encoder(points=points, boxes=box, masks=mask_in)
                    multi = r == 0 and not is_box
                    logits, iou = official.mask_decoder(image_embeddings=emb, image_pe=pe,
                                                        sparse_prompt_embeddings=sparse,
                                                        dense_prompt_embeddings=dense, multimask_output=multi)
                    best = int(iou[0].argmax())
                    mask_in = logits[:, best:best + 1]
                    out.append((b, m, r, logits[0], iou[0]) if grad else
                               (b, m, r, logits[0].numpy(), iou[0].numpy()))
    return out


@pytest.fixture(scope="module")
def parity(tiny_official):
    official, model, params = tiny_official
    batch = _batch()
    prompts = _fixed_prompts(batch)
    fn = jax.jit(lambda p, bt, pr: rollout_predictions(model, p, bt, pr))
    ours, loss, sums = fn(params, batch, prompts)
    return batch, prompts, jax.tree.map(np.asarray, ours), float(loss), sums, _official_rounds(
        official, batch, prompts)


def test_rollout_matches_official_round_by_round(parity):
    batch, prompts, ours, _, _, theirs = parity
    errors = []
    for b, m, r, logits, iou in theirs:
        if r == 0 and bool(prompts.first.is_box[b, m]):
            mine, mine_iou = ours["first_single_logits"][b, m][None], ours["first_single_iou"][b, m][None]
        elif r == 0:
            mine, mine_iou = ours["first_multimask_logits"][b, m], ours["first_multimask_iou"][b, m]
        else:
            mine, mine_iou = ours["logits"][r - 1, b, m][None], ours["iou"][r - 1, b, m][None]
        assert mine.shape == logits.shape, (b, m, r)
        err = float(np.abs(mine - logits).max() / np.abs(logits).max())
        errors.append(err)
        assert err < 1e-4, (b, m, r, err)
        np.testing.assert_allclose(mine_iou, iou, rtol=0, atol=1e-4, err_msg=str((b, m, r)))
    assert len(theirs) == 2 * R
    print("max relative logit error over rounds:", max(errors))


def _reference_loss(ref, batch, rounds):
    """sam2's MultiStepMultiMasksAndIous per real mask over its rounds, summed and divided
    by the number of real masks (the reference's normaliser for one batch): (core loss,
    components), torch scalars (differentiable when the rounds are)."""
    import torch

    weights = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0}
    n_valid = int(batch["valid"].sum())
    total, comps = 0.0, {k: 0.0 for k in weights}
    for b in range(batch["valid"].shape[0]):
        for m in range(batch["valid"].shape[1]):
            steps = [(lg, io) for bb, mm, _, lg, io in rounds if (bb, mm) == (b, m)]
            if not steps:
                continue
            outs = {"multistep_pred_multimasks_high_res": [torch.as_tensor(lg)[None] for lg, _ in steps],
                    "multistep_pred_ious": [torch.as_tensor(io)[None] for _, io in steps],
                    "multistep_object_score_logits": [torch.zeros(1, 1) for _ in steps]}
            target = torch.from_numpy(batch["masks"][b, m][None, None].astype(np.float32))
            lo = ref.MultiStepMultiMasksAndIous(dict(weights))([outs], target)
            total = total + lo["core_loss"] / n_valid
            for k in comps:
                comps[k] = comps[k] + lo[k] / n_valid
    return total, comps


def test_rollout_loss_matches_reference_on_official_outputs(parity):
    """sam2's MultiStepMultiMasksAndIous on the official model's rounds (per object,
    summed, divided by the number of real masks) equals our rollout's loss."""
    importorskip("torch")
    from segjax.testing import sam2_losses

    batch, prompts, _, loss, sums, theirs = parity
    total, comps = _reference_loss(sam2_losses.load(), batch, theirs)
    total, comps = float(total), {k: float(v) for k, v in comps.items()}
    assert abs(loss - total) < 1e-4 * abs(total), (loss, total)
    for k in comps:
        assert abs(float(sums[k]) - comps[k]) < 1e-4 * abs(comps[k]) + 1e-7, (k, float(sums[k]), comps[k])


@pytest.mark.slow
def test_rollout_gradients_match_official(tiny_official):
    """d loss / d every parameter (image encoder, prompt encoder, decoder) of our rollout
    equals autograd through the official model round by round with sam2's loss, the mask
    prompts not detached; torch's gradients mapped by the converter (linear layouts)."""
    importorskip("torch")
    from segjax.convert import sam as conv
    from segjax.testing import sam2_losses

    official, model, params = tiny_official
    batch = _batch()
    prompts = _fixed_prompts(batch)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: rollout_predictions(model, p, batch, prompts)[1]))(params)
    official.zero_grad()
    total, _ = _reference_loss(sam2_losses.load(), batch, _official_rounds(official, batch, prompts, grad=True))
    total.backward()
    named = dict(official.named_parameters())
    sd = {k: (named[k].grad if k in named and named[k].grad is not None else v * 0).numpy()
          for k, v in official.state_dict().items()}
    theirs, _, _ = conv.from_state_dict(sd)
    assert abs(float(loss) - float(total)) < 1e-4 * abs(float(total))
    errors, unreached = {}, []
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        if "positional_encoding_gaussian_matrix" in name:
            continue  # a fixed buffer in the official model: no gradient there
        t = theirs
        for k in path:
            t = t[k.key]
        g, scale = np.asarray(g), float(np.abs(t).max())
        if scale == 0:  # e.g. the hypernetwork of a mask never selected as the lowest-loss one
            unreached.append(name)
            assert not np.any(g), name
            continue
        if "k_proj" in name and name.endswith("['bias']"):
            # softmax(q (k + b)) = softmax(q k) per query: the gradient is 0 up to rounding on both sides
            assert max(scale, float(np.abs(g).max())) < 1e-5, name
            continue
        errors[name] = float(np.abs(g - t).max()) / scale
    # one point-first mask: at most one unused hypernetwork (3 layers), nothing else
    assert len(unreached) <= 6 and all("output_hypernetworks_mlps" in n for n in unreached), unreached
    assert len(errors) > 100
    worst = max(errors, key=errors.get)
    print("max relative gradient error:", worst, errors[worst])
    assert errors[worst] < 1e-4, (worst, errors[worst])


# ----------------------------------------------------------------------------- sampled rollout


@pytest.fixture(scope="module")
def tiny():
    """The tiny SAM with random parameters (shapes from eval_shape: no init compile)."""
    model = models.build("sam_vit_tiny")
    batch = _batch(b=2, m=3)
    z = np.zeros((2, 1, 2, 2), np.float32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch["image"], batch["image_hw"], z,
                                          np.ones((2, 1, 2), np.int32)))["params"]
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    leaves = [(rng.normal(size=x.shape) / np.sqrt(x.shape[0] if x.ndim > 1 else 25.0)).astype(np.float32)
              for x in leaves]
    return model, jax.tree.unflatten(tree, leaves), batch


def test_rollout_loss_padding_and_randomness(tiny):
    """The loss is finite, a function of the key alone, and blind to whatever the padding
    slots hold (here at a loss resolution G = 32 below the decoder's 64: resized logits)."""
    model, params, _ = tiny
    batch = _batch(g=32, b=2, m=3)
    # decoder-only (precomputed embeddings, as the task's embedding cache feeds them)
    batch["embeddings"] = np.random.default_rng(2).normal(size=(2, 16, 16, 32)).astype(np.float32)
    fn = jax.jit(lambda p, bt, k: rollout_loss(model, p, bt, k, num_rounds=4, train=False,
                                               image_embeddings=bt["embeddings"]))
    loss, metrics = fn(params, batch, jax.random.key(3))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(metrics["num_masks"]) == 4
    assert 0 <= float(metrics["iou_round1"]) <= 1 and 0 <= float(metrics["iou_last"]) <= 1
    again, _ = fn(params, batch, jax.random.key(3))
    other, _ = fn(params, batch, jax.random.key(4))
    assert float(again) == float(loss) and float(other) != float(loss)
    garbage = dict(batch)
    garbage["masks"] = batch["masks"].copy()
    garbage["masks"][:, -1] = True
    garbage["boxes"] = batch["boxes"].copy()
    garbage["boxes"][:, -1] = [np.nan, -1e9, np.inf, 3.0]
    g_loss, g_metrics = fn(params, garbage, jax.random.key(3))
    np.testing.assert_allclose(float(g_loss), float(loss), rtol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(float(g_metrics[k]), float(metrics[k]), rtol=1e-6, err_msg=k)


@pytest.mark.slow
def test_rollout_gradient_ignores_padding(tiny):
    """Gradients are finite and the padding slots' content does not change them."""
    model, params, batch = tiny
    fn = jax.jit(jax.grad(lambda p, bt: rollout_loss(model, p, bt, jax.random.key(0), num_rounds=3,
                                                      train=False)[0]))
    g = fn(params, batch)
    garbage = dict(batch, masks=batch["masks"].copy(), boxes=batch["boxes"].copy())
    garbage["masks"][:, -1] = True
    garbage["boxes"][:, -1] = [np.nan, -1e9, np.inf, 3.0]
    g2 = fn(params, garbage)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_no_point_rounds():
    skip = np.asarray(sample_no_point_rounds(jax.random.key(0), (500, 4), 11, 2))
    assert skip.shape == (500, 4, 10)
    assert skip[..., -1].all()  # the last round never adds a point
    assert (skip[..., :-1].sum(-1) == 1).all()  # one more among rounds 1 .. 9
    counts = skip[..., :-1].reshape(-1, 9).sum(0)
    assert np.all(np.abs(counts - 2000 / 9) < 5 * np.sqrt(2000 / 9)), counts  # uniform position
    assert not np.asarray(sample_no_point_rounds(jax.random.key(0), (3,), 11, 0)).any()
    assert np.asarray(sample_no_point_rounds(jax.random.key(0), (3,), 4, 3)).all()
    for bad in ((11, 11), (1, 1), (0, 0), (5, -1)):
        with pytest.raises(ValueError):
            check_rounds(*bad)


def test_lowers_for_tpu_and_cuda(tiny):
    """The jitted loss + gradient of the 11-round rollout lowers for TPU and GPU."""
    _, params, _ = tiny
    sds = jax.ShapeDtypeStruct
    batch = dict(image=sds((2, 256, 256, 3), jnp.float32), image_hw=sds((2, 2), jnp.int32),
                 masks=sds((2, 8, 64, 64), jnp.bool_), boxes=sds((2, 8, 4), jnp.float32),
                 valid=sds((2, 8), jnp.bool_))
    model = models.build("sam_vit_tiny", encoder_drop_path_rate=0.1)
    fn = jax.jit(jax.value_and_grad(lambda p, bt, k: rollout_loss(
        model, p, bt, k, train=True, dropout_rng=jax.random.fold_in(k, 1)), has_aux=True))
    exp = jax.export.export(fn, platforms=("tpu", "cuda"))(jax.eval_shape(lambda: params), batch,
                                                          sds((2,), jnp.uint32))  # a raw PRNG key
    assert exp.platforms == ("tpu", "cuda")
    assert "while" in exp.mlir_module()  # the rounds run in one scan
