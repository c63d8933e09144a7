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
  meta['model'] is the registry builder equal to the inferred architecture, or the
  nearest one (fewest differing fields); meta['model_kwargs'] holds every inferred
  field, so `models.build(meta['model'], **meta['model_kwargs'])` rebuilds the network;
  meta['overrides'] are the fields that differ from the builder's ({} for an exact
  registry variant); meta['architecture'] describes it in words (widths, depths, heads,
  MLP widths, qkv bias, activation, eps, ...). Honoured from the weights' shapes: widths,
  depths, encoder and decoder MLP widths (decoder_mlp_ratio when it differs from the
  encoder's), qkv bias, patch / image size, channels; from a Hugging Face config.json
  (checked against the shapes): heads, layer_norm_eps, hidden_act, norm_pix_loss,
  mask_ratio.
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
    prepare_hf_dir,
    read_state_dict,
    rename,
    unflatten,
    unrename,
    write_checkpoint,
    write_state_dict,
)
from segjax.models.vit import ACTIVATIONS, sincos_posemb_2d

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
# segjax activation -> the timm `act_layer` name of the same function
_TIMM_ACT = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_python_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_tanh",
             "quick_gelu": "quick_gelu", "relu": "relu", "relu6": "relu6", "leaky_relu": "leaky_relu",
             "silu": "silu", "swish": "silu", "mish": "mish", "hardswish": "hardswish", "tanh": "tanh",
             "sigmoid": "sigmoid", "linear": "identity"}

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


def mlp_ratio_for(hidden: int, width: int) -> float:
    """The float ratio r with int(width * r) == hidden: the MLP width formula of segjax's,
    timm's and the official MAE's blocks (hidden / width itself, or the next float above
    it where the product rounds down)."""
    r = hidden / width
    for _ in range(8):
        if int(width * r) == hidden:
            return r
        r = float(np.nextafter(r, np.inf))
    raise ConversionError(f"MLP width {hidden} is not int({width} * ratio) for any float ratio")


def describe(kw: dict, kind: str = "mae") -> str:
    """The architecture in words: every field that changes the network."""
    d, e = kw["embed_dim"], kw.get("decoder_embed_dim")
    img = kw.get("img_size")
    enc = (f"{img}x{img} images, patch {kw['patch_size']}, {kw.get('in_chans', 3)} channels; encoder width {d}, "
           f"depth {kw['depth']}, {kw['num_heads']} heads, MLP {int(d * kw.get('mlp_ratio', 4.0))}")
    common = (f"qkv bias {kw.get('qkv_bias', True)}, act {kw.get('act', 'gelu')}, "
              f"LayerNorm eps {kw.get('ln_eps', 1e-6):g}")
    if kind == "vit_classifier":
        return (f"ViT classifier: {enc}; {common}; {kw['num_classes']} classes, "
                f"{'mean-pool + fc_norm' if kw.get('global_pool') else 'class token'} head")
    if kind == "mae_encoder" or e is None:
        return f"MAE encoder: {enc}; {common}"
    ratio = kw.get("decoder_mlp_ratio") or kw.get("mlp_ratio", 4.0)
    return (f"MAE: {enc}; decoder width {e}, depth {kw['decoder_depth']}, {kw['decoder_num_heads']} heads, "
            f"MLP {int(e * ratio)}; {common}; norm_pix_loss {kw.get('norm_pix_loss', False)}, "
            f"mask_ratio {kw.get('mask_ratio', 0.75)}")


def _abstract_leaves(name: str, kwargs: dict, img_size: int, in_chans: int) -> dict[str, tuple]:
    model = models.build(name, **kwargs)
    x = jnp.zeros((1, img_size, img_size, in_chans), jnp.float32)
    extra = {"noise": jnp.zeros((1, model.num_patches))} if name.startswith("mae_") else {}

    def init():
        return model.init(jax.random.key(0), x, **extra)
    shapes = nn.meta.unbox(jax.eval_shape(init))["params"]
    return {k: tuple(v.shape) for k, v in flatten_paths(shapes).items()}


def _overrides(name: str, kw: dict) -> dict[str, Any]:
    """The fields of `kw` whose values differ from registry builder `name`'s."""
    proto = models.MODELS[name]()
    return {k: v for k, v in kw.items() if getattr(proto, k) != v}


def registry_name(kind: str, kw: dict, variant: str | None = None) -> tuple[str, dict[str, Any]]:
    """(registry name, the fields of `kw` that differ from it).

    `variant` (a name or a suffix such as 'b16') is checked and used as given; otherwise
    the registered `mae_vit_*` / `vit_*` builder with the fewest differing fields (none:
    `kw` is that variant exactly). `models.build(name, **kw)` rebuilds the model either way.
    """
    prefix = "vit_" if kind == "vit_classifier" else "mae_vit_"
    names = sorted(n for n in models.MODELS if n.startswith(prefix))
    if variant:
        name = variant if variant in models.MODELS else prefix + variant
        if name not in names:
            raise ConversionError(f"variant {variant!r} is not a registered {prefix}* model; choices: {names}")
        return name, _overrides(name, kw)
    return min(((n, _overrides(n, kw)) for n in names), key=lambda t: len(t[1]))


def _config_value(cfg: dict, key: str):
    got = cfg.get(key)
    if isinstance(got, (list, tuple)):
        if len(set(got)) != 1:
            raise ConversionError(
                f"config.json {key}={list(got)}: non-square {key.split('_')[0]}s are not supported "
                "(transformers' ViTMAEForPreTraining and segjax's MAE take square images and patches)")
        got = got[0]
    return got


def _check_hf_config(cfg: dict, kw: dict, kind: str, report: Report) -> None:
    """Every network field of a ViTMAEConfig against what the weights imply."""
    def expect(key, value):
        got = _config_value(cfg, key)
        if got is not None and got != value:
            report.shape_errors.append(f"config.json {key}={got!r} but the weights imply {value!r}")

    expect("hidden_size", kw["embed_dim"])
    expect("num_hidden_layers", kw["depth"])
    expect("patch_size", kw["patch_size"])
    expect("image_size", kw["img_size"])
    expect("num_channels", kw["in_chans"])
    if kw["depth"]:
        expect("intermediate_size", int(kw["embed_dim"] * kw["mlp_ratio"]))
    if kind == "mae":
        e = kw["decoder_embed_dim"]
        expect("decoder_hidden_size", e)
        expect("decoder_num_hidden_layers", kw["decoder_depth"])
        if kw["decoder_depth"]:
            expect("decoder_intermediate_size", int(e * (kw.get("decoder_mlp_ratio") or kw["mlp_ratio"])))
    if kw["depth"] or kw.get("decoder_depth"):
        expect("qkv_bias", kw.get("qkv_bias", True))
    if cfg.get("head_dim") not in (None, kw["embed_dim"] // kw["num_heads"]):
        report.shape_errors.append(f"config.json head_dim={cfg['head_dim']} is not hidden_size / heads "
                                   "(segjax attention uses width / heads)")


def _check_heads(width: int, heads: int, what: str) -> None:
    if heads <= 0 or width % heads:
        raise ConversionError(f"{what} width {width} is not divisible by {heads} heads "
                              "(segjax attention splits the width evenly)")


# ----------------------------------------------------------------------------- torch -> segjax


def _block_options(flat: dict, cfg: dict, fmt: str, ln_eps: float | None, act: str | None, source: dict,
                   report: Report) -> dict[str, Any]:
    """The blocks' LayerNorm eps, qkv bias and MLP activation: from the arguments, the
    tensors (qkv bias) or config.json, else the official defaults; `source` records where
    each came from."""
    if ln_eps is not None:
        eps, source["ln_eps_from"] = float(ln_eps), "argument"
    elif fmt == "hf":
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        source["ln_eps_from"] = "config.json" if "layer_norm_eps" in cfg else "transformers default"
    else:
        eps, source["ln_eps_from"] = 1e-6, "official MAE / timm default"
    biased = {prefix: f"{prefix}_0/attn/qkv/bias" in flat
              for prefix in ("blocks", "decoder_blocks") if f"{prefix}_0/attn/qkv/kernel" in flat}
    if len(set(biased.values())) > 1:
        raise ConversionError(f"qkv bias in {[k for k, v in biased.items() if v]} only; segjax's MAE "
                              "has one qkv_bias for encoder and decoder (as transformers and the official MAE)")
    qkv_bias = next(iter(biased.values())) if biased else bool(cfg.get("qkv_bias", True))
    if act is not None:
        source["act_from"] = "argument"
    elif "hidden_act" in cfg:
        act, source["act_from"] = cfg["hidden_act"], "config.json"
    else:
        act, source["act_from"] = "gelu", "official MAE / timm / transformers default"
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ConversionError(
            f"activation {act!r} ({source['act_from']}) is not supported by segjax; supported: "
            f"{sorted(ACTIVATIONS)} (activations with learned parameters, prelu and xielu, are not)")
    for prob in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if cfg.get(prob):
            report.notes.append(f"config.json {prob}={cfg[prob]} ignored: segjax's MAE trains without dropout")
    return {"ln_eps": eps, "qkv_bias": qkv_bias, "act": act}


def _decoder_kwargs(flat: dict, cfg: dict, fmt: str, g: int, kw: dict, decoder_num_heads: int | None,
                    norm_pix_loss: bool | None, posemb_order: str, source: dict, report: Report) -> list[str]:
    """Adds the MAE decoder's fields to `kw` (from its tensors, config.json and the
    arguments); generates a missing Hugging Face `decoder_pos_embed` in `flat`. Returns
    what was generated."""
    generated = []
    e = flat["decoder_embed/kernel"].shape[1] if "decoder_embed/kernel" in flat else None
    if e is None:
        report.missing.append("decoder_embed/kernel")
        report.raise_if_bad("reading the decoder")
    kw.update(decoder_embed_dim=e, decoder_depth=_depth(flat, "decoder_blocks"))
    kw["decoder_num_heads"], source["decoder_num_heads_from"] = _heads(
        e, decoder_num_heads, cfg.get("decoder_num_attention_heads"), _DECODER_HEADS, "decoder",
        report.notes)
    _check_heads(e, kw["decoder_num_heads"], "decoder")
    dec_fc1 = flat.get("decoder_blocks_0/mlp/fc1/kernel")
    if kw["decoder_depth"] and dec_fc1 is None:
        report.missing.append("decoder_blocks_0/mlp/fc1/kernel")
        report.raise_if_bad("reading the decoder")
    dec_hidden = (dec_fc1.shape[1] if dec_fc1 is not None else
                  int(cfg["decoder_intermediate_size"]) if cfg.get("decoder_intermediate_size") else None)
    if dec_hidden is not None and int(e * kw["mlp_ratio"]) != dec_hidden:
        kw["decoder_mlp_ratio"] = mlp_ratio_for(dec_hidden, e)
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
        if not 0.0 <= kw["mask_ratio"] < 1.0:
            raise ConversionError(f"config.json mask_ratio={cfg['mask_ratio']} is outside [0, 1)")
    return generated


def from_state_dict(
    sd: StateDict,
    *,
    config: dict | None = None,
    source_info: dict | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix_loss: bool | None = None,
    ln_eps: float | None = None,
    act: str | None = None,
    variant: str | None = None,
    ignore: Iterable[str] = (),
    posemb_order: str = "wh",
) -> tuple[dict[str, Any], dict, Report]:
    """A torch MAE / ViT state dict -> (segjax params, meta, report).

    Shapes give the widths, depths, MLP widths (encoder and decoder separately), patch
    and image size, channels and whether the attention has a qkv bias; a Hugging Face
    `config.json` gives what weights cannot (heads, eps, activation, norm_pix_loss,
    mask_ratio) and is checked against the weights for everything else.

    Args:
      sd: key -> numpy array, official / timm / Hugging Face naming (auto-detected).
      config: a Hugging Face `config.json` dict (a `ViTMAEConfig`).
      source_info: recorded in meta['source'] (path, file format, ...).
      num_heads, decoder_num_heads: override the head counts (not in a fused state dict).
      norm_pix_loss: the decoder's target; default from config.json, else the official
        file name (`*_full` True, `mae_visualize_*` False), else False.
      ln_eps: LayerNorm epsilon; default config.json's (transformers: 1e-12), else 1e-6.
      act: MLP activation (a transformers `hidden_act` name, see
        `segjax.models.vit.ACTIVATIONS`); default config.json's, else 'gelu'.
      variant: registry name (or suffix such as 'b16') to record; default inferred.
      ignore: regexes of source keys that may be dropped.
      posemb_order: channel order of a table that must be generated (a Hugging Face
        checkpoint without `decoder.decoder_pos_embed`); installed transformers 5.x
        builds its table (h, w) and rotates it to the official "wh" order.
    Returns:
      params: nested dict of float32 numpy arrays in segjax naming (no 'params' level).
      meta: {'model', 'model_kwargs', 'overrides', 'architecture', 'params',
        'has_decoder', 'source'} (see module doc).
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
    for key in ("image_size", "patch_size"):
        _config_value(cfg, key)  # non-square: a clear error before the shapes complain
    rules = HF_RULES if fmt == "hf" else OFFICIAL_RULES
    flat, report = rename(sd, rules, (*KNOWN_IGNORABLE[fmt], *ignore), report)
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    report.raise_if_bad("renaming")
    for key in ("cls_token", "pos_embed", "patch_embed/proj/kernel"):
        if key not in flat:
            report.missing.append(key)
    report.raise_if_bad("reading the encoder")

    kind = ("vit_classifier" if "head/kernel" in flat else
            "mae" if any(k.startswith(("decoder_", "mask_token")) for k in flat) else "mae_encoder")
    d = flat["cls_token"].shape[-1]
    kernel = flat["patch_embed/proj/kernel"]  # (P, P, C, D)
    p, in_chans = kernel.shape[0], kernel.shape[2]
    if kernel.shape[0] != kernel.shape[1]:
        raise ConversionError(f"patch projection {kernel.shape[:2]} is not square; segjax MAE patches are")
    rows = flat["pos_embed"].shape[1]
    g = math.isqrt(rows - 1)
    if g * g != rows - 1:
        raise ConversionError(
            f"pos_embed has {rows} rows: not 1 class token + a square grid (timm "
            "no_embed_class / registers / non-square inputs are not supported)")
    depth = _depth(flat, "blocks")
    if depth:
        hidden = flat["blocks_0/mlp/fc1/kernel"].shape[1] if "blocks_0/mlp/fc1/kernel" in flat else None
        if hidden is None:
            report.missing.append("blocks_0/mlp/fc1/kernel")
            report.raise_if_bad("reading the encoder")
        ratio = mlp_ratio_for(hidden, d)
    else:  # no encoder blocks: nothing to infer the MLP width from
        ratio = mlp_ratio_for(int(cfg["intermediate_size"]), d) if cfg.get("intermediate_size") else 4.0
    kw: dict[str, Any] = dict(img_size=g * p, patch_size=p, embed_dim=d, depth=depth, mlp_ratio=ratio)
    heads, source["num_heads_from"] = _heads(d, num_heads, cfg.get("num_attention_heads"),
                                             _ENCODER_HEADS, "encoder", report.notes)
    _check_heads(d, heads, "encoder")
    kw["num_heads"] = heads
    opts = _block_options(flat, cfg, fmt, ln_eps, act, source, report)
    kw["ln_eps"] = opts["ln_eps"]

    generated: list[str] = []
    if kind == "vit_classifier":
        if in_chans != 3:
            raise ConversionError(f"the ViT classifier takes 3-channel images; weights have {in_chans}")
        kw["num_classes"] = flat["head/kernel"].shape[1]
        kw["global_pool"] = "fc_norm/scale" in flat
    else:
        kw["in_chans"] = in_chans
    if opts["act"] != "gelu":
        kw["act"] = opts["act"]
    if not opts["qkv_bias"]:
        kw["qkv_bias"] = False
    if kind == "mae":
        generated = _decoder_kwargs(flat, cfg, fmt, g, kw, decoder_num_heads, norm_pix_loss, posemb_order,
                                    source, report)
    arch = describe(kw, kind)
    if cfg:
        _check_hf_config(cfg, kw, kind, report)
        report.raise_if_bad(f"checking config.json against the weights ({arch})")

    name, overrides = registry_name(kind, kw, variant)
    what = f"{name}{' + ' + str(overrides) if overrides else ''} ({arch})"
    try:
        abstract = _abstract_leaves(name, kw, kw["img_size"], in_chans)
    except ValueError as e:
        raise ConversionError(f"cannot build {what}: {e}") from e
    check_leaves(flat, abstract, report, allow_missing=_DECODER_PREFIXES if kind == "mae_encoder" else ())
    report.raise_if_bad(f"converting to {what}")

    source.update(naming="hf" if fmt == "hf" else "official/timm", num_tensors=len(sd),
                  generated=generated, ignored=report.ignored)
    if cfg:
        source["hf_config"] = cfg
    meta = {"model": name, "model_kwargs": kw, "overrides": overrides, "architecture": arch,
            "params": kind, "has_decoder": kind == "mae", "source": source}
    return unflatten(flat), meta, report


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
            **kwargs) -> tuple[dict, Report]:
    """Reads `src` (file or HF directory), converts, writes a segjax checkpoint to out_dir.

    out_dir must be new or empty unless `force` (see `common.write_checkpoint`).
    kwargs: those of `from_state_dict`. Returns (meta, report).
    """
    check_output_dir(out_dir, force)
    sd, info = read_state_dict(src)
    config = info.pop("config", None)
    params, meta, report = from_state_dict(sd, config=config, source_info=info, **kwargs)
    write_checkpoint(out_dir, params, meta, force)
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
      'timm_kwargs' (timm: VisionTransformer constructor arguments), 'dropped', and
      'notes': fields of the model that the format's reference code cannot express or
      that the file does not record (official and timm read back as GELU, eps 1e-6).
    Raises:
      ConversionError for an activation the format's reference model cannot have
      (official MAE: GELU only; timm: its named activations).
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_paths(_strip_params_level(params)).items()}
    kind = meta.get("params", "mae")
    model = models.build(meta["model"], **meta.get("model_kwargs", {}))
    act = getattr(model, "act", "gelu")
    dec_ratio = getattr(model, "decoder_mlp_ratio", None) or model.mlp_ratio
    extra: dict[str, Any] = {"dropped": [], "notes": []}
    if fmt in ("official", "timm") and model.ln_eps != 1e-6:
        extra["notes"].append(
            f"LayerNorm eps {model.ln_eps:g} is not recorded in {fmt} files (they read back as 1e-6)"
            + ("; build timm with norm_layer=partial(nn.LayerNorm, eps=...)" if fmt == "timm" else ""))
    if fmt == "official":
        if act != "gelu":
            raise ConversionError(f"the official MAE is GELU-only; this model uses {act!r} (export as 'hf')")
        if not getattr(model, "qkv_bias", True) or (kind == "mae" and dec_ratio != model.mlp_ratio):
            extra["notes"].append("the official models_mae.MaskedAutoencoderViT cannot build this model (it has "
                                  "a qkv bias and one MLP ratio for encoder and decoder); segjax reads the "
                                  "file back exactly")
        return unrename(flat, OFFICIAL_RULES), extra
    if fmt == "timm":
        if act not in _TIMM_ACT:
            raise ConversionError(f"timm has no activation equal to {act!r}; supported: {sorted(_TIMM_ACT)}")
        keep = {k: v for k, v in flat.items() if not any(re.search(p, k) for p in _DECODER_PREFIXES)}
        extra["dropped"] = sorted(set(flat) - set(keep))
        cls = kind == "vit_classifier"
        extra["timm_kwargs"] = dict(
            img_size=model.img_size, patch_size=model.patch_size, embed_dim=model.embed_dim,
            depth=model.depth, num_heads=model.num_heads, mlp_ratio=model.mlp_ratio,
            qkv_bias=model.qkv_bias, num_classes=model.num_classes if cls else 0,
            global_pool=("avg" if model.global_pool else "token") if cls else "token",
            in_chans=3 if cls else model.in_chans)
        if act != "gelu":
            extra["timm_kwargs"]["act_layer"] = _TIMM_ACT[act]
            extra["notes"].append(f"activation {act!r} is not recorded in timm files: build with "
                                  f"act_layer={_TIMM_ACT[act]!r} (timm_kwargs)")
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
            hidden_act=act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            initializer_range=0.02, layer_norm_eps=model.ln_eps, image_size=model.img_size,
            patch_size=model.patch_size, num_channels=model.in_chans, qkv_bias=model.qkv_bias,
            decoder_num_attention_heads=model.decoder_num_heads,
            decoder_hidden_size=model.decoder_embed_dim, decoder_num_hidden_layers=model.decoder_depth,
            decoder_intermediate_size=int(model.decoder_embed_dim * dec_ratio),
            mask_ratio=model.mask_ratio, norm_pix_loss=model.norm_pix_loss)
        return sd, extra
    raise ValueError(f"unknown format {fmt!r}; choose official, timm or hf")


def export(ckpt_dir: str | os.PathLike, out: str | os.PathLike, fmt: str,
           hf_naming: str = "legacy", force: bool = False, notes: list[str] | None = None) -> str:
    """Writes a segjax checkpoint as `fmt` (see `to_state_dict`). Returns the path written.

    official: OUT.pth holding {'model': sd} (torch). timm: OUT.safetensors or OUT.pth.
    hf: directory OUT with model.safetensors + config.json (`from_pretrained(OUT)`).
    An `out` without a suffix is a directory for every format. An existing file or a
    non-empty directory is refused unless `force`. `notes`, if given, receives what the
    target format cannot record (see `to_state_dict`).
    """
    import json

    if fmt not in ("official", "timm", "hf"):
        raise ConversionError(f"unknown format {fmt!r}; choose official, timm or hf")
    out = os.fspath(out)
    if fmt == "hf":
        prepare_hf_dir(out, force)
    else:
        out = export_path(out, "model.pth" if fmt == "official" else "model.safetensors", force,
                          (".pth", ".pt", ".bin") if fmt == "official" else (".pth", ".pt", ".bin", ".safetensors"))
    params, meta = load_checkpoint(ckpt_dir, "MAE / ViT", ("mae_vit_", "vit_"))
    sd, extra = to_state_dict(params, meta, fmt, hf_naming)
    if notes is not None:
        notes.extend(extra["notes"])
    if fmt == "hf":
        write_state_dict(sd, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(extra["config"], f, indent=2)
        return out
    return write_state_dict(sd, out, wrap_key="model" if fmt == "official" else None)
