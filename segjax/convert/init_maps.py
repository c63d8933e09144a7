"""Declared mappings for `config.init_from`: a checkpoint of one model family initialises
part of another (MAE encoder -> ViTDet backbone or SAM image encoder, SAM image encoder
-> ViTDet backbone).

Legend: L tokens (1 + G*G with a class token), G / g target / source token grid, D width,
K head dim, P patch size, C input channels.

A mapping is a table, like the converters': `rules` ((source regex, target template),
...) rename every '/'-joined source path the regex fully matches (the first rule that
matches wins; `{src}` / `{dst}` in a rule stand for the mapping's source / target
prefix, `\\1` for a group), and `transforms` ((target regex, name), ...) name the
conversion a renamed leaf goes through on its way:

  pos_embed  absolute position table resized to the target's grid as timm's
             `resample_abs_pos_embed` (bicubic, antialias=True, class token dropped
             when the target has none); source (1, L, D) or (1, g, g, D), target
             either. The interpolation is the config's `init_from.pos_embed`
             (mode, antialias); identity when the grids agree.
  rel_pos    relative position table (2S - 1, K) resized linearly along its first
             axis to the target's length (SAM's `get_rel_pos`); identity when equal.

Leaves with no transform must have the target's shape. The fused qkv kernels need no
transform: MAE's `Attention` and the windowed `RelPosAttention` both split their
(D, 3D) output axis as (3, N, K), torch's `qkv.weight` layout.

What may stay unfilled in the target (new modules, relative position tables from an
MAE) and what may go unused in the source (MAE's decoder, the final norm, the class
token) is declared in the config (`init_from.allow_missing` / `allow_unexpected`, regexes
of target / source paths), as for a plain `checkpoint.merge_params` fine-tune;
anything else fails with the paths named. Before that, the checkpoint's family
(meta['model']) must be one the mapping reads, and its patch size, width and number of
attention heads must be the target's: each mismatch is an error naming both sides. Heads
are read from relative position tables (2S - 1, K) where a side has them (N = D / K), else
from the checkpoint's meta (`models.build(meta['model'], **meta['model_kwargs'])`, MAE's
`num_heads`): a fused qkv kernel has the same shape for every head count.

Config (`config.init_from`):
  path       checkpoint directory (segjax format, e.g. a converted MAE)
  mapping    '' (paths as they are: `checkpoint.merge_params`) or a name in `MAPPINGS`
  rules, transforms   replace the named mapping's tables (optional)
  src_prefix, dst_prefix   replace the named mapping's prefixes (optional)
  pos_embed  (mode, antialias) of the pos_embed transform; timm's ('bicubic', True)
  allow_missing, allow_unexpected   regexes, as for merge_params
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from segjax import checkpoint, models
from segjax.ops import resample

PyTree = Any
TIMM_POS_EMBED = ("bicubic", True)  # timm resample_abs_pos_embed's interpolation, antialias

# source block leaf -> target block leaf (norms, attention, MLP)
_BLOCK = r"blocks_(\d+)/(norm1|norm2|attn/qkv|attn/proj)/(kernel|bias|scale)"


@dataclasses.dataclass(frozen=True)
class InitMap:
    """A declared source -> target parameter mapping (see the module doc).

    Attributes:
      sources: regex that meta['model'] of an accepted checkpoint matches.
      rules: ((source regex, target template), ...), first full match wins.
      transforms: ((target regex, transform name), ...).
      src_prefix, dst_prefix: where the ViT sits in the source / target tree.
    """

    sources: str
    rules: tuple[tuple[str, str], ...]
    transforms: tuple[tuple[str, str], ...] = ((r"pos_embed$", "pos_embed"),
                                               (r"/rel_pos_[hw]$", "rel_pos"))
    src_prefix: str = ""
    dst_prefix: str = ""


def _vit_rules(mlp: tuple[str, str], mlp_src: tuple[str, str] = ("fc1", "fc2"),
               rel_pos: bool = False) -> tuple[tuple[str, str], ...]:
    rules = [
        (r"{src}patch_embed/proj/(kernel|bias)", r"{dst}patch_embed/proj/\1"),
        (r"{src}pos_embed", r"{dst}pos_embed"),
        (r"{src}" + _BLOCK, r"{dst}blocks_\1/\2/\3"),
        (r"{src}blocks_(\d+)/mlp/" + mlp_src[0] + "/(kernel|bias)", r"{dst}blocks_\1/mlp/" + mlp[0] + r"/\2"),
        (r"{src}blocks_(\d+)/mlp/" + mlp_src[1] + "/(kernel|bias)", r"{dst}blocks_\1/mlp/" + mlp[1] + r"/\2"),
    ]
    if rel_pos:
        rules.append((r"{src}blocks_(\d+)/attn/(rel_pos_[hw])", r"{dst}blocks_\1/attn/\2"))
    return tuple(rules)


MAPPINGS: dict[str, InitMap] = {
    # MAE encoder (segjax-trained `mae_vit_*`, or any MAE / timm / HF ViT the MAE
    # converter reads, incl. `vit_*` classifiers) -> ViTDet's plain ViT (the MAE / timm
    # block names; relative position tables stay initialised, zeros as the reference)
    "mae_to_vitdet": InitMap(r"(mae_)?vit_\w+", _vit_rules(("fc1", "fc2")), dst_prefix="backbone/net/"),
    # MAE encoder -> SAM's image encoder (its MLP is lin1 / lin2)
    "mae_to_sam_encoder": InitMap(r"(mae_)?vit_\w+", _vit_rules(("lin1", "lin2")), dst_prefix="image_encoder/"),
    # SAM image encoder (a converted SAM: `sam_vit_*`) -> ViTDet's ViT, same architecture:
    # the relative position tables come along (resized when the grids differ)
    "sam_to_vitdet": InitMap(r"sam_vit_\w+", _vit_rules(("fc1", "fc2"), ("lin1", "lin2"), rel_pos=True),
                             src_prefix="image_encoder/", dst_prefix="backbone/net/"),
}


class InitMapError(checkpoint.CheckpointError, ValueError):
    """A checkpoint that the declared mapping cannot put into the model (a user error:
    train.py reports it in one line)."""


# ----------------------------------------------------------------------------- transforms


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def resample_abs_pos_embed(pos: np.ndarray, target_shape: Sequence[int], mode: str = "bicubic",
                           antialias: bool = True) -> np.ndarray:
    """timm's `resample_abs_pos_embed` (timm/layers/pos_embed.py) on the host, for any
    of the two table layouts.

    Args:
      pos: (1, L, D) tokens with 0 or 1 prefix (class) token rows, L = [1 +] g*g, or a
        grid (1, gh, gw, D).
      target_shape: (1, L', D) (prefix rows kept when the target has them) or
        (1, G, G', D).
      mode, antialias: `F.interpolate`'s; timm: 'bicubic', True.
    Returns:
      float32 array of `target_shape`: the grid resized with
      `resample.interpolate_host` (identity when the grids agree), prefix rows copied.
    Raises:
      InitMapError when a layout cannot be read or the target needs a prefix row the
      source lacks.
    """
    pos = np.asarray(pos, np.float32)
    d = pos.shape[-1]
    if pos.ndim == 4:
        prefix, grid = pos[:, :0].reshape(1, 0, d), pos[0]
    elif pos.ndim == 3 and pos.shape[0] == 1:
        n = pos.shape[1]
        n_prefix = 0 if _square_side(n) else 1
        side = _square_side(n - n_prefix)
        if side is None:
            raise InitMapError(f"position table {pos.shape}: {n} rows are neither a square grid nor 1 + a square")
        prefix, grid = pos[:, :n_prefix], pos[0, n_prefix:].reshape(side, side, d)
    else:
        raise InitMapError(f"position table of shape {pos.shape}: expected (1, L, D) or (1, H, W, D)")
    target_shape = tuple(int(s) for s in target_shape)
    if target_shape[-1] != d:
        raise InitMapError(f"position table width {d} vs the target's {target_shape[-1]}")
    if len(target_shape) == 4:
        out_hw, t_prefix = target_shape[1:3], 0
    else:
        t_prefix = 0 if _square_side(target_shape[1]) else 1
        side = _square_side(target_shape[1] - t_prefix)
        if side is None:
            raise InitMapError(f"target position table {target_shape} is not [1 +] a square grid")
        out_hw = (side, side)
    if t_prefix > prefix.shape[1]:
        raise InitMapError(f"the target position table {target_shape} has a class-token row, "
                           f"the source {pos.shape} has none")
    if tuple(out_hw) != grid.shape[:2]:
        grid = resample.interpolate_host(grid, tuple(out_hw), axes=(0, 1), mode=mode, antialias=antialias)
    if len(target_shape) == 4:
        return grid[None]
    return np.concatenate([prefix[:, :t_prefix], grid.reshape(1, -1, d)], axis=1)


def resize_rel_pos(table: np.ndarray, length: int) -> np.ndarray:
    """(2S - 1, K) -> (length, K): `F.interpolate(mode="linear")` along the first axis,
    as SAM's `get_rel_pos` resizes a table at run time (float32 taps to the bit)."""
    table = np.asarray(table, np.float32)
    if table.shape[0] == length:
        return table
    m = resample.linear_matrix(table.shape[0], length, dtype=np.float64)
    return (m @ table.astype(np.float64)).astype(np.float32)


def _transform(name: str, value: np.ndarray, target_shape: tuple[int, ...], pos_embed) -> np.ndarray:
    if name == "pos_embed":
        return resample_abs_pos_embed(value, target_shape, *pos_embed)
    if name == "rel_pos":
        if value.ndim != 2 or len(target_shape) != 2 or value.shape[1] != target_shape[1]:
            raise InitMapError(f"relative position table {value.shape} cannot become {target_shape}")
        return resize_rel_pos(value, target_shape[0])
    raise InitMapError(f"unknown transform {name!r}; use 'pos_embed' or 'rel_pos'")


TRANSFORMS = ("pos_embed", "rel_pos")


# ----------------------------------------------------------------------------- applying


def resolve(mapping: str | InitMap, rules=None, transforms=None, src_prefix=None, dst_prefix=None) -> InitMap:
    """A mapping by name (or as given), with the config's replacements applied."""
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            if not mapping and rules:
                mapping = InitMap(r".*", ())
            else:
                raise InitMapError(f"unknown init_from.mapping {mapping!r}; use one of {sorted(MAPPINGS)}")
        else:
            mapping = MAPPINGS[mapping]
    changes = {k: v for k, v in dict(rules=rules, transforms=transforms, src_prefix=src_prefix,
                                     dst_prefix=dst_prefix).items() if v not in (None, "", ())}
    for k in ("rules", "transforms"):
        if k in changes:
            changes[k] = tuple(tuple(r) for r in changes[k])
    return dataclasses.replace(mapping, **changes)


def _patch_and_width(flat: dict[str, Any], prefix: str) -> tuple[int, int, int] | None:
    k = flat.get(f"{prefix}patch_embed/proj/kernel")
    return None if k is None else tuple(int(s) for s in np.shape(k)[1:])  # (P, C, D) of (P, P, C, D)


def _depth(flat: dict[str, Any], prefix: str) -> int:
    ids = {int(m.group(1)) for p in flat if (m := re.match(re.escape(prefix) + r"blocks_(\d+)/", p))}
    return max(ids) + 1 if ids else 0


def _check_architecture(m: InitMap, meta: dict, src: dict, dst: dict) -> None:
    model = meta.get("model")
    if not isinstance(model, str) or not re.fullmatch(m.sources, model):
        raise InitMapError(f"init_from checkpoint is a {model!r} model; this mapping reads "
                           f"{m.sources!r} checkpoints (a different model family)")
    s, t = _patch_and_width(src, m.src_prefix), _patch_and_width(dst, m.dst_prefix)
    if s is None:
        raise InitMapError(f"init_from checkpoint ({model}) has no {m.src_prefix}patch_embed/proj/kernel")
    if t is None:
        raise InitMapError(f"the model has no {m.dst_prefix}patch_embed/proj/kernel (dst_prefix?)")
    what = [f"patch size {s[0]} vs {t[0]}" if s[0] != t[0] else "",
            f"input channels {s[1]} vs {t[1]}" if s[1] != t[1] else "",
            f"width {s[2]} vs {t[2]}" if s[2] != t[2] else ""]
    what = [w for w in what if w]
    if what:
        raise InitMapError(f"init_from checkpoint ({model}, patch {s[0]}, width {s[2]}) does not fit the "
                           f"config's model (patch {t[0]}, width {t[2]}): {', '.join(what)} (checkpoint vs model)")
    _check_heads(m, meta, src, dst, s[2])


_HEADS_FIELDS = ("num_heads", "encoder_num_heads", "vit_num_heads")  # MAE / ViT, SAM, ViTDet


def _table_heads(flat: dict[str, Any], prefix: str, width: int) -> int | None:
    """Heads of a ViT with relative position tables (2S - 1, K): width / K."""
    k = flat.get(f"{prefix}blocks_0/attn/rel_pos_h")
    return None if k is None else width // int(np.shape(k)[-1])


def _meta_heads(meta: dict, width: int) -> int | None:
    """Heads of the model meta describes (`models.build(meta['model'], **model_kwargs)`),
    when that model has the checkpoint's width (else the meta does not describe it)."""
    try:
        built = models.build(meta["model"], **meta.get("model_kwargs", {}))
    except (KeyError, TypeError, ValueError):
        return None
    for field in _HEADS_FIELDS:
        width_field = field.replace("num_heads", "embed_dim")
        if hasattr(built, field) and getattr(built, width_field, None) == width:
            return int(getattr(built, field))
    return None


def _check_heads(m: InitMap, meta: dict, src: dict, dst: dict, width: int) -> None:
    """The fused qkv kernels (D, 3D) have one shape for every head count but split into
    (3, N, K) differently: a checkpoint of another N would load silently and compute
    another attention. Heads come from relative position tables where a side has them
    (SAM, ViTDet), else from the checkpoint's meta (MAE / ViT: not in the tensors)."""
    target = _table_heads(dst, m.dst_prefix, width)
    if target is None:  # a target without rel-pos tables: nothing reveals its heads here
        return
    source = _table_heads(src, m.src_prefix, width)
    if source is None:
        source = _meta_heads(meta, width)
    if source is None:
        raise InitMapError(
            f"init_from checkpoint ({meta.get('model')}): its number of attention heads is not in its tensors "
            f"and its meta does not give it (meta['model'] with meta['model_kwargs'] must build a model of "
            f"width {width}; record e.g. model_kwargs num_heads); the model has {target} heads")
    if source != target:
        raise InitMapError(f"init_from checkpoint ({meta.get('model')}) has {source} attention heads, the "
                           f"config's model {target} (same width {width}: the qkv kernels fit but split "
                           f"into heads differently)")


def _rename(m: InitMap, path: str) -> str | None:
    for pattern, template in m.rules:
        pattern = pattern.replace("{src}", re.escape(m.src_prefix)).replace("{dst}", m.dst_prefix)
        match = re.fullmatch(pattern, path)
        if match:
            return match.expand(template.replace("{dst}", m.dst_prefix).replace("{src}", m.src_prefix))
    return None


def apply_mapping(init: PyTree, loaded: PyTree, meta: dict, mapping: str | InitMap,
                  allow_missing: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
                  pos_embed: tuple[str, bool] = TIMM_POS_EMBED) -> tuple[PyTree, dict[str, Any]]:
    """Fills `init` (fresh params, unboxed) from `loaded` through `mapping`.

    Args:
      init: the model's freshly initialised params.
      loaded: the checkpoint's params; meta: its meta (meta['model'] names its family).
      mapping: a name in `MAPPINGS` or an `InitMap`.
      allow_missing: regexes of target paths that may stay as initialised.
      allow_unexpected: regexes of source paths that may go unused.
      pos_embed: (mode, antialias) of the 'pos_embed' transform.
    Returns:
      (params like `init`, report) with report {'loaded': target paths filled,
      'missing': target paths kept from init, 'unexpected': source paths unused,
      'renamed': {source: target}, 'transformed': {target: transform}}.
    Raises:
      InitMapError naming the family, patch size / width, unmapped or unfilled paths and
      shape mismatches.
    """
    m = resolve(mapping)
    dst = checkpoint.flatten_paths(init)
    src = checkpoint.flatten_paths(loaded)
    _check_architecture(m, meta, src, dst)
    filled: dict[str, Any] = {}
    renamed, transformed, unused, errors = {}, {}, [], []
    for path, value in src.items():
        target = _rename(m, path)
        if target is None:
            unused.append(path)
            continue
        if target not in dst:
            errors.append(f"{path} -> {target}: no such parameter in the model")
            continue
        if target in filled:
            errors.append(f"{path} -> {target}: filled twice")
            continue
        shape = tuple(np.shape(dst[target]))
        value = np.asarray(value)
        name = next((t for r, t in m.transforms if re.search(r, target)), None)
        try:
            if name is not None:
                value = _transform(name, value, shape, tuple(pos_embed))
                transformed[target] = name
        except InitMapError as e:
            errors.append(f"{path} -> {target}: {e}")
            continue
        if value.shape != shape:
            errors.append(f"{path} -> {target}: checkpoint {value.shape} vs model {shape}")
            continue
        filled[target] = value.astype(np.asarray(dst[target]).dtype, copy=False)
        renamed[path] = target
    missing = sorted(set(dst) - set(filled))
    bad_missing = [p for p in missing if not any(re.search(r, p) for r in allow_missing)]
    bad_unused = sorted(p for p in unused if not any(re.search(r, p) for r in allow_unexpected))
    if errors or bad_missing or bad_unused:
        depth = f" (checkpoint depth {_depth(src, m.src_prefix)}, model depth {_depth(dst, m.dst_prefix)})"
        raise InitMapError(
            f"init_from checkpoint ({meta.get('model')}) does not fit the model through the mapping{depth}:\n"
            f"  model parameters not filled (not declared in allow_missing): {_short(bad_missing)}\n"
            f"  checkpoint parameters not used (not declared in allow_unexpected): {_short(bad_unused)}\n"
            f"  errors: {_short(sorted(errors))}")
    out = {p: filled.get(p, v) for p, v in dst.items()}
    report = {"loaded": sorted(filled), "missing": missing, "unexpected": sorted(unused),
              "renamed": renamed, "transformed": transformed}
    leaves = [out[p] for p in dst]  # flatten_paths keeps the tree's leaf order
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(init), leaves), report


def _short(paths: list[str], limit: int = 12) -> str:
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return str(paths[:limit]) + more


def declared(init_from) -> bool:
    """Whether a config's `init_from` asks for a mapping (else paths load as they are)."""
    return bool(init_from.get("mapping") or init_from.get("rules"))


def init_params(init: PyTree, loaded: PyTree, meta: dict, init_from) -> tuple[PyTree, dict[str, Any]]:
    """`config.init_from` applied: through its mapping when one is declared, else
    `checkpoint.merge_params` (paths as they are)."""
    allow_missing = tuple(init_from.get("allow_missing", ()))
    allow_unexpected = tuple(init_from.get("allow_unexpected", ()))
    if not declared(init_from):
        return checkpoint.merge_params(init, loaded, allow_missing, allow_unexpected)
    m = resolve(init_from.get("mapping", ""), init_from.get("rules"), init_from.get("transforms"),
                init_from.get("src_prefix"), init_from.get("dst_prefix"))
    return apply_mapping(init, loaded, meta, m, allow_missing, allow_unexpected,
                         tuple(init_from.get("pos_embed", TIMM_POS_EMBED)))
