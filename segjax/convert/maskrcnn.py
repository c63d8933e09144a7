"""torchvision Mask R-CNN <-> segjax `MaskRCNN` (table-driven, numpy).

Sources: `maskrcnn_resnet50_fpn` state dicts in both key layouts (legacy
`rpn.head.conv`, `fpn.inner_blocks.{i}`, `mask_head.mask_fcn{k}`; current
`rpn.head.conv.0.0`, `fpn.inner_blocks.{i}.0`, `mask_head.{i}.0`) and
`maskrcnn_resnet50_fpn_v2` (BatchNorm in FPN / heads, 4conv+1fc box head, 2-conv RPN
head). Other widths and depths (e.g. the tiny test model) are inferred from shapes.

Meta written with the params (so `from_checkpoint` needs nothing else):
  {'model': registry name, 'model_kwargs': {num_classes, depths, width_per_group,
   fpn_channels, head_norm, rpn_conv_depth, representation_size, box_convs,
   mask_layers, mask_dim_reduced, bn_eps, head_bn_eps, anchor_sizes, aspect_ratios,
   sampling_ratio, aligned, min_size, max_size, ...}, 'params': 'mask_rcnn',
   'source': {path, bn_eps_from, layout, ...}}

BatchNorm eps is not in a state dict: the legacy torchvision COCO weights
(FrozenBatchNorm2d, no `num_batches_tracked`) use eps 0; v2 weights and freshly built
torchvision models (nn.BatchNorm2d, with `num_batches_tracked`) use 1e-5. `bn_eps`
overrides the guess. The reverse direction writes the current layout, with
`num_batches_tracked` for models whose BatchNorms are `nn.BatchNorm2d`, so that
`load_state_dict(strict=True)` accepts it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

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
    check_output_dir,
    export_path,
    load_checkpoint,
    read_state_dict,
    rename,
    unflatten,
    unrename,
    write_checkpoint,
    write_state_dict,
)

BOX_POOL = 7

_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _bn(src: str, dst: str) -> list[Rule]:
    return [Rule((f"{src}.{s}",), f"{dst}/{d}") for s, d in _BN]


def _conv(src: str, dst: str, bias: bool = True, layout: str = "conv") -> list[Rule]:
    rules = [Rule((f"{src}.weight",), f"{dst}/kernel", layout)]
    if bias:
        rules.append(Rule((f"{src}.bias",), f"{dst}/bias"))
    return rules


def rules(head_norm: bool = False, num_box_convs: int = 4) -> tuple[Rule, ...]:
    """Rename rules for the current torchvision layout (legacy keys are normalised first).

    num_box_convs: convs of a v2 FastRCNNConvFCHead (its Linear sits at index n + 1,
    after the Flatten)."""
    body, r = "backbone.body", []
    r += _conv(f"{body}.conv1", "backbone/body/conv1", bias=False) + _bn(f"{body}.bn1", "backbone/body/bn1")
    blk, dblk = f"{body}.layer{{s}}.{{j}}", "backbone/body/layer{s}_{j}"
    for k in (1, 2, 3):
        r += _conv(f"{blk}.conv{k}", f"{dblk}/conv{k}", bias=False) + _bn(f"{blk}.bn{k}", f"{dblk}/bn{k}")
    r += _conv(f"{blk}.downsample.0", f"{dblk}/downsample_0", bias=False)
    r += _bn(f"{blk}.downsample.1", f"{dblk}/downsample_1")
    for name in ("inner_blocks", "layer_blocks"):
        src, dst = f"backbone.fpn.{name}.{{i}}", f"backbone/fpn/{name}_{{i}}"
        r += _conv(f"{src}.0", dst, bias=not head_norm)
        if head_norm:
            r += _bn(f"{src}.1", f"{dst}_bn")
    r += _conv("rpn.head.conv.{i}.0", "rpn/conv_{i}")
    r += _conv("rpn.head.cls_logits", "rpn/cls_logits") + _conv("rpn.head.bbox_pred", "rpn/bbox_pred")
    rh = "roi_heads"
    if head_norm:
        r += _conv(f"{rh}.box_head.{{i}}.0", f"{rh}/box_head/conv{{i}}", bias=False)
        r += _bn(f"{rh}.box_head.{{i}}.1", f"{rh}/box_head/conv{{i}}_bn")
        r += _conv(f"{rh}.box_head.{num_box_convs + 1}", f"{rh}/box_head/fc", layout="linear")
    else:
        r += _conv(f"{rh}.box_head.fc6", f"{rh}/box_head/fc6", layout="linear")
        r += _conv(f"{rh}.box_head.fc7", f"{rh}/box_head/fc7", layout="linear")
    r += _conv(f"{rh}.box_predictor.cls_score", f"{rh}/box_predictor/cls_score", layout="linear")
    r += _conv(f"{rh}.box_predictor.bbox_pred", f"{rh}/box_predictor/bbox_pred", layout="linear")
    r += _conv(f"{rh}.mask_head.{{i}}.0", f"{rh}/mask_head/conv{{i}}", bias=not head_norm)
    if head_norm:
        r += _bn(f"{rh}.mask_head.{{i}}.1", f"{rh}/mask_head/conv{{i}}_bn")
    # ConvTranspose2d weight [in, out, kH, kW] -> (kH, kW, out, in) with the conv layout
    r += _conv(f"{rh}.mask_predictor.conv5_mask", f"{rh}/mask_predictor/conv5_mask")
    r += _conv(f"{rh}.mask_predictor.mask_fcn_logits", f"{rh}/mask_predictor/mask_fcn_logits")
    return tuple(r)


KNOWN_IGNORABLE = (r"(^|\.)num_batches_tracked$",)

_LEGACY = (  # (legacy regex, current template): torchvision's own _load_from_state_dict upgrades
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), "rpn.head.conv.0.0.{0}"),
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"), "backbone.fpn.{0}.{1}.0.{2}"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"), None),
)


def normalise_keys(sd: StateDict, notes: list[str]) -> tuple[StateDict, str]:
    """Legacy -> current torchvision keys; strips a DDP 'module.' prefix. Returns (sd, layout)."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped the 'module.' prefix")
    out, legacy = {}, 0
    for k, v in sd.items():
        for rx, template in _LEGACY:
            m = rx.match(k)
            if m:
                legacy += 1
                if template is None:  # mask_fcn{k} (1-based) -> mask_head.{k-1}.0
                    k = f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"
                else:
                    k = template.format(*m.groups())
                break
        out[k] = v
    layout = "legacy" if legacy else "current"
    if legacy:
        notes.append(f"renamed {legacy} legacy keys (rpn.head.conv / fpn blocks / mask_fcn) to the current layout")
    return out, layout


def _permute_fc_rows(kernel: np.ndarray, pool: int, inverse: bool = False) -> np.ndarray:
    """Dense kernel rows (c, h, w) [torch flatten of NCHW] <-> (h, w, c) [NHWC flatten]."""
    rows, out = kernel.shape
    c = rows // (pool * pool)
    if c * pool * pool != rows:
        raise ConversionError(f"box head fc input {rows} is not channels * {pool}x{pool}")
    if inverse:
        return kernel.reshape(pool, pool, c, out).transpose(2, 0, 1, 3).reshape(rows, out)
    return kernel.reshape(c, pool, pool, out).transpose(1, 2, 0, 3).reshape(rows, out)


def _indices(sd: StateDict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def infer_kwargs(sd: StateDict) -> dict[str, Any]:
    """Architecture fields of `MaskRCNN` from a (current-layout) torchvision state dict."""
    def need(key):
        if key not in sd:
            raise ConversionError(f"not a torchvision Mask R-CNN state dict: no {key!r} "
                                  f"(first keys: {list(sd)[:6]})")
        return sd[key]

    need("backbone.body.conv1.weight")
    head_norm = "backbone.fpn.inner_blocks.0.1.weight" in sd
    depths = tuple(len(_indices(sd, rf"backbone\.body\.layer{s}\.(\d+)\.conv1\.weight$")) for s in (1, 2, 3, 4))
    if min(depths) == 0:
        raise ConversionError(f"ResNet stages with no blocks: {depths}")
    box_convs = tuple(int(sd[f"roi_heads.box_head.{i}.0.weight"].shape[0])
                      for i in _indices(sd, r"roi_heads\.box_head\.(\d+)\.0\.weight$"))
    mask_idx = _indices(sd, r"roi_heads\.mask_head\.(\d+)\.0\.weight$")
    rep = need(f"roi_heads.box_head.{len(box_convs) + 1}.weight" if box_convs
               else "roi_heads.box_head.fc6.weight").shape[0]
    num_anchors = int(need("rpn.head.cls_logits.weight").shape[0])
    kw = dict(
        num_classes=int(need("roi_heads.box_predictor.cls_score.weight").shape[0]),
        depths=depths,
        stem_width=int(sd["backbone.body.conv1.weight"].shape[0]),
        width_per_group=int(need("backbone.body.layer1.0.conv1.weight").shape[0]),
        fpn_channels=int(need("backbone.fpn.inner_blocks.0.0.weight").shape[0]),
        head_norm=head_norm,
        rpn_conv_depth=len(_indices(sd, r"rpn\.head\.conv\.(\d+)\.0\.weight$")),
        representation_size=int(rep),
        box_convs=box_convs,
        mask_layers=tuple(int(sd[f"roi_heads.mask_head.{i}.0.weight"].shape[0]) for i in mask_idx),
        mask_dim_reduced=int(need("roi_heads.mask_predictor.conv5_mask.weight").shape[1]),
    )
    if kw["stem_width"] != 64:
        raise ConversionError(f"stem width {kw['stem_width']}: torchvision ResNets have 64")
    return kw, num_anchors


def _abstract_leaves(name: str, kwargs: dict) -> dict[str, tuple]:
    model = models.build(name, **kwargs)
    s = 64
    x = jnp.zeros((1, s, s, 3), jnp.float32)
    hw = jnp.full((1, 2), s, jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, hw))["params"]
    return {k: tuple(v.shape) for k, v in flatten_paths(shapes).items()}


def from_state_dict(sd: StateDict, *, source_info: dict | None = None, bn_eps: float | None = None,
                    variant: str | None = None, model_kwargs: dict | None = None,
                    ignore: Iterable[str] = ()) -> tuple[dict, dict, Report]:
    """A torchvision Mask R-CNN state dict -> (segjax params, meta, report).

    Args:
      sd: key -> numpy array (legacy or current layout, v1 or v2).
      bn_eps: BatchNorm eps of the backbone; default: 1e-5 if the state dict has
        `num_batches_tracked` (nn.BatchNorm2d) or is v2, else 0 (legacy COCO weights).
      variant: registry name (default mask_rcnn_r50_fpn[_v2]); its defaults fill the
        fields a state dict does not hold (anchors, thresholds, image sizes).
      model_kwargs: explicit overrides of any `MaskRCNN` field (recorded in the meta).
      ignore: regexes of source keys that may be dropped.
    """
    report = Report()
    source = dict(source_info or {})
    sd, source["layout"] = normalise_keys(dict(sd), report.notes)
    arch, num_anchors = infer_kwargs(sd)
    has_nbt = any(k.endswith("num_batches_tracked") for k in sd if k.startswith("backbone.body."))
    if bn_eps is not None:
        eps, source["bn_eps_from"] = float(bn_eps), "argument"
    elif has_nbt or arch["head_norm"]:
        eps, source["bn_eps_from"] = 1e-5, "nn.BatchNorm2d (num_batches_tracked present) or v2"
    else:
        eps, source["bn_eps_from"] = 0.0, "legacy torchvision COCO weights (FrozenBatchNorm2d eps 0)"
        report.notes.append("bn_eps=0 assumed (torchvision's legacy COCO Mask R-CNN weights); "
                            "pass --bn-eps 1e-5 for models trained with FrozenBatchNorm2d(eps=1e-5)")
    source["batchnorm"] = "nn.BatchNorm2d" if has_nbt else "FrozenBatchNorm2d"
    name = variant or ("mask_rcnn_r50_fpn_v2" if arch["head_norm"] else "mask_rcnn_r50_fpn")
    if name not in models.MODELS or not name.startswith("mask_rcnn"):
        raise ConversionError(f"variant {name!r} is not a registered mask_rcnn* model")
    proto = models.build(name)  # the variant's values of what a state dict does not hold
    kw = {**arch, "bn_eps": eps}
    for field in ("anchor_sizes", "aspect_ratios", "sampling_ratio", "aligned", "min_size", "max_size",
                  "head_bn_eps", "trainable_layers"):
        kw[field] = getattr(proto, field)
    kw.update(model_kwargs or {})
    sizes, ratios = kw["anchor_sizes"], kw["aspect_ratios"]
    if len(sizes[0]) * len(ratios) != num_anchors:
        raise ConversionError(f"the RPN predicts {num_anchors} anchors per location but anchor sizes "
                              f"{sizes[0]} x ratios {ratios} give {len(sizes[0]) * len(ratios)}")

    flat, report = rename(sd, rules(arch["head_norm"], len(arch["box_convs"])), (*KNOWN_IGNORABLE, *ignore), report)
    report.raise_if_bad("renaming")
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    for key in ("roi_heads/box_head/fc6/kernel", "roi_heads/box_head/fc/kernel"):
        if key in flat:
            flat[key] = _permute_fc_rows(flat[key], BOX_POOL)
    check_leaves(flat, _abstract_leaves(name, kw), report)
    report.raise_if_bad(f"converting to {name}")
    source.update(num_tensors=len(sd), ignored=report.ignored)
    meta = {"model": name, "model_kwargs": {k: _jsonable(v) for k, v in kw.items()},
            "params": "mask_rcnn", "num_classes": kw["num_classes"], "source": source}
    return unflatten(flat), meta, report


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else v


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
            **kwargs) -> tuple[dict, Report]:
    """Reads a torchvision `.pth` / `.safetensors`, converts, writes a segjax checkpoint
    (out_dir new or empty unless `force`: see `common.write_checkpoint`)."""
    check_output_dir(out_dir, force)
    sd, info = read_state_dict(src)
    info.pop("config", None)
    params, meta, report = from_state_dict(sd, source_info=info, **kwargs)
    write_checkpoint(out_dir, params, meta, force)
    return meta, report


# ----------------------------------------------------------------------------- segjax -> torch


def to_state_dict(params: dict, meta: dict, num_batches_tracked: bool | None = None) -> StateDict:
    """segjax params -> torchvision state dict (current layout, numpy).

    num_batches_tracked: add the nn.BatchNorm2d counters (zeros) for
      `load_state_dict(strict=True)` into a model with nn.BatchNorm2d (v2, or
      `maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`); default: the source's
      kind recorded in the meta, else True for v2.
    """
    if set(params) == {"params"}:
        params = params["params"]
    kw = meta.get("model_kwargs", {})
    head_norm = bool(kw.get("head_norm", False))
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(params).items()}
    for key in ("roi_heads/box_head/fc6/kernel", "roi_heads/box_head/fc/kernel"):
        if key in flat:
            flat[key] = _permute_fc_rows(flat[key], BOX_POOL, inverse=True)
    sd = unrename(flat, rules(head_norm, len(kw.get("box_convs", ()))))
    if num_batches_tracked is None:
        kind = meta.get("source", {}).get("batchnorm")
        num_batches_tracked = kind == "nn.BatchNorm2d" if kind else head_norm
    if num_batches_tracked:
        for k in [k for k in sd if k.endswith(".running_var")]:
            sd[k[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def export(ckpt_dir: str | os.PathLike, out: str | os.PathLike, num_batches_tracked: bool | None = None,
           force: bool = False) -> str:
    """Writes a segjax Mask R-CNN checkpoint as a torchvision state dict (`.pth`/`.safetensors`;
    OUT/model.pth for a suffix-less OUT). An existing file is refused unless `force`."""
    out = export_path(out, "model.pth", force)
    params, meta = load_checkpoint(ckpt_dir, "Mask R-CNN", ("mask_rcnn",))
    sd = to_state_dict(params, meta, num_batches_tracked)
    return write_state_dict(sd, out)
