"""MAE / ViT weights: official MAE `.pth`, timm ViT and Hugging Face ViTMAE <-> segjax.

Legend: D encoder width, E decoder width, L patches, P patch size, N heads.

Sources (read by `segjax.convert.common.read_state_dict`):
  official  `{'model': sd}` from facebookresearch/mae: `mae_pretrain_vit_*` (encoder),
            `*_full` / `mae_visualize_*` (with decoder), `mae_finetuned_*` (classifier).
  timm      a `VisionTransformer` state dict: the same names as official MAE.
  hf        transformers ViTMAE: the hub's names (`vit.encoder.layer.i.attention.
            attention.query`), transformers>=5 module names (`vit.layers.i.attention.
            q_proj`), and what transformers 5.x `save_pretrained` writes (decoder layers
            as `decoder.decoder_encoder.layer.i`). `ViTMAEModel` (no `vit.` prefix) too.

Checkpoint metadata convention (what `convert` writes beside the params):
  meta['params'] is one of
    'mae'             full MAE (encoder + decoder): meta['model'] = 'mae_vit_*',
                      model_kwargs rebuild it exactly; has_decoder = True.
    'mae_encoder'     encoder only (`mae_pretrain_*`, a timm ViT without head):
                      meta['model'] = 'mae_vit_*', model_kwargs hold the encoder fields
                      (decoder fields stay the builder defaults), has_decoder = False.
                      Params are the MAE encoder leaves (patch_embed, cls_token,
                      pos_embed, blocks_i, norm); no decoder_*, mask_token.
    'vit_classifier'  a classifier (official fine-tuned, timm with head):
                      meta['model'] = 'vit_*' with num_classes / global_pool.
  Encoder leaves have the same paths in MAE and VisionTransformer, so fine-tuning
  (`checkpoint.merge_params`) loads either MAE kind by path with
  allow_missing=[r'^head/', r'^fc_norm/'] and allow_unexpected=[r'^norm/',
  r'^decoder_', r'^mask_token$'].
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import flatten_paths, load_params, save_params
from segjax.convert.common import (
    ConversionError,
    Report,
    Rule,
    StateDict,
    check_leaves,
    read_state_dict,
    rename,
    unflatten,
    unrename,
    write_state_dict,
)
from segjax.models.vit import sincos_posemb_2d

# ----------------------------------------------------------------------------- tables

# Block leaves, official / timm: (torch leaf, segjax leaf, layout)
_OFFICIAL_BLOCK = (
    ("norm1.weight", "norm1/scale", "copy"),
    ("norm1.bias", "norm1/bias", "copy"),
    ("attn.qkv.weight", "attn/qkv/kernel", "linear"),
    ("attn.qkv.bias", "attn/qkv/bias", "copy"),
    ("attn.proj.weight", "attn/proj/kernel", "linear"),
    ("attn.proj.bias", "attn/proj/bias", "copy"),
    ("norm2.weight", "norm2/scale", "copy"),
    ("norm2.bias", "norm2/bias", "copy"),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear"),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy"),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear"),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy"),
)

# Top-level leaves, official / timm
_OFFICIAL_TOP = (
    ("cls_token", "cls_token", "copy"),
    ("pos_embed", "pos_embed", "copy"),
    ("patch_embed.proj.weight", "patch_embed/proj/kernel", "conv"),
    ("patch_embed.proj.bias", "patch_embed/proj/bias", "copy"),
    ("norm.weight", "norm/scale", "copy"),
    ("norm.bias", "norm/bias", "copy"),
    ("fc_norm.weight", "fc_norm/scale", "copy"),
    ("fc_norm.bias", "fc_norm/bias", "copy"),
    ("head.weight", "head/kernel", "linear"),
    ("head.bias", "head/bias", "copy"),
    ("decoder_embed.weight", "decoder_embed/kernel", "linear"),
    ("decoder_embed.bias", "decoder_embed/bias", "copy"),
    ("mask_token", "mask_token", "copy"),
    ("decoder_pos_embed", "decoder_pos_embed", "copy"),
    ("decoder_norm.weight", "decoder_norm/scale", "copy"),
    ("decoder_norm.bias", "decoder_norm/bias", "copy"),
    ("decoder_pred.weight", "decoder_pred/kernel", "linear"),
    ("decoder_pred.bias", "decoder_pred/bias", "copy"),
)

OFFICIAL_RULES: tuple[Rule, ...] = (
    *(Rule((s,), d, lay) for s, d, lay in _OFFICIAL_TOP),
    *(Rule((f"{tp}.{{i}}.{s}",), f"{dp}_{{i}}/{d}", lay)
      for tp, dp in (("blocks", "blocks"), ("decoder_blocks", "decoder_blocks"))
      for s, d, lay in _OFFICIAL_BLOCK),
)

# Hugging Face spellings, by `naming` index: 0 'legacy' (the hub's checkpoints, loads in
# transformers 4.x and 5.x), 1 'v5' (transformers>=5 module names: `model.state_dict()`
# there), 2 'v5_saved' (what transformers 5.x save_pretrained writes back).
HF_NAMINGS = ("legacy", "v5", "v5_saved")
_HF_LAYER_PREFIX = {
    "blocks": ("vit.encoder.layer.{i}.", "vit.layers.{i}.", "vit.encoder.layer.{i}."),
    "decoder_blocks": ("decoder.decoder_layers.{i}.", "decoder.decoder_layers.{i}.",
                       "decoder.decoder_encoder.layer.{i}."),
}
# (legacy leaf, v5 leaf, segjax leaf, layout, part of the fused qkv)
_HF_LAYER = (
    ("attention.attention.query.weight", "attention.q_proj.weight", "attn/qkv/kernel", "linear", (0, 3)),
    ("attention.attention.key.weight", "attention.k_proj.weight", "attn/qkv/kernel", "linear", (1, 3)),
    ("attention.attention.value.weight", "attention.v_proj.weight", "attn/qkv/kernel", "linear", (2, 3)),
    ("attention.attention.query.bias", "attention.q_proj.bias", "attn/qkv/bias", "copy", (0, 3)),
    ("attention.attention.key.bias", "attention.k_proj.bias", "attn/qkv/bias", "copy", (1, 3)),
    ("attention.attention.value.bias", "attention.v_proj.bias", "attn/qkv/bias", "copy", (2, 3)),
    ("attention.output.dense.weight", "attention.o_proj.weight", "attn/proj/kernel", "linear", None),
    ("attention.output.dense.bias", "attention.o_proj.bias", "attn/proj/bias", "copy", None),
    ("layernorm_before.weight", "layernorm_before.weight", "norm1/scale", "copy", None),
    ("layernorm_before.bias", "layernorm_before.bias", "norm1/bias", "copy", None),
    ("layernorm_after.weight", "layernorm_after.weight", "norm2/scale", "copy", None),
    ("layernorm_after.bias", "layernorm_after.bias", "norm2/bias", "copy", None),
    ("intermediate.dense.weight", "mlp.fc1.weight", "mlp/fc1/kernel", "linear", None),
    ("intermediate.dense.bias", "mlp.fc1.bias", "mlp/fc1/bias", "copy", None),
    ("output.dense.weight", "mlp.fc2.weight", "mlp/fc2/kernel", "linear", None),
    ("output.dense.bias", "mlp.fc2.bias", "mlp/fc2/bias", "copy", None),
)
_HF_TOP = (
    ("vit.embeddings.cls_token", "cls_token", "copy"),
    ("vit.embeddings.position_embeddings", "pos_embed", "copy"),
    ("vit.embeddings.patch_embeddings.projection.weight", "patch_embed/proj/kernel", "conv"),
    ("vit.embeddings.patch_embeddings.projection.bias", "patch_embed/proj/bias", "copy"),
    ("vit.layernorm.weight", "norm/scale", "copy"),
    ("vit.layernorm.bias", "norm/bias", "copy"),
    ("decoder.decoder_embed.weight", "decoder_embed/kernel", "linear"),
    ("decoder.decoder_embed.bias", "decoder_embed/bias", "copy"),
    ("decoder.mask_token", "mask_token", "copy"),
    ("decoder.decoder_pos_embed", "decoder_pos_embed", "copy"),
    ("decoder.decoder_norm.weight", "decoder_norm/scale", "copy"),
    ("decoder.decoder_norm.bias", "decoder_norm/bias", "copy"),
    ("decoder.decoder_pred.weight", "decoder_pred/kernel", "linear"),
    ("decoder.decoder_pred.bias", "decoder_pred/bias", "copy"),
)
HF_RULES: tuple[Rule, ...] = (
    *(Rule((s,), d, lay) for s, d, lay in _HF_TOP),
    *(Rule(tuple(pre + (legacy, v5, legacy)[k] for k, pre in enumerate(_HF_LAYER_PREFIX[dp])),
           f"{dp}_{{i}}/{d}", lay, part)
      for dp in _HF_LAYER_PREFIX for legacy, v5, d, lay, part in _HF_LAYER),
)

# Source keys that are dropped without complaint. Kept explicit and short.
KNOWN_IGNORABLE: dict[str, tuple[str, ...]] = {
    "official": (r"(^|\.)num_batches_tracked$",),
    "hf": (r"(^|\.)num_batches_tracked$",),
}

# Head counts are not in a fused-qkv state dict. Widths of the released models:
# ViT-Ti/S/B/L/H/g/G and the MAE decoders (He et al.: 512 wide, 16 heads).
_ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
_DECODER_HEADS = {512: 16}
_DECODER_PREFIXES = (r"^decoder_", r"^mask_token$")

# ----------------------------------------------------------------------------- detection


def detect_format(sd: StateDict) -> str:
    """'hf' or 'official' (timm shares its names); a clear error for other families."""
    keys = list(sd)
    if any(re.search(r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$", k) for k in keys):
        return "hf"
    sam = any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in keys) or any(
        re.search(r"(^|\.)(rel_pos_[hw]|neck\.0\.weight)$", k) for k in keys)
    if sam:
        raise ConversionError(
            "this is a Segment Anything checkpoint (image_encoder/prompt_encoder/mask_decoder, "
            "rel_pos or neck tensors), not MAE/ViT; use the SAM converter")
    if "patch_embed.proj.weight" in sd and any(re.match(r"blocks\.\d+\.attn\.qkv\.weight$", k) for k in keys):
        return "official"
    guess = "an unknown model"
    if any(k.startswith("backbone.body.") for k in keys):
        guess = "a torchvision detection model (Mask R-CNN / Faster R-CNN)"
    elif "conv1.weight" in sd and any(k.startswith("layer1.") for k in keys):
        guess = "a ResNet"
    elif any(".blocks." in k or k.startswith("blocks.") for k in keys):
        guess = "a transformer with a different layout (no fused attn.qkv / patch_embed.proj)"
    raise ConversionError(
        f"not an MAE / ViT checkpoint: this looks like {guess}. Expected official MAE / timm keys "
        f"('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight') or Hugging Face ViTMAE keys "
        f"('vit.embeddings.patch_embeddings.projection.weight'). First keys: {keys[:8]}")


def _normalise_keys(sd: StateDict, notes: list[str]) -> StateDict:
    if sd and all(k.startswith("module.") for k in sd):  # DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped the 'module.' prefix (DistributedDataParallel)")
    if any(k.startswith("embeddings.patch_embeddings.") for k in sd):  # ViTMAEModel
        sd = {f"vit.{k}": v for k, v in sd.items()}
        notes.append("ViTMAEModel keys (no 'vit.' prefix): read as ViTMAEForPreTraining's encoder")
    return sd


# ----------------------------------------------------------------------------- inference


def _heads(width: int, explicit: int | None, config_value: int | None, table: dict[int, int],
           what: str, notes: list[str]) -> tuple[int, str]:
    if explicit:
        return explicit, "argument"
    if config_value:
        return int(config_value), "config.json"
    if width in table:
        return table[width], f"standard {what} width table"
    n = max(width // 64, 1)
    notes.append(f"WARNING: {what} heads not given and width {width} is not a standard one: "
                 f"assumed {n} heads (head_dim 64); pass --{what}-num-heads to override")
    return n, "head_dim 64 rule"


def _depth(flat: StateDict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in flat if (m := re.match(rf"{prefix}_(\d+)/", k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ConversionError(f"{prefix} indices are not contiguous: {sorted(idx)}")
    return len(idx)


def _abstract_leaves(name: str, kwargs: dict, img_size: int, in_chans: int) -> dict[str, tuple]:
    model = models.build(name, **kwargs)
    x = jnp.zeros((1, img_size, img_size, in_chans), jnp.float32)
    extra = {"noise": jnp.zeros((1, model.num_patches))} if name.startswith("mae_") else {}

    def init():
        return model.init(jax.random.key(0), x, **extra)
    shapes = nn.meta.unbox(jax.eval_shape(init))["params"]
    return {k: tuple(v.shape) for k, v in flatten_paths(shapes).items()}


def _registry_name(kind: str, kw: dict, variant: str | None) -> str:
    prefix = "vit_" if kind == "vit_classifier" else "mae_vit_"
    if variant:
        name = variant if variant in models.MODELS else prefix + variant
        if name not in models.MODELS or not name.startswith(prefix):
            raise ConversionError(f"variant {variant!r} is not a registered {prefix}* model; "
                                  f"choices: {sorted(n for n in models.MODELS if n.startswith(prefix))}")
        return name
    arch = ("patch_size", "embed_dim", "depth", "num_heads")
    names = sorted(n for n in models.MODELS if n.startswith(prefix))
    for n in names:
        if all(models.MODELS[n].defaults.get(a) == kw[a] for a in arch):
            return n
    for n in names:  # same width and patch: the nearest builder; kwargs complete it
        if all(models.MODELS[n].defaults.get(a) == kw[a] for a in arch[:2]):
            return n
    for n in names:
        if models.MODELS[n].defaults.get("embed_dim") == kw["embed_dim"]:
            return n
    return prefix + "b16"


def _check_hf_config(cfg: dict, kw: dict, report: Report) -> None:
    def expect(key, value, default=None):
        got = cfg.get(key, default)
        if isinstance(got, (list, tuple)) and len(set(got)) == 1:  # image_size=[224, 224]
            got = got[0]
        if got is not None and got != value:
            report.shape_errors.append(f"config.json {key}={got!r} but the weights imply {value!r}")

    expect("hidden_size", kw["embed_dim"])
    expect("num_hidden_layers", kw["depth"])
    expect("patch_size", kw["patch_size"])
    expect("image_size", kw["img_size"])
    expect("num_channels", kw["in_chans"])
    expect("intermediate_size", int(kw["embed_dim"] * kw["mlp_ratio"]))
    if cfg.get("hidden_act", "gelu") != "gelu":
        report.shape_errors.append(f"hidden_act {cfg['hidden_act']!r} unsupported (segjax uses exact GELU)")
    if not cfg.get("qkv_bias", True):
        report.shape_errors.append("qkv_bias=False is unsupported by segjax MAE")
    if "decoder_embed_dim" in kw:
        expect("decoder_hidden_size", kw["decoder_embed_dim"])
        expect("decoder_num_hidden_layers", kw["decoder_depth"])
        expect("decoder_intermediate_size", int(kw["decoder_embed_dim"] * kw["mlp_ratio"]))


# ----------------------------------------------------------------------------- torch -> segjax


def from_state_dict(
    sd: StateDict,
    *,
    config: dict | None = None,
    source_info: dict | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool | None = None,
    ln_eps: float | None = None,
    variant: str | None = None,
    ignore: Iterable[str] = (),
    posemb_order: str = "wh",
) -> tuple[dict[str, Any], dict, Report]:
    """A torch MAE / ViT state dict -> (segjax params, meta, report).

    Args:
      sd: key -> numpy array, official / timm / Hugging Face naming (auto-detected).
      config: a Hugging Face `config.json` dict (heads, eps, norm_pix_loss, mask_ratio).
      source_info: recorded in meta['source'] (path, file format, ...).
      num_heads, decoder_num_heads: override the head counts (not in a fused state dict).
      norm_pix_loss: the decoder's target; default from config.json, else the official
        file name (`*_full` True, `mae_visualize_*` False), else False.
      ln_eps: LayerNorm epsilon; default config.json's (transformers: 1e-12), else 1e-6.
      variant: registry name (or suffix such as 'b16') to record; default inferred.
      ignore: regexes of source keys that may be dropped.
      posemb_order: channel order of a table that must be generated (a Hugging Face
        checkpoint without `decoder.decoder_pos_embed`); installed transformers 5.x
        builds its table (h, w) and rotates it to the official "wh" order.
    Returns:
      params: nested dict of float32 numpy arrays in segjax naming (no 'params' level).
      meta: {'model', 'model_kwargs', 'params', 'has_decoder', 'source'} (see module doc).
      report: what was used / ignored; raises `ConversionError` instead of returning a
        report with unmapped, missing, unexpected or mis-shaped entries.
    """
    report = Report()
    source = dict(source_info or {})
    sd = _normalise_keys(dict(sd), report.notes)
    fmt = detect_format(sd)
    cfg = config if (fmt == "hf" and config) else {}
    if fmt == "hf" and cfg.get("model_type", "vit_mae") != "vit_mae":
        raise ConversionError(f"config.json model_type is {cfg['model_type']!r}, not 'vit_mae'")
    rules = HF_RULES if fmt == "hf" else OFFICIAL_RULES
    flat, report = rename(sd, rules, (*KNOWN_IGNORABLE[fmt], *ignore), report)
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    report.raise_if_bad("renaming")
    for key in ("cls_token", "pos_embed", "patch_embed/proj/kernel", "blocks_0/mlp/fc1/kernel"):
        if key not in flat:
            report.missing.append(key)
    report.raise_if_bad("reading the encoder")

    kind = ("vit_classifier" if "head/kernel" in flat else
            "mae" if any(k.startswith("decoder_") for k in flat) else "mae_encoder")
    d = flat["cls_token"].shape[-1]
    kernel = flat["patch_embed/proj/kernel"]  # (P, P, C, D)
    p, in_chans = kernel.shape[0], kernel.shape[2]
    rows = flat["pos_embed"].shape[1]
    g = math.isqrt(rows - 1)
    if g * g != rows - 1:
        raise ConversionError(
            f"pos_embed has {rows} rows: not 1 class token + a square grid (timm "
            "no_embed_class / registers / non-square inputs are not supported)")
    hidden = flat["blocks_0/mlp/fc1/kernel"].shape[1]
    kw: dict[str, Any] = dict(img_size=g * p, patch_size=p, embed_dim=d, depth=_depth(flat, "blocks"),
                              mlp_ratio=hidden / d)
    if int(d * kw["mlp_ratio"]) != hidden:
        raise ConversionError(f"MLP width {hidden} is not int({d} * ratio) for any float ratio")
    heads, source["num_heads_from"] = _heads(d, num_heads, cfg.get("num_attention_heads"),
                                             _ENCODER_HEADS, "encoder", report.notes)
    kw["num_heads"] = heads
    if ln_eps is not None:
        kw["ln_eps"], source["ln_eps_from"] = float(ln_eps), "argument"
    elif fmt == "hf":
        kw["ln_eps"] = float(cfg.get("layer_norm_eps", 1e-12))
        source["ln_eps_from"] = "config.json" if "layer_norm_eps" in cfg else "transformers default"
    else:
        kw["ln_eps"], source["ln_eps_from"] = 1e-6, "official MAE / timm default"

    generated = []
    if kind == "vit_classifier":
        if in_chans != 3:
            raise ConversionError(f"the ViT classifier takes 3-channel images; weights have {in_chans}")
        kw["num_classes"] = flat["head/kernel"].shape[1]
        kw["global_pool"] = "fc_norm/scale" in flat
    else:
        kw["in_chans"] = in_chans
    if kind == "mae":
        e = flat["decoder_embed/kernel"].shape[1] if "decoder_embed/kernel" in flat else None
        if e is None:
            report.missing.append("decoder_embed/kernel")
            report.raise_if_bad("reading the decoder")
        kw.update(decoder_embed_dim=e, decoder_depth=_depth(flat, "decoder_blocks"))
        kw["decoder_num_heads"], source["decoder_num_heads_from"] = _heads(
            e, decoder_num_heads, cfg.get("decoder_num_attention_heads"), _DECODER_HEADS, "decoder",
            report.notes)
        if "decoder_pos_embed" not in flat and fmt == "hf":
            # NOTE: transformers 5.x leaves a missing decoder_pos_embed at zeros (its init is
            # skipped for loaded models); the table MAE was trained with is the fixed sin-cos.
            flat["decoder_pos_embed"] = sincos_posemb_2d(e, g, g, True, posemb_order)[None]
            generated.append(f"decoder_pos_embed (sin-cos, order {posemb_order!r})")
            report.notes.append(f"generated decoder_pos_embed: sin-cos table, channel order {posemb_order!r}")
        if norm_pix_loss is not None:
            kw["norm_pix_loss"], source["norm_pix_loss_from"] = bool(norm_pix_loss), "argument"
        elif "norm_pix_loss" in cfg:
            kw["norm_pix_loss"], source["norm_pix_loss_from"] = bool(cfg["norm_pix_loss"]), "config.json"
        else:
            fname = os.path.basename(source.get("path", "") or "")
            kw["norm_pix_loss"] = "_full" in fname and "visualize" not in fname
            source["norm_pix_loss_from"] = f"file name {fname!r}" if fname else "default"
            report.notes.append(f"norm_pix_loss={kw['norm_pix_loss']} from {source['norm_pix_loss_from']} "
                                "(official: *_full trained with it, mae_visualize_* without); "
                                "pass --norm-pix-loss/--no-norm-pix-loss to set it")
        if "mask_ratio" in cfg:
            kw["mask_ratio"] = float(cfg["mask_ratio"])
    if cfg:
        _check_hf_config(cfg, kw, report)

    name = _registry_name(kind, kw, variant)
    abstract = _abstract_leaves(name, kw, kw["img_size"], in_chans)
    check_leaves(flat, abstract, report, allow_missing=_DECODER_PREFIXES if kind == "mae_encoder" else ())
    report.raise_if_bad(f"converting to {name}")

    source.update(naming="hf" if fmt == "hf" else "official/timm", num_tensors=len(sd),
                  generated=generated, ignored=report.ignored)
    if cfg:
        source["hf_config"] = cfg
    meta = {"model": name, "model_kwargs": kw, "params": kind, "has_decoder": kind == "mae",
            "source": source}
    return unflatten(flat), meta, report


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> tuple[dict, Report]:
    """Reads `src` (file or HF directory), converts, writes a segjax checkpoint to out_dir.

    kwargs: those of `from_state_dict`. Returns (meta, report).
    """
    sd, info = read_state_dict(src)
    config = info.pop("config", None)
    params, meta, report = from_state_dict(sd, config=config, source_info=info, **kwargs)
    save_params(out_dir, params, meta)
    return meta, report


# ----------------------------------------------------------------------------- segjax -> torch


def _strip_params_level(params: dict) -> dict:
    return params["params"] if set(params) == {"params"} else params


def to_state_dict(params: dict, meta: dict, fmt: str, hf_naming: str = "legacy") -> tuple[StateDict, dict]:
    """segjax params -> a torch state dict (numpy arrays) for `fmt`.

    Args:
      params: nested params (as `load_params` returns; a single 'params' level is fine).
      meta: the checkpoint meta (see module doc).
      fmt: 'official' (facebookresearch/mae naming; wrap as {'model': sd} to save),
        'timm' (`timm.models.vision_transformer.VisionTransformer`: the encoder, plus
        fc_norm/head for a classifier; an MAE decoder is dropped), or 'hf'
        (`ViTMAEForPreTraining`, or `ViTMAEModel` for an encoder-only checkpoint).
      hf_naming: one of HF_NAMINGS; 'legacy' is the hub's spelling, which
        `from_pretrained` reads in transformers 4.x and 5.x; 'v5' matches
        `model.state_dict()` of transformers>=5 (for `load_state_dict(strict=True)`).
    Returns:
      (state dict, extra) where extra holds 'config' (hf: config.json) or
      'timm_kwargs' (timm: VisionTransformer constructor arguments) and 'dropped'.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(_strip_params_level(params)).items()}
    kind = meta.get("params", "mae")
    model = models.build(meta["model"], **meta.get("model_kwargs", {}))
    extra: dict[str, Any] = {"dropped": []}
    if fmt == "official":
        return unrename(flat, OFFICIAL_RULES), extra
    if fmt == "timm":
        keep = {k: v for k, v in flat.items() if not any(re.search(p, k) for p in _DECODER_PREFIXES)}
        extra["dropped"] = sorted(set(flat) - set(keep))
        cls = kind == "vit_classifier"
        extra["timm_kwargs"] = dict(
            img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
            depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, qkv_bias=True,
            num_classes=model.num_classes if cls else 0,
            global_pool=("avg" if model.global_pool else "token") if cls else "token",
            in_chans=3 if cls else model.in_chans)
        return unrename(keep, OFFICIAL_RULES), extra
    if fmt == "hf":
        if kind == "vit_classifier":
            raise ConversionError("transformers' ViTMAE has no classifier; export a classifier as "
                                  "'timm' or 'official'")
        naming = HF_NAMINGS.index(hf_naming)
        sd = unrename(flat, HF_RULES, naming)
        encoder_only = kind == "mae_encoder"
        if encoder_only:  # ViTMAEModel: the same keys without the 'vit.' prefix
            sd = {k[len("vit."):]: v for k, v in sd.items()}
        extra["config"] = dict(
            architectures=["ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"],
            model_type="vit_mae", hidden_size=model.embed_dim, num_hidden_layers=model.depth,
            num_attention_heads=model.num_heads, intermediate_size=int(model.embed_dim * model.mlp_ratio),
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            initializer_range=0.02, layer_norm_eps=model.ln_eps, image_size=model.img_size,
            patch_size=model.patch_size, num_channels=model.in_chans, qkv_bias=True,
            decoder_num_attention_heads=model.decoder_num_heads,
            decoder_hidden_size=model.decoder_embed_dim, decoder_num_hidden_layers=model.decoder_depth,
            decoder_intermediate_size=int(model.decoder_embed_dim * model.mlp_ratio),
            mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss)
        return sd, extra
    raise ValueError(f"unknown format {fmt!r}; choose official, timm or hf")


def export(ckpt_dir: str | os.PathLike, out: str | os.PathLike, fmt: str,
           hf_naming: str = "legacy") -> str:
    """Writes a segjax checkpoint as `fmt` (see `to_state_dict`). Returns the path written.

    official: OUT.pth holding {'model': sd} (torch). timm: OUT.safetensors or OUT.pth.
    hf: directory OUT with model.safetensors + config.json (`from_pretrained(OUT)`).
    An `out` without a suffix is a directory for every format.
    """
    import json

    params, meta = load_params(ckpt_dir)
    sd, extra = to_state_dict(params, meta, fmt, hf_naming)
    out = os.fspath(out)
    if fmt == "hf":
        os.makedirs(out, exist_ok=True)
        write_state_dict(sd, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(extra["config"], f, indent=2)
        return out
    if not os.path.splitext(out)[1]:
        out = os.path.join(out, "model.pth" if fmt == "official" else "model.safetensors")
    return write_state_dict(sd, out, wrap_key="model" if fmt == "official" else None)
