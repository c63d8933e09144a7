"""ViTDet Mask R-CNN state dict <-> segjax `MaskRCNN(backbone_type="vitdet")` (table-driven, numpy).

Source layout (`tests/reference/vitdet_torch.py` builds it): detectron2's ViTDet names for
the backbone, torchvision's for the RPN and RoI heads:
  backbone.net.patch_embed.proj, backbone.net.pos_embed (1, 1 + G*G, D) (class-token row
  first, unused), backbone.net.blocks.{i}.{norm1, attn.{qkv, proj, rel_pos_h, rel_pos_w},
  norm2, mlp.{fc1, fc2}};
  backbone.simfp_{s}.{k} (ConvTranspose2d / LayerNorm) and .{k}[.norm] (Conv2d + LN);
  rpn.head.conv.{i}.0, rpn.head.{cls_logits, bbox_pred};
  roi_heads.box_head.{i}.{0 conv, 1 LN}, roi_heads.box_head.{n+1} (Linear after Flatten),
  roi_heads.box_predictor.*, roi_heads.mask_head.{i}.{0, 1}, roi_heads.mask_predictor.*.
Architecture fields are read from shapes: width, depth, heads (D / rel-pos head dim),
patch, pretraining grid (pos_embed rows), window (the windowed blocks' tables), global
blocks and img_size (the larger tables), pyramid channels, head widths, classes. The
rest (anchors, thresholds, drop path) comes from the registry variant.

NOTE: the class-token row of pos_embed is dropped (ViTDet never uses it); the reverse
direction writes zeros there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import flatten_paths
from segjax.convert.common import (
    ConversionError,
    Report,
    Rule,
    StateDict,
    check_leaves,
    rename,
    unflatten,
    unrename,
)
from segjax.convert.maskrcnn import BOX_POOL, _conv, _indices, _permute_fc_rows

POS = "backbone.net.pos_embed"
_FC_KEY = "roi_heads/box_head/fc/kernel"


def _ln(src: str, dst: str) -> list[Rule]:
    return [Rule((f"{src}.weight",), f"{dst}/scale"), Rule((f"{src}.bias",), f"{dst}/bias")]


def _linear(src: str, dst: str) -> list[Rule]:
    return _conv(src, dst, layout="linear")


def rules(patch_size: int = 16, num_box_convs: int = 4) -> tuple[Rule, ...]:
    """Rename rules (all but pos_embed, which `from_state_dict` reshapes)."""
    net, dnet = "backbone.net", "backbone/net"
    r = _conv(f"{net}.patch_embed.proj", f"{dnet}/patch_embed/proj")
    blk, dblk = f"{net}.blocks.{{i}}", f"{dnet}/blocks_{{i}}"
    r += _ln(f"{blk}.norm1", f"{dblk}/norm1") + _ln(f"{blk}.norm2", f"{dblk}/norm2")
    r += _linear(f"{blk}.attn.qkv", f"{dblk}/attn/qkv") + _linear(f"{blk}.attn.proj", f"{dblk}/attn/proj")
    r += [Rule((f"{blk}.attn.rel_pos_{a}",), f"{dblk}/attn/rel_pos_{a}") for a in "hw"]
    r += _linear(f"{blk}.mlp.fc1", f"{dblk}/mlp/fc1") + _linear(f"{blk}.mlp.fc2", f"{dblk}/mlp/fc2")
    for scale in (4.0, 2.0, 1.0, 0.5):
        s = int(math.log2(patch_size / scale))
        src, dst = f"backbone.simfp_{s}", f"backbone/simfp_{s}"
        if scale == 4.0:  # ConvT, LN, GELU, ConvT
            r += _conv(f"{src}.0", f"{dst}/up_0") + _ln(f"{src}.1", f"{dst}/up_0_norm")
            r += _conv(f"{src}.3", f"{dst}/up_1")
            k = 4
        elif scale == 2.0:
            r += _conv(f"{src}.0", f"{dst}/up_0")
            k = 1
        else:  # identity / max-pool (module 0, no parameters)
            k = 0 if scale == 1.0 else 1
        r += _conv(f"{src}.{k}", f"{dst}/conv1x1", bias=False) + _ln(f"{src}.{k}.norm", f"{dst}/conv1x1_norm")
        r += _conv(f"{src}.{k + 1}", f"{dst}/conv3x3", bias=False) + _ln(f"{src}.{k + 1}.norm", f"{dst}/conv3x3_norm")
    r += _conv("rpn.head.conv.{i}.0", "rpn/conv_{i}")
    r += _conv("rpn.head.cls_logits", "rpn/cls_logits") + _conv("rpn.head.bbox_pred", "rpn/bbox_pred")
    rh = "roi_heads"
    for head in ("box_head", "mask_head"):
        r += _conv(f"{rh}.{head}.{{i}}.0", f"{rh}/{head}/conv{{i}}", bias=False)
        r += _ln(f"{rh}.{head}.{{i}}.1", f"{rh}/{head}/conv{{i}}_ln")
    r += _linear(f"{rh}.box_head.{num_box_convs + 1}", f"{rh}/box_head/fc")
    r += _linear(f"{rh}.box_predictor.cls_score", f"{rh}/box_predictor/cls_score")
    r += _linear(f"{rh}.box_predictor.bbox_pred", f"{rh}/box_predictor/bbox_pred")
    # ConvTranspose2d weight [in, out, kH, kW] -> (kH, kW, out, in) through the conv layout
    r += _conv(f"{rh}.mask_predictor.conv5_mask", f"{rh}/mask_predictor/conv5_mask")
    r += _conv(f"{rh}.mask_predictor.mask_fcn_logits", f"{rh}/mask_predictor/mask_fcn_logits")
    return tuple(r)


def infer_kwargs(sd: StateDict) -> dict[str, Any]:
    """`MaskRCNN` vitdet fields from a state dict's shapes (see the module doc)."""
    def need(key):
        if key not in sd:
            raise ConversionError(f"not a ViTDet Mask R-CNN state dict: no {key!r} (first keys: {list(sd)[:6]})")
        return np.asarray(sd[key])

    proj = need("backbone.net.patch_embed.proj.weight")  # (D, 3, P, P)
    d, patch = int(proj.shape[0]), int(proj.shape[-1])
    pos = need(POS)
    n = pos.shape[1] - 1
    g = math.isqrt(n)
    if pos.ndim != 3 or g * g != n or pos.shape[2] != d:
        raise ConversionError(f"{POS} {pos.shape} is not (1, 1 + G*G, {d}) (a class-token row and a square grid)")
    depth = len(_indices(sd, r"backbone\.net\.blocks\.(\d+)\.norm1\.weight$"))
    tables = [int(need(f"backbone.net.blocks.{i}.attn.rel_pos_h").shape[0]) for i in range(depth)]
    head_dim = int(need("backbone.net.blocks.0.attn.rel_pos_h").shape[1])
    small, big = min(tables), max(tables)
    if small == big:
        raise ConversionError(f"all {depth} blocks have rel-pos tables of {small} rows: no windowed blocks")
    box_idx = _indices(sd, r"roi_heads\.box_head\.(\d+)\.0\.weight$")
    mask_idx = _indices(sd, r"roi_heads\.mask_head\.(\d+)\.0\.weight$")
    return dict(
        backbone_type="vitdet", head_norm=True, head_norm_type="ln",
        vit_embed_dim=d, vit_patch_size=patch, vit_depth=depth, vit_num_heads=d // head_dim,
        vit_pretrain_img_size=g * patch, vit_window_size=(small + 1) // 2, vit_img_size=(big + 1) // 2 * patch,
        vit_global_attn_indexes=tuple(i for i, t in enumerate(tables) if t == big),
        fpn_channels=int(need(f"backbone.simfp_{int(math.log2(patch))}.0.weight").shape[0]),
        num_classes=int(need("roi_heads.box_predictor.cls_score.weight").shape[0]),
        rpn_conv_depth=len(_indices(sd, r"rpn\.head\.conv\.(\d+)\.0\.weight$")),
        box_convs=tuple(int(sd[f"roi_heads.box_head.{i}.0.weight"].shape[0]) for i in box_idx),
        representation_size=int(need(f"roi_heads.box_head.{len(box_idx) + 1}.weight").shape[0]),
        mask_layers=tuple(int(sd[f"roi_heads.mask_head.{i}.0.weight"].shape[0]) for i in mask_idx),
        mask_dim_reduced=int(need("roi_heads.mask_predictor.conv5_mask.weight").shape[1]),
    ), int(need("rpn.head.cls_logits.weight").shape[0])


def _abstract_leaves(name: str, kwargs: dict) -> dict[str, tuple]:
    model = models.build(name, **kwargs)
    s = 4 * 2 * model.vit_patch_size  # P6 of at least 1x1
    x = jnp.zeros((1, s, s, 3), jnp.float32)
    hw = jnp.full((1, 2), s, jnp.int32)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, hw))["params"])
    return {k: tuple(v.shape) for k, v in flatten_paths(shapes).items()}


def from_state_dict(sd: StateDict, *, variant: str = "maskrcnn_vitdet_b", model_kwargs: dict | None = None,
                    ignore: Iterable[str] = (), source_info: dict | None = None) -> tuple[dict, dict, Report]:
    """A ViTDet Mask R-CNN state dict -> (segjax params, meta, report); every source key
    must land on a model leaf and every leaf be written (else `ConversionError`).

    variant: registry name whose defaults fill what a state dict does not hold;
    model_kwargs: explicit values of the other fields (recorded in the meta); one that
    contradicts a field read from the shapes (e.g. `vit_num_heads` against the rel-pos
    head dim) is an error; ignore: regexes of source keys that may be dropped.
    """
    if variant not in models.MODELS or not variant.startswith("maskrcnn_vitdet"):
        raise ConversionError(f"variant {variant!r} is not a registered maskrcnn_vitdet* model")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    arch, num_anchors = infer_kwargs(sd)
    # every inferred field is fixed by a tensor's shape (heads by the rel-pos head dim)
    clash = [f"{k}={v!r} (the state dict: {arch[k]!r})" for k, v in (model_kwargs or {}).items()
             if k in arch and (tuple(v) if isinstance(v, list) else v) != arch[k]]
    if clash:
        raise ConversionError(f"model_kwargs contradict the state dict's architecture: {', '.join(clash)}")
    kw = {**arch, **(model_kwargs or {})}
    proto = models.build(variant, **kw)
    if len(proto.anchor_sizes[0]) * len(proto.aspect_ratios) != num_anchors:
        raise ConversionError(f"the RPN predicts {num_anchors} anchors per location but the variant's anchors "
                              f"give {len(proto.anchor_sizes[0]) * len(proto.aspect_ratios)}")
    pos = np.asarray(sd.pop(POS), np.float32)
    g = math.isqrt(pos.shape[1] - 1)
    flat, report = rename(sd, rules(arch["vit_patch_size"], len(arch["box_convs"])), ignore)
    report.used.append(POS)
    report.raise_if_bad("renaming")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    flat["backbone/net/pos_embed"] = pos[:, 1:].reshape(1, g, g, -1)
    flat[_FC_KEY] = _permute_fc_rows(flat[_FC_KEY], BOX_POOL)
    check_leaves(flat, _abstract_leaves(variant, kw), report)
    report.raise_if_bad(f"converting to {variant}")
    meta = {"model": variant, "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
            "params": "mask_rcnn", "num_classes": kw["num_classes"],
            "source": {**(source_info or {}), "num_tensors": len(sd) + 1, "ignored": report.ignored}}
    return unflatten(flat), meta, report


def to_state_dict(params: dict, meta: dict) -> StateDict:
    """segjax params -> the state dict layout above (numpy); pos_embed gets a zero
    class-token row."""
    if set(params) == {"params"}:
        params = params["params"]
    model = models.build(meta["model"], **meta.get("model_kwargs", {}))
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(params).items()}
    pos = flat.pop("backbone/net/pos_embed")
    flat[_FC_KEY] = _permute_fc_rows(flat[_FC_KEY], BOX_POOL, inverse=True)
    sd = unrename(flat, rules(model.vit_patch_size, len(model.box_convs)))
    d = pos.shape[-1]
    sd[POS] = np.concatenate([np.zeros((1, 1, d), np.float32), pos.reshape(1, -1, d)], axis=1)
    return sd

