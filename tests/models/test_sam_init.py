"""A fresh SAM's prompt encoder and mask decoder start from segment_anything's init
(torch's defaults, segjax.models.sam.init), the init of training from scratch.

The learned token tables are `nn.Embedding`s, N(0, 1), not flax's `nn.Embed` default
(N(0, 1/C)): the point-label, not-a-point, no-mask, IoU and mask tokens are added to or
compared with unit-scale random-Fourier position encodings, so 1/sqrt(C) tables start
the labels nearly indistinguishable. Linear / conv kernels and biases are torch's
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), checked against the official modules' own init."""

import flax.linen as nn
import jax
import numpy as np

from segjax import models
from segjax.testing import importorskip

TABLES = ("prompt_encoder/point_embeddings_0", "prompt_encoder/point_embeddings_1",
          "prompt_encoder/point_embeddings_2", "prompt_encoder/point_embeddings_3",
          "prompt_encoder/not_a_point_embed", "prompt_encoder/no_mask_embed",
          "mask_decoder/iou_token", "mask_decoder/mask_tokens")


def test_fresh_sam_token_tables_are_unit_normal_as_torch():
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64)
    params = nn.meta.unbox(model.init(
        jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), np.array([[64, 64]], np.int32),
        np.zeros((1, 1, 1, 2), np.float32), np.ones((1, 1, 1), np.int32))["params"])
    values = []
    for path in TABLES:
        node = params
        for key in path.split("/"):
            node = node[key]
        values.append(np.asarray(node["embedding"]).ravel())
    v = np.concatenate(values)  # 11 rows of C = 32 (flax's default: std ~0.18)
    assert 0.85 < v.std() < 1.15 and abs(v.mean()) < 0.15, (v.std(), v.mean())


# the shapes config's widths (configs/sam/shapes.py): more values per leaf than the registry's tiny
WIDE = dict(prompt_embed_dim=64, decoder_mlp_dim=256, iou_head_hidden_dim=64)
TRAINED_FROM_SCRATCH = ("prompt_encoder/", "mask_decoder/")


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.asarray(value, np.float64)
    return out


def _official_bounds_and_draws():
    """torch's own init of the official modules with these widths, in segjax's layout:
    (U bound of every Linear / Conv2d / ConvTranspose2d weight and bias, torch's draws).
    The bounds go through the converter as constant tensors, so each lands on the leaf
    (and layout) the converter maps it to."""
    torch = importorskip("torch")
    importorskip("segment_anything")
    from segjax.convert import sam as convert_sam
    from segjax.testing import sam_official

    cfg = dict(sam_official.TINY, c=WIDE["prompt_embed_dim"], dec_mlp=WIDE["decoder_mlp_dim"],
               iou_hidden=WIDE["iou_head_hidden_dim"])
    torch.manual_seed(0)
    official = sam_official.build_official(cfg)
    draws = {k: v.detach().numpy() for k, v in official.state_dict().items()}
    bounds = {k: np.full(v.shape, np.nan, np.float32) for k, v in draws.items()}
    for name, mod in official.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(mod.weight)
            for p in ("weight", "bias"):
                if getattr(mod, p) is not None:
                    bounds[f"{name}.{p}"][...] = 1.0 / np.sqrt(fan_in)
    to_ours = lambda sd: _flat(convert_sam.from_state_dict(sd)[0])  # noqa: E731
    return to_ours(bounds), to_ours(draws)


def test_fresh_sam_decoder_draws_torch_default_init():
    """Every Linear / Conv2d / ConvTranspose2d kernel and bias of a fresh prompt encoder
    and mask decoder (two-way transformer included) is U(-b, b) with torch's b =
    1/sqrt(fan_in) (a transposed conv's fan_in from its OUTPUT channels): nothing
    outside the bound, each leaf's std that of U(-b, b) within its sampling error, and
    the pooled normalised values (x / b) match torch's own draws. Flax's defaults
    (lecun_normal kernels with 3x the variance, zero biases) fail every check; norms
    start at ones / zeros as torch's."""
    bounds, torch_draws = _official_bounds_and_draws()
    model = models.build("sam_vit_tiny", img_size=64, pretrain_img_size=64, **WIDE)
    ours = _flat(nn.meta.unbox(model.init(
        jax.random.key(1), np.zeros((1, 64, 64, 3), np.float32), np.array([[64, 64]], np.int32),
        np.zeros((1, 1, 1, 2), np.float32), np.ones((1, 1, 1), np.int32))["params"]))
    assert set(ours) == set(bounds)
    pooled, pooled_torch, checked = [], [], 0
    for path, b in bounds.items():
        if not path.startswith(TRAINED_FROM_SCRATCH):
            continue
        x = ours[path]
        if np.isnan(b).all():  # norms, token tables, the Fourier matrix
            if path.endswith("/scale"):
                np.testing.assert_array_equal(x, 1.0, err_msg=path)
            elif path.endswith("/bias"):
                np.testing.assert_array_equal(x, 0.0, err_msg=path)
            continue
        bound = float(b.flat[0])
        n = x.size
        assert np.abs(x).max() <= bound * (1 + 1e-6), (path, np.abs(x).max(), bound)
        if n >= 32:  # std of U(-b, b) = b / sqrt(3); the sample std's relative error ~ 0.45 / sqrt(n)
            ratio = x.std() / (bound / np.sqrt(3))
            assert abs(ratio - 1) < 4 * 0.45 / np.sqrt(n), (path, ratio, n)
        pooled.append(x.ravel() / bound)
        pooled_torch.append(torch_draws[path].ravel() / bound)
        checked += 1
    assert checked >= 60, checked  # every layer of the transformer, hypernetworks, IoU head, convs
    u, t = np.concatenate(pooled), np.concatenate(pooled_torch)
    assert u.size > 50_000
    for v in (u, t):  # U(-1, 1): mean 0, std 1/sqrt(3), |v| <= 1
        assert abs(v.mean()) < 0.01 and abs(v.std() * np.sqrt(3) - 1) < 0.01, (v.mean(), v.std())
    # the same distribution as torch's draws (two-sample: quantiles of U(-1, 1))
    q = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(u, q), np.quantile(t, q), atol=0.03)
