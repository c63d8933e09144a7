"""Segment Anything weights: official `segment_anything` `.pth` and Hugging Face
`SamModel` <-> segjax `Sam`.

Legend: D encoder width, C prompt width, G pretrain token grid (img / patch), K head dim.

Sources (read by `segjax.convert.common.read_state_dict`):
  official  the flat state dict of `sam_vit_{b,l,h}_*.pth` (`image_encoder.*`,
            `prompt_encoder.*`, `mask_decoder.*`; pixel mean/std are non-persistent).
  hf        transformers `SamModel` (`vision_encoder.*`, `prompt_encoder.*`,
            `mask_decoder.*`, `shared_image_embedding.*`), a `.safetensors` / `.bin`
            or a model directory (its config.json gives the decoder heads and eps).

The architecture is read off the tensors: width, depth, patch and pretrain size from
`patch_embed` / `pos_embed`; head dim from the rel-pos tables (heads = D / K); which
blocks are global from the table sizes (2G - 1 rows global, 2 * window - 1 windowed);
prompt width, mask channels, decoder depth / MLP / downsample rate, mask tokens and
IoU head from theirs. Only the decoder head count is not in the weights: it comes from
`decoder_num_heads=`, config.json, the `variant`, else 8 (all released SAMs).

Checkpoint meta: {'model': 'sam_vit_*', 'model_kwargs': every architecture field,
'params': 'sam', 'source': {...}}; `models.build(meta['model'], **meta['model_kwargs'])`
rebuilds the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import flatten_paths
from segjax.convert.common import (
    LAYOUTS,
    ConversionError,
    Layout,
    Report,
    Rule,
    StateDict,
    check_leaves,
    check_output_dir,
    export_path,
    load_checkpoint,
    prepare_hf_dir,
    read_state_dict,
    rename,
    unflatten,
    unrename,
    write_checkpoint,
    write_state_dict,
)

# ConvTranspose2d weight [I, O, kH, kW] -> segjax PatchConvTranspose kernel (kH, kW, I, O)
# (no spatial flip: see `segjax.models.sam.mask_decoder.PatchConvTranspose`). Registered
# under a name of its own so that no other converter's transposed-conv layout collides.
_CONVT = "conv_transpose_patch"
LAYOUTS[_CONVT] = Layout(4, lambda x: x.transpose(2, 3, 0, 1), lambda x: x.transpose(2, 3, 0, 1))

# ----------------------------------------------------------------------------- tables


def _lin(src: str, dst: str) -> list[tuple[str, str, str]]:
    return [(f"{src}.weight", f"{dst}/kernel", "linear"), (f"{src}.bias", f"{dst}/bias", "copy")]


def _conv(src: str, dst: str, bias: bool = True, layout: str = "conv") -> list[tuple[str, str, str]]:
    out = [(f"{src}.weight", f"{dst}/kernel", layout)]
    return out + [(f"{src}.bias", f"{dst}/bias", "copy")] if bias else out


def _ln(src: str, dst: str) -> list[tuple[str, str, str]]:
    return [(f"{src}.weight", f"{dst}/scale", "copy"), (f"{src}.bias", f"{dst}/bias", "copy")]


def _emb(src: str, dst: str) -> list[tuple[str, str, str]]:
    return [(f"{src}.weight", f"{dst}/embedding", "copy")]


def _attn(src: str, dst: str) -> list[tuple[str, str, str]]:
    return [x for p in ("q_proj", "k_proj", "v_proj", "out_proj") for x in _lin(f"{src}.{p}", f"{dst}/{p}")]


def _tables(fmt: str) -> list[tuple[str, str, str]]:
    hf = fmt == "hf"
    enc, ie = ("vision_encoder", "image_encoder/") if hf else ("image_encoder", "image_encoder/")
    blk = f"{enc}.layers.{{i}}" if hf else f"{enc}.blocks.{{i}}"
    b = f"{ie}blocks_{{i}}"
    t = [
        (f"{enc}.pos_embed", f"{ie}pos_embed", "copy"),
        *_conv(f"{enc}.patch_embed.{'projection' if hf else 'proj'}", f"{ie}patch_embed/proj"),
        *_ln(f"{blk}.{'layer_norm1' if hf else 'norm1'}", f"{b}/norm1"),
        *_ln(f"{blk}.{'layer_norm2' if hf else 'norm2'}", f"{b}/norm2"),
        *_lin(f"{blk}.attn.qkv", f"{b}/attn/qkv"),
        *_lin(f"{blk}.attn.proj", f"{b}/attn/proj"),
        (f"{blk}.attn.rel_pos_h", f"{b}/attn/rel_pos_h", "copy"),
        (f"{blk}.attn.rel_pos_w", f"{b}/attn/rel_pos_w", "copy"),
        *_lin(f"{blk}.mlp.lin1", f"{b}/mlp/lin1"),
        *_lin(f"{blk}.mlp.lin2", f"{b}/mlp/lin2"),
    ]
    neck = (("conv1", "layer_norm1", "conv2", "layer_norm2") if hf else ("0", "1", "2", "3"))
    t += [*_conv(f"{enc}.neck.{neck[0]}", f"{ie}neck_0", bias=False), *_ln(f"{enc}.neck.{neck[1]}", f"{ie}neck_1"),
          *_conv(f"{enc}.neck.{neck[2]}", f"{ie}neck_2", bias=False), *_ln(f"{enc}.neck.{neck[3]}", f"{ie}neck_3")]

    pe, pd = "prompt_encoder", "prompt_encoder/"
    t.append(("shared_image_embedding.positional_embedding" if hf
              else f"{pe}.pe_layer.positional_encoding_gaussian_matrix",
              f"{pd}pe_layer/positional_encoding_gaussian_matrix", "copy"))
    t += _emb(f"{pe}.{'point_embed' if hf else 'point_embeddings'}.{{i}}", f"{pd}point_embeddings_{{i}}")
    t += _emb(f"{pe}.not_a_point_embed", f"{pd}not_a_point_embed") + _emb(f"{pe}.no_mask_embed", f"{pd}no_mask_embed")
    md = (("mask_embed.conv1", "mask_embed.layer_norm1", "mask_embed.conv2", "mask_embed.layer_norm2",
           "mask_embed.conv3") if hf else tuple(f"mask_downscaling.{k}" for k in (0, 1, 3, 4, 6)))
    t += [*_conv(f"{pe}.{md[0]}", f"{pd}mask_downscaling_0"), *_ln(f"{pe}.{md[1]}", f"{pd}mask_downscaling_1"),
          *_conv(f"{pe}.{md[2]}", f"{pd}mask_downscaling_3"), *_ln(f"{pe}.{md[3]}", f"{pd}mask_downscaling_4"),
          *_conv(f"{pe}.{md[4]}", f"{pd}mask_downscaling_6")]

    d, dd = "mask_decoder", "mask_decoder/"
    lay, ld = f"{d}.transformer.layers.{{i}}", f"{dd}transformer/layers_{{i}}"
    t += _emb(f"{d}.iou_token", f"{dd}iou_token") + _emb(f"{d}.mask_tokens", f"{dd}mask_tokens")
    for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        t += _attn(f"{lay}.{a}", f"{ld}/{a}")
    for k in range(1, 5):
        t += _ln(f"{lay}.{'layer_norm' if hf else 'norm'}{k}", f"{ld}/norm{k}")
    t += _lin(f"{lay}.mlp.lin1", f"{ld}/mlp/lin1") + _lin(f"{lay}.mlp.lin2", f"{ld}/mlp/lin2")
    t += _attn(f"{d}.transformer.final_attn_token_to_image", f"{dd}transformer/final_attn_token_to_image")
    t += _ln(f"{d}.transformer.{'layer_norm_final_attn' if hf else 'norm_final_attn'}",
             f"{dd}transformer/norm_final_attn")
    up = ("upscale_conv1", "upscale_layer_norm", "upscale_conv2") if hf else ("output_upscaling.0",
                                                                              "output_upscaling.1",
                                                                              "output_upscaling.3")
    t += [*_conv(f"{d}.{up[0]}", f"{dd}output_upscaling_0", layout=_CONVT),
          *_ln(f"{d}.{up[1]}", f"{dd}output_upscaling_1"),
          *_conv(f"{d}.{up[2]}", f"{dd}output_upscaling_3", layout=_CONVT)]
    if hf:  # SamFeedForward: proj_in, layers.0 .. layers.{n-3}, proj_out (depth 3 in every SAM)
        for head, dst in (("output_hypernetworks_mlps.{i}", "output_hypernetworks_mlps_{i}"),
                          ("iou_prediction_head", "iou_prediction_head")):
            t += _lin(f"{d}.{head}.proj_in", f"{dd}{dst}/layers_0")
            t += _lin(f"{d}.{head}.layers.0", f"{dd}{dst}/layers_1")
            t += _lin(f"{d}.{head}.proj_out", f"{dd}{dst}/layers_2")
    else:
        t += _lin(f"{d}.output_hypernetworks_mlps.{{i}}.layers.{{j}}",
                  f"{dd}output_hypernetworks_mlps_{{i}}/layers_{{j}}")
        t += _lin(f"{d}.iou_prediction_head.layers.{{j}}", f"{dd}iou_prediction_head/layers_{{j}}")
    return t


OFFICIAL_RULES: tuple[Rule, ...] = tuple(Rule((s,), d, lay) for s, d, lay in _tables("official"))
HF_RULES: tuple[Rule, ...] = tuple(Rule((s,), d, lay) for s, d, lay in _tables("hf"))
_HF_TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"  # tied to shared_image_embedding

KNOWN_IGNORABLE = (r"(^|\.)num_batches_tracked$", r"(^|\.)pixel_(mean|std)$")
# Architecture fields written to model_kwargs (everything but pixel mean / std, dtype).
ARCH_FIELDS = ("img_size", "pretrain_img_size", "patch_size", "encoder_embed_dim", "encoder_depth",
               "encoder_num_heads", "encoder_global_attn_indexes", "window_size", "mlp_ratio",
               "encoder_ln_eps", "prompt_embed_dim", "mask_in_chans", "decoder_depth", "decoder_num_heads",
               "decoder_mlp_dim", "attention_downsample_rate", "decoder_ln_eps", "num_multimask_outputs",
               "iou_head_depth", "iou_head_hidden_dim")

# LayerNorm eps differ between the official code and transformers' port; not shape facts.
_NOT_ASSERTED = ("encoder_ln_eps", "decoder_ln_eps")

# ----------------------------------------------------------------------------- detection


def detect_format(sd: StateDict) -> str:
    """'official' or 'hf'; a clear error for other families."""
    keys = list(sd)
    if any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in keys):
        if any(".trunk." in k or "memory_attention" in k for k in keys):
            raise ConversionError("this looks like SAM 2 (hiera trunk / memory attention): not supported")
        return "hf"
    if any(k.startswith("image_encoder.") for k in keys) and any(k.startswith("mask_decoder.") for k in keys):
        if any(k.startswith("image_encoder.trunk.") or k.startswith("memory_") for k in keys):
            raise ConversionError("this looks like SAM 2 (image_encoder.trunk / memory modules): not supported")
        return "official"
    guess = "an unknown model"
    if "patch_embed.proj.weight" in sd and any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in keys):
        guess = "an MAE / timm ViT (use `python -m segjax.convert mae`)"
    elif any(re.search(r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$", k) for k in keys):
        guess = "a Hugging Face ViT / ViTMAE (use `python -m segjax.convert mae`)"
    elif any(k.startswith("backbone.body.") for k in keys):
        guess = "a torchvision detection model (Mask R-CNN / Faster R-CNN)"
    elif "conv1.weight" in sd and any(k.startswith("layer1.") for k in keys):
        guess = "a ResNet"
    elif any(k.startswith("image_encoder.") for k in keys):
        guess = "a SAM image encoder without prompt encoder / mask decoder"
    raise ConversionError(
        f"not a Segment Anything checkpoint: this looks like {guess}. Expected official keys "
        f"('image_encoder.patch_embed.proj.weight', 'mask_decoder.iou_token.weight', ...) or Hugging Face "
        f"SamModel keys ('vision_encoder.patch_embed.projection.weight', ...). First keys: {keys[:8]}")


def _normalise_keys(sd: StateDict, report: Report) -> StateDict:
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        report.notes.append("stripped the 'module.' prefix (DistributedDataParallel)")
    if _HF_TIED_PE in sd:
        tied = sd.pop(_HF_TIED_PE)
        main = sd.setdefault("shared_image_embedding.positional_embedding", tied)
        if main.shape != tied.shape or not np.array_equal(main, tied):
            raise ConversionError(f"{_HF_TIED_PE} differs from shared_image_embedding.positional_embedding "
                                  "(they are one tied tensor in SamModel)")
        report.used.append(_HF_TIED_PE)
    return sd


# ----------------------------------------------------------------------------- inference


def _indices(flat: StateDict, pattern: str) -> list[int]:
    idx = sorted({int(m.group(1)) for k in flat if (m := re.match(pattern, k))})
    if idx != list(range(len(idx))):
        raise ConversionError(f"layer indices matching {pattern!r} are not contiguous: {idx}")
    return idx


def _shape(flat: StateDict, path: str, report: Report) -> tuple[int, ...] | None:
    if path not in flat:
        report.missing.append(path)
        return None
    return tuple(flat[path].shape)


def infer_architecture(flat: StateDict, report: Report) -> dict[str, Any]:
    """Architecture fields of `Sam` from segjax-named params (see module doc)."""
    need = ("image_encoder/patch_embed/proj/kernel", "image_encoder/pos_embed", "image_encoder/neck_0/kernel",
            "prompt_encoder/mask_downscaling_3/kernel", "mask_decoder/mask_tokens/embedding",
            "mask_decoder/transformer/layers_0/mlp/lin1/kernel",
            "mask_decoder/transformer/layers_0/cross_attn_token_to_image/q_proj/kernel",
            "mask_decoder/iou_prediction_head/layers_0/kernel", "image_encoder/blocks_0/attn/rel_pos_h",
            "image_encoder/blocks_0/mlp/lin1/kernel")
    shapes = {p: _shape(flat, p, report) for p in need}
    if any(s is None for s in shapes.values()):
        report.raise_if_bad("reading the SAM architecture")
    p, _, in_chans, d = shapes["image_encoder/patch_embed/proj/kernel"]
    if in_chans != 3:
        raise ConversionError(f"patch_embed takes {in_chans} channels; SAM takes RGB")
    _, gh, gw, d2 = shapes["image_encoder/pos_embed"]
    if gh != gw or d2 != d:
        raise ConversionError(f"pos_embed {shapes['image_encoder/pos_embed']} is not (1, G, G, {d})")
    depth = len(_indices(flat, r"image_encoder/blocks_(\d+)/"))
    head_dim = shapes["image_encoder/blocks_0/attn/rel_pos_h"][1]
    if d % head_dim:
        raise ConversionError(f"rel_pos head dim {head_dim} does not divide the width {d}")
    global_idx, windows = [], set()
    for i in range(depth):
        rows = {flat[f"image_encoder/blocks_{i}/attn/rel_pos_{a}"].shape[0] for a in "hw"
                if f"image_encoder/blocks_{i}/attn/rel_pos_{a}" in flat}
        if len(rows) != 1 or (next(iter(rows)) % 2 == 0):
            raise ConversionError(f"block {i}: rel_pos_h / rel_pos_w sizes {sorted(rows)} are not one odd 2S-1")
        s = (rows.pop() + 1) // 2
        if s == gh:
            global_idx.append(i)
        else:
            windows.add(s)
    if len(windows) > 1:
        raise ConversionError(f"windowed blocks use several window sizes {sorted(windows)}: unsupported")
    window = windows.pop() if windows else 14
    if not global_idx:
        report.notes.append("no global-attention block (no rel-pos table of 2G-1 rows)")
    hidden = shapes["image_encoder/blocks_0/mlp/lin1/kernel"][1]
    c = shapes["image_encoder/neck_0/kernel"][-1]
    n_tokens, c2 = shapes["mask_decoder/mask_tokens/embedding"]
    if c2 != c:
        raise ConversionError(f"neck output width {c} != mask decoder width {c2}")
    internal = shapes["mask_decoder/transformer/layers_0/cross_attn_token_to_image/q_proj/kernel"][1]
    if c % internal:
        raise ConversionError(f"cross-attention width {internal} does not divide the prompt width {c}")
    return dict(
        img_size=gh * p, pretrain_img_size=gh * p, patch_size=p, encoder_embed_dim=d, encoder_depth=depth,
        encoder_num_heads=d // head_dim, encoder_global_attn_indexes=global_idx, window_size=window,
        mlp_ratio=hidden / d, prompt_embed_dim=c,
        mask_in_chans=shapes["prompt_encoder/mask_downscaling_3/kernel"][-1],
        decoder_depth=len(_indices(flat, r"mask_decoder/transformer/layers_(\d+)/")),
        decoder_mlp_dim=shapes["mask_decoder/transformer/layers_0/mlp/lin1/kernel"][1],
        attention_downsample_rate=c // internal, num_multimask_outputs=n_tokens - 1,
        iou_head_depth=len(_indices(flat, r"mask_decoder/iou_prediction_head/layers_(\d+)/")),
        iou_head_hidden_dim=shapes["mask_decoder/iou_prediction_head/layers_0/kernel"][1])


def _abstract_leaves(name: str, kw: dict) -> dict[str, tuple]:
    model = models.build(name, **kw)
    s = model.img_size
    args = (jnp.zeros((1, s, s, 3)), jnp.full((1, 2), s, jnp.int32), jnp.zeros((1, 1, 2, 2)),
            jnp.ones((1, 1, 2), jnp.int32))
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args)))["params"]
    return {k: tuple(v.shape) for k, v in flatten_paths(shapes).items()}


def _defaults(name: str) -> dict[str, Any]:
    model = models.MODELS[name]()
    return {k: getattr(model, k) for k in ARCH_FIELDS}


def _variant_name(variant: str) -> str:
    return variant if variant in models.MODELS else f"sam_vit_{variant.removeprefix('sam_').removeprefix('vit_')}"


def _registry_name(kw: dict, variant: str | None) -> str:
    sams = sorted(n for n in models.MODELS if n.startswith("sam_vit_"))
    if variant:
        name = _variant_name(variant)
        if name not in sams:
            raise ConversionError(f"variant {variant!r} is not a registered SAM; choices: {sams}")
        defaults = _defaults(name)
        diff = {k: (kw[k], defaults[k]) for k in ARCH_FIELDS
                if k not in _NOT_ASSERTED and _norm(defaults[k]) != _norm(kw[k])}
        if diff:
            raise ConversionError(f"the weights are not {name}: (weights, {name}) differ in {diff}")
        return name
    for n in sams:
        defaults = _defaults(n)
        if all(_norm(defaults[k]) == _norm(kw[k]) for k in ("encoder_embed_dim", "encoder_depth",
                                                            "encoder_global_attn_indexes")):
            return n
    for n in sams:  # a non-standard variant: the nearest builder by width; kwargs complete it
        if _defaults(n)["encoder_embed_dim"] == kw["encoder_embed_dim"]:
            return n
    return "sam_vit_b"


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------- torch -> segjax


def from_state_dict(sd: StateDict, *, config: dict | None = None, source_info: dict | None = None,
                    variant: str | None = None, decoder_num_heads: int | None = None,
                    ignore: Iterable[str] = ()) -> tuple[dict[str, Any], dict, Report]:
    """A SAM state dict (official or HF naming, auto-detected) -> (params, meta, report).

    config: a Hugging Face SamModel config.json dict (decoder heads and LayerNorm eps).
    variant: registry name (or 'vit_b' / 'b') to assert and record; default inferred.
    decoder_num_heads: the mask decoder's heads (not in the weights; default config.json,
      the variant's, else 8).
    ignore: regexes of source keys that may be dropped.
    Raises `ConversionError` for another family, unmapped / missing / mis-shaped tensors.
    """
    report = Report()
    source = dict(source_info or {})
    sd = _normalise_keys(dict(sd), report)
    fmt = detect_format(sd)
    rules = HF_RULES if fmt == "hf" else OFFICIAL_RULES
    flat, report = rename(sd, rules, ignore=(*KNOWN_IGNORABLE, *ignore), report=report)
    report.raise_if_bad("renaming the SAM state dict")
    kw = infer_architecture(flat, report)

    cfg = config or {}
    dec_cfg, vis_cfg = cfg.get("mask_decoder_config", {}) or {}, cfg.get("vision_config", {}) or {}
    if decoder_num_heads:
        kw["decoder_num_heads"], source["decoder_num_heads_from"] = int(decoder_num_heads), "argument"
    elif "num_attention_heads" in dec_cfg:
        kw["decoder_num_heads"], source["decoder_num_heads_from"] = int(dec_cfg["num_attention_heads"]), "config.json"
    elif variant and _variant_name(variant) in models.MODELS:
        kw["decoder_num_heads"] = _defaults(_variant_name(variant))["decoder_num_heads"]
        source["decoder_num_heads_from"] = "variant"
    else:
        kw["decoder_num_heads"], source["decoder_num_heads_from"] = 8, "default (every released SAM)"
    if fmt == "hf":
        # NOTE: transformers' SamTwoWayAttentionBlock uses the config's layer_norm_eps
        # (1e-6) where segment_anything uses torch's default 1e-5.
        kw["decoder_ln_eps"] = float(dec_cfg.get("layer_norm_eps", 1e-6))
        kw["encoder_ln_eps"] = float(vis_cfg.get("layer_norm_eps", 1e-6))
        if dec_cfg.get("hidden_act", "relu") != "relu" or vis_cfg.get("hidden_act", "gelu") != "gelu":
            report.shape_errors.append("only hidden_act relu (decoder) / gelu (encoder) are supported")
    else:
        kw["encoder_ln_eps"], kw["decoder_ln_eps"] = 1e-6, 1e-5
    name = _registry_name(kw, variant)
    check_leaves(flat, _abstract_leaves(name, kw), report)
    report.raise_if_bad(f"converting to {name}")
    source.update(naming=fmt, num_tensors=len(sd), ignored=report.ignored)
    meta = {"model": name, "model_kwargs": kw, "params": "sam", "source": source}
    return unflatten(flat), meta, report


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
            **kwargs) -> tuple[dict, Report]:
    """Reads `src` (.pth / .safetensors / HF directory), converts, writes a segjax
    checkpoint to out_dir (new or empty unless `force`: see `common.write_checkpoint`).
    kwargs: those of `from_state_dict`. Returns (meta, report)."""
    check_output_dir(out_dir, force)
    sd, info = read_state_dict(src)
    config = info.pop("config", None)
    params, meta, report = from_state_dict(sd, config=config, source_info=info, **kwargs)
    write_checkpoint(out_dir, params, meta, force)
    return meta, report


# ----------------------------------------------------------------------------- segjax -> torch


def to_state_dict(params: dict, meta: dict, fmt: str = "official") -> tuple[StateDict, dict]:
    """segjax params -> (state dict of numpy arrays, extra).

    fmt 'official': loads into `segment_anything` `Sam` (e.g. `sam_model_registry[...]()`)
    with strict=True. 'hf': `SamModel.load_state_dict(strict=True)` keys (the tied
    prompt-encoder PE included); extra['config'] is a SamConfig dict.
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(params).items()}
    if fmt == "official":
        return unrename(flat, OFFICIAL_RULES), {}
    if fmt != "hf":
        raise ValueError(f"unknown format {fmt!r}; choose official or hf")
    model = models.build(meta["model"], **meta.get("model_kwargs", {}))
    if model.iou_head_depth != 3:
        raise ConversionError("transformers' SamFeedForward mapping here assumes iou_head_depth 3")
    sd = unrename(flat, HF_RULES)
    sd[_HF_TIED_PE] = sd["shared_image_embedding.positional_embedding"].copy()
    return sd, {"config": hf_config(model)}


def hf_config(model) -> dict:
    """A transformers SamConfig dict for a segjax `Sam`."""
    return dict(
        model_type="sam", architectures=["SamModel"],
        vision_config=dict(
            hidden_size=model.encoder_embed_dim, num_hidden_layers=model.encoder_depth,
            num_attention_heads=model.encoder_num_heads, mlp_ratio=model.mlp_ratio,
            mlp_dim=int(model.encoder_embed_dim * model.mlp_ratio), image_size=model.pretrain_img_size,
            patch_size=model.patch_size, output_channels=model.prompt_embed_dim,
            window_size=model.window_size, global_attn_indexes=list(model.encoder_global_attn_indexes),
            layer_norm_eps=model.encoder_ln_eps, num_pos_feats=model.prompt_embed_dim // 2,
            use_rel_pos=True, use_abs_pos=True, qkv_bias=True, hidden_act="gelu"),
        prompt_encoder_config=dict(
            hidden_size=model.prompt_embed_dim, image_size=model.pretrain_img_size,
            patch_size=model.patch_size, mask_input_channels=model.mask_in_chans, num_point_embeddings=4),
        mask_decoder_config=dict(
            hidden_size=model.prompt_embed_dim, num_hidden_layers=model.decoder_depth,
            num_attention_heads=model.decoder_num_heads, mlp_dim=model.decoder_mlp_dim,
            attention_downsample_rate=model.attention_downsample_rate,
            num_multimask_outputs=model.num_multimask_outputs, iou_head_depth=model.iou_head_depth,
            iou_head_hidden_dim=model.iou_head_hidden_dim, layer_norm_eps=model.decoder_ln_eps,
            hidden_act="relu"))


def export(ckpt_dir: str | os.PathLike, out: str | os.PathLike, fmt: str = "official",
           force: bool = False) -> str:
    """Writes a segjax SAM checkpoint as `fmt`. official: a flat `.pth` state dict (OUT,
    or OUT/model.pth for a suffix-less OUT) for `sam_model_registry[...](checkpoint=...)`.
    hf: directory OUT with model.safetensors + config.json. An existing file or a
    non-empty directory is refused unless `force`. Returns the path written."""
    if fmt not in ("official", "hf"):
        raise ConversionError(f"unknown format {fmt!r}; choose official or hf")
    out = os.fspath(out)
    if fmt == "hf":
        prepare_hf_dir(out, force)
    else:
        out = export_path(out, "model.pth", force)
    params, meta = load_checkpoint(ckpt_dir, "SAM", ("sam_",))
    sd, extra = to_state_dict(params, meta, fmt)
    if fmt == "hf":
        sd = {k: v for k, v in sd.items() if k != _HF_TIED_PE}  # tied: save_pretrained writes it once
        write_state_dict(sd, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(extra["config"], f, indent=2)
        return out
    return write_state_dict(sd, out)
