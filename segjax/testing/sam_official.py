"""Seeded random official `segment_anything` models and prompts for SAM parity tests.

Shared by tests/convert/test_sam_convert.py (model parity) and tests/inference/
test_sam_*.py (predictor / automatic mask generator parity).

`make_official(cfg, seed)` builds `segment_anything.modeling.Sam` from the official
classes with the numbers of `TINY` (the registry's `sam_vit_tiny`) or `VIT_B`, then
`randomize_` gives every parameter a seeded random value: the official init leaves
the position and relative-position tables at zero, and a test must see every tensor.
`prompt_cases` are predictor prompts on an (H, W) image; `to_tokens` turns one into
the model's (coords, labels) tokens in the official order.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn


def _numbers(name: str) -> dict:
    """The official builder's numbers of a registered SAM (read from its fields; no init).

    c: prompt width; dec_heads is invisible in a state dict (8 is the official number).
    """
    from segjax import models

    m = models.build(name)
    return dict(img=m.img_size, patch=m.patch_size, dim=m.encoder_embed_dim, depth=m.encoder_depth,
                heads=m.encoder_num_heads, window=m.window_size, global_idx=tuple(m.encoder_global_attn_indexes),
                c=m.prompt_embed_dim, mask_in=m.mask_in_chans, dec_depth=m.decoder_depth, dec_mlp=m.decoder_mlp_dim,
                dec_heads=m.decoder_num_heads, iou_hidden=m.iou_head_hidden_dim)


TINY = _numbers("sam_vit_tiny")
VIT_B = _numbers("sam_vit_b")


def build_official(cfg: dict = TINY) -> nn.Module:
    """The official model with these numbers (official init), eval mode."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = cfg["img"] // cfg["patch"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["depth"], embed_dim=cfg["dim"], img_size=cfg["img"], mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg["heads"], patch_size=cfg["patch"],
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(cfg["global_idx"]),
            window_size=cfg["window"], out_chans=cfg["c"]),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg["c"], image_embedding_size=(grid, grid), input_image_size=(cfg["img"], cfg["img"]),
            mask_in_chans=cfg["mask_in"]),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg["dec_depth"], embedding_dim=cfg["c"], mlp_dim=cfg["dec_mlp"],
                                          num_heads=cfg["dec_heads"]),
            transformer_dim=cfg["c"], iou_head_depth=3, iou_head_hidden_dim=cfg["iou_hidden"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random values for every parameter (official or Hugging Face SAM alike).

    Norm scales ~ 1 + N(0, 0.1^2), other 1-D params ~ N(0, 0.1^2), embedding tables
    (tokens) ~ N(0, 0.5^2), position / relative-position tables ~ N(0, 0.2^2), weights
    ~ N(0, 1/fan_in) (a transposed conv's fan-in is its input channels), so activations
    stay O(1). Buffers (the Fourier-feature matrix) keep their construction values:
    seed torch before building the module.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, mod in module.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(mod, nn.Embedding):
                p.copy_(0.5 * noise)
            elif "pos_embed" in name or "rel_pos" in name:
                p.copy_(0.2 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise if name == "weight" else 0.1 * noise)
            elif isinstance(mod, nn.ConvTranspose2d):  # [in, out, k, k]
                p.copy_(noise / p.shape[0] ** 0.5)
            else:  # Linear [out, in], Conv2d [out, in, k, k]
                p.copy_(noise / int(np.prod(p.shape[1:])) ** 0.5)
    return module


def make_official(cfg: dict = TINY, seed: int = 0) -> nn.Module:
    """A seeded random official SAM, eval mode, fp32."""
    torch.manual_seed(seed)  # the prompt encoder's Gaussian matrix is drawn at construction
    return randomize_(build_official(cfg), seed)


def prompt_cases(h: int, w: int) -> dict[str, dict]:
    """Predictor prompts on an (h, w) image: name -> kwargs of `SamPredictor.predict`."""
    f = np.float64
    return {
        "one_point": dict(point_coords=np.array([[0.42 * w, 0.55 * h]], f), point_labels=np.array([1])),
        "points": dict(point_coords=np.array([[0.42 * w, 0.55 * h], [0.63 * w, 0.31 * h], [0.2 * w, 0.8 * h],
                                              [0.75 * w, 0.7 * h]], f),
                       point_labels=np.array([1, 1, 0, 0])),
        "box": dict(box=np.array([0.21 * w, 0.18 * h, 0.71 * w, 0.83 * h], f)),
        "box_points": dict(box=np.array([0.21 * w, 0.18 * h, 0.71 * w, 0.83 * h], f),
                           point_coords=np.array([[0.45 * w, 0.5 * h], [0.25 * w, 0.22 * h]], f),
                           point_labels=np.array([1, 0])),
    }


def to_tokens(case: dict, transform, original_size) -> tuple[np.ndarray, np.ndarray]:
    """One prompt case -> (coords (T, 2) float32 resized-input frame, labels (T,) int32):
    points..., padding point (-1) when there is no box, box corners (2, 3)."""
    coords, labels = [], []
    if case.get("point_coords") is not None:
        coords.append(transform.apply_coords(case["point_coords"], original_size).astype(np.float32))
        labels.append(np.asarray(case["point_labels"], np.int32))
        if case.get("box") is None:
            coords.append(np.zeros((1, 2), np.float32))
            labels.append(np.array([-1], np.int32))
    if case.get("box") is not None:
        box = transform.apply_boxes(np.asarray(case["box"])[None], original_size).astype(np.float32)
        coords.append(box.reshape(2, 2))
        labels.append(np.array([2, 3], np.int32))
    if not coords:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(coords), np.concatenate(labels)


def save_pth(sam: nn.Module, path) -> str:
    """Writes the flat state dict (the official checkpoint layout). Returns the path."""
    torch.save(sam.state_dict(), str(path))
    return str(path)


def converted(directory, cfg: dict = TINY, seed: int = 0) -> tuple[nn.Module, str]:
    """(official model, segjax checkpoint dir): `make_official(cfg, seed)` saved as a
    `.pth` in `directory` and converted there by `python -m segjax.convert sam`."""
    import os

    from segjax.convert.__main__ import main as convert_cli

    official = make_official(cfg, seed=seed)
    pth, ckpt = os.path.join(directory, "sam.pth"), os.path.join(directory, "ckpt")
    torch.save(official.state_dict(), pth)
    if convert_cli(["sam", pth, ckpt]) != 0:
        raise RuntimeError(f"converting {pth} failed")
    return official, ckpt
