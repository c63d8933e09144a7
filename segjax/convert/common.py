"""Table-driven state-dict conversion: rename rules, layout transforms, readers and writers.

A converter is a table of `Rule`s. Each rule names a source key template (with `{i}`
fields for layer indices; several spellings of the same key may be listed, the first
being the one written back), the segjax parameter path it fills ('/'-joined, as
`segjax.checkpoint.flatten_paths`), and a named layout transform. Rules with a `part`
fill one slice of a fused target leaf (HF's separate q/k/v -> one `qkv` kernel whose
output axis is (3, N, K)). The same table runs both ways: `rename` (torch -> segjax)
and `unrename` (segjax -> torch).

Everything here is numpy; torch is imported only inside the `.pth` reader/writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
    """A state dict that the converter cannot map completely onto the target."""


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """A named layout transform: `forward` torch -> segjax, `inverse` back."""

    ndim: int | None
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


LAYOUTS: dict[str, Layout] = {
    # tokens, position tables, LayerNorm weight/bias, biases: untouched
    "copy": Layout(None, lambda x: x, lambda x: x),
    # nn.Linear weight [out, in] -> Dense kernel [in, out]
    "linear": Layout(2, lambda x: x.T, lambda x: x.T),
    # nn.Conv2d weight OIHW -> Conv kernel HWIO
    "conv": Layout(4, lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),
}


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """One source key (in any of its spellings) -> one segjax path.

    src: source key templates, e.g. ("blocks.{i}.attn.qkv.weight",); `{name}` fields
      match decimal indices. `unrename(..., naming=k)` writes `src[min(k, len(src)-1)]`.
    dst: segjax path template, e.g. "blocks_{i}/attn/qkv/kernel".
    layout: a key of `LAYOUTS`.
    part: (index, count): this key is slice `index` of `count` equal slices of the
      target's last axis (after the layout transform).
    """

    src: tuple[str, ...]
    dst: str
    layout: str = "copy"
    part: tuple[int, int] | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {sorted(LAYOUTS)}")


def _template_regex(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


@dataclasses.dataclass
class Report:
    """What a conversion used, dropped and could not match. `ok` when nothing is wrong."""

    used: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    unmapped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_errors: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmapped or self.missing or self.unexpected or self.shape_errors)

    def summary(self) -> str:
        lines = [f"used {len(self.used)} source tensors"]
        for name in ("ignored", "unmapped", "missing", "unexpected", "shape_errors", "notes"):
            items = getattr(self, name)
            if items:
                lines.append(f"{name} ({len(items)}):")
                lines.extend(f"  {x}" for x in items)
        return "\n".join(lines)

    def raise_if_bad(self, what: str = "conversion") -> None:
        if not self.ok:
            hints = []
            if self.unmapped:
                hints.append("unmapped source keys have no rule: a different model family or "
                             "an unsupported variant (pass ignore= regexes to drop known extras)")
            if self.missing:
                hints.append("missing target leaves: the source lacks tensors the model needs")
            raise ConversionError(f"{what} failed:\n{self.summary()}\n" + "\n".join(hints))


def rename(sd: StateDict, rules: Sequence[Rule], ignore: Iterable[str] = (),
           report: Report | None = None) -> tuple[StateDict, Report]:
    """Source state dict -> flat segjax params {'a/b/kernel': array} by `rules`.

    Keys matching no rule are ignored if they match an `ignore` regex, else reported
    as unmapped. Fused targets must receive all their parts.
    """
    report = report or Report()
    ignore = [re.compile(p) for p in ignore]
    compiled = [(_template_regex(s), rule) for rule in rules for s in dict.fromkeys(rule.src)]
    out: StateDict = {}
    parts: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    counts: dict[str, int] = {}
    for key, value in sd.items():
        for rx, rule in compiled:
            m = rx.fullmatch(key)
            if m is None:
                continue
            dst = rule.dst.format(**m.groupdict())
            layout = LAYOUTS[rule.layout]
            value = np.asarray(value)
            if layout.ndim is not None and value.ndim != layout.ndim:
                report.shape_errors.append(
                    f"{key}: {rule.layout} layout needs a {layout.ndim}-d tensor, got {value.shape}")
                break
            arr = layout.forward(value)
            if rule.part is None:
                if dst in out:
                    raise ConversionError(f"two source keys map to {dst} (second: {key})")
                out[dst] = arr
            else:
                if rule.part[0] in parts[dst]:
                    raise ConversionError(f"two source keys map to part {rule.part[0]} of {dst} "
                                          f"(second: {key}); mixed spellings of one tensor?")
                parts[dst][rule.part[0]] = arr
                counts[dst] = rule.part[1]
            report.used.append(key)
            break
        else:
            (report.ignored if any(p.search(key) for p in ignore) else report.unmapped).append(key)
    for dst, got in parts.items():
        if sorted(got) != list(range(counts[dst])):
            report.missing.append(f"{dst} (fused from {counts[dst]} parts, got parts {sorted(got)})")
            continue
        out[dst] = np.concatenate([got[i] for i in range(counts[dst])], axis=-1)
    return out, report


def unrename(flat: StateDict, rules: Sequence[Rule], naming: int = 0) -> StateDict:
    """Flat segjax params -> source state dict; the inverse of `rename`.

    Every leaf must be covered by a rule (raises `ConversionError` otherwise).
    """
    groups: dict[str, list[Rule]] = defaultdict(list)
    for rule in rules:
        groups[rule.dst].append(rule)
    compiled = [(_template_regex(dst), rs) for dst, rs in groups.items()]
    sd: StateDict = {}
    unmatched = []
    for path, value in flat.items():
        for rx, rs in compiled:
            m = rx.fullmatch(path)
            if m is None:
                continue
            fields = m.groupdict()
            value = np.asarray(value)
            if rs[0].part is None:
                rule = rs[0]
                slices = [(rule, value)]
            else:
                count = rs[0].part[1]
                chunks = np.split(value, count, axis=-1)
                slices = [(rule, chunks[rule.part[0]]) for rule in rs]
            for rule, arr in slices:
                key = rule.src[min(naming, len(rule.src) - 1)].format(**fields)
                sd[key] = np.ascontiguousarray(LAYOUTS[rule.layout].inverse(arr))
            break
        else:
            unmatched.append(path)
    if unmatched:
        raise ConversionError(f"no rule writes these segjax params: {unmatched}")
    return sd


def check_leaves(flat: StateDict, expected: dict[str, tuple[int, ...]], report: Report,
                 allow_missing: Iterable[str] = ()) -> Report:
    """Compares converted leaves with the model's `eval_shape` leaves (path -> shape)."""
    allow = [re.compile(p) for p in allow_missing]
    for path in sorted(set(expected) - set(flat)):
        if not any(p.search(path) for p in allow):
            report.missing.append(path)
    report.unexpected.extend(sorted(set(flat) - set(expected)))
    for path in sorted(set(flat) & set(expected)):
        if tuple(flat[path].shape) != tuple(expected[path]):
            report.shape_errors.append(
                f"{path}: converted {tuple(flat[path].shape)} vs model {tuple(expected[path])}")
    return report


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------- reading

_WRAPPERS = ("model", "state_dict", "model_state_dict", "module")


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def read_pth(path: str) -> tuple[StateDict, dict]:
    """A torch pickle (`{'model': sd}` or a bare state dict) -> numpy state dict.

    Loaded with `weights_only=True`: no code from the file runs.
    """
    import argparse
    import pickle

    import torch

    try:
        # MAE's training checkpoints also pickle their argparse.Namespace ('args'):
        # a plain attribute bag, allowed explicitly; nothing else outside tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(f"{path}: refusing to unpickle non-tensor objects with "
                              f"weights_only=True ({e}); re-save the state dict alone") from e
    info: dict[str, Any] = {"container": None}
    if isinstance(obj, dict):
        for k in _WRAPPERS:
            if k in obj and isinstance(obj[k], dict):
                info["container"] = k
                info["other_top_level_keys"] = sorted(str(x) for x in obj if x != k)
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    sd = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        sd[k] = _to_numpy(v)
    return sd, info


def read_safetensors(path: str) -> StateDict:
    from safetensors.numpy import load_file

    return dict(load_file(path))


def read_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict]:
    """Reads `.pth/.pt/.bin` (torch), `.safetensors`, or a Hugging Face model directory.

    Returns (state dict of numpy arrays, info) where info has 'path', 'file_format',
    'container' (the wrapper key of a `.pth`, e.g. 'model'), and 'config' (the parsed
    `config.json` beside the weights, if any).
    """
    path = os.fspath(path)
    info: dict[str, Any] = {"path": os.path.abspath(path), "config": None}
    config_dir = os.path.dirname(path)
    if os.path.isdir(path):
        config_dir = path
        candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"]
        found = [c for c in candidates if os.path.exists(os.path.join(path, c))]
        if not found:
            raise ConversionError(f"{path} is a directory without any of {candidates}")
        path = os.path.join(path, found[0])
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(read_state_dict(os.path.join(os.path.dirname(path), shard))[0])
        info["file_format"] = "sharded:" + ("safetensors" if ".safetensors" in path else "pth")
        info["shards"] = shards
    elif path.endswith(".safetensors"):
        sd = read_safetensors(path)
        info["file_format"] = "safetensors"
    elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        sd, extra = read_pth(path)
        info.update(extra)
        info["file_format"] = "pth"
    else:
        raise ConversionError(f"{path}: unknown weight file type (expected .pth/.pt/.bin/"
                              ".safetensors or a model directory)")
    cfg_path = os.path.join(config_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            info["config"] = json.load(f)
    return sd, info


# ----------------------------------------------------------------------------- writing


def write_state_dict(sd: StateDict, path: str | os.PathLike, wrap_key: str | None = None) -> str:
    """Writes `.safetensors` (numpy, no torch; metadata format=pt as transformers
    expects) or `.pth/.pt/.bin` (torch, optionally wrapped as `{wrap_key: sd}`)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        if wrap_key is not None:
            raise ValueError("safetensors files hold a flat state dict; cannot wrap it")
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path,
                  metadata={"format": "pt"})
    elif path.endswith((".pth", ".pt", ".bin")):
        import torch

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        torch.save({wrap_key: tensors} if wrap_key else tensors, path)
    else:
        raise ValueError(f"{path}: write .safetensors or .pth/.pt/.bin")
    return path
