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

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from segjax.checkpoint import one_line

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
    """A state dict that the converter cannot map completely onto the target, or a
    source / output path it cannot use (the CLI prints it and exits with status 2)."""


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
            raise ConversionError("\n".join([f"{what} failed:", self.summary(), *hints]))


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
        if "weights only load failed" in str(e).lower():
            raise ConversionError(f"{path}: refusing to unpickle non-tensor objects with weights_only=True "
                                  f"({one_line(e, 200)}); re-save the state dict alone") from e
        raise ConversionError(f"{path}: not a readable torch file, truncated or corrupt ({one_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - torch reports a damaged file in many ways
        raise ConversionError(f"{path}: not a readable torch file, truncated or corrupt ({one_line(e)})") from e
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

    try:
        return dict(load_file(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, or a dtype numpy lacks
        raise ConversionError(f"{path}: not a readable safetensors file, truncated or corrupt "
                              f"({one_line(e)})") from e


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable {what} ({one_line(e)})") from e


def read_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict]:
    """Reads `.pth/.pt/.bin` (torch), `.safetensors`, or a Hugging Face model directory.

    Returns (state dict of numpy arrays, info) where info has 'path', 'file_format',
    'container' (the wrapper key of a `.pth`, e.g. 'model'), and 'config' (the parsed
    `config.json` beside the weights, if any).
    """
    path = os.fspath(path)
    info: dict[str, Any] = {"path": os.path.abspath(path), "config": None}
    config_dir = os.path.dirname(path)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file or directory")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ConversionError(f"{path}: empty file (0 bytes)")
    if os.path.isdir(path):
        config_dir = path
        candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json"]
        found = [c for c in candidates if os.path.exists(os.path.join(path, c))]
        if not found:
            raise ConversionError(f"{path} is a directory without any of {candidates}")
        path = os.path.join(path, found[0])
    if path.endswith(".index.json"):
        index = _read_json(path, "shard index")
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ConversionError(f"{path}: shard index without a 'weight_map' object")
        shards = sorted(set(index["weight_map"].values()))
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
        info["config"] = _read_json(cfg_path, "config.json")
        if not isinstance(info["config"], dict):
            raise ConversionError(f"{cfg_path}: config.json is not a JSON object")
    return sd, info


# ----------------------------------------------------------------------------- writing


def write_state_dict(sd: StateDict, path: str | os.PathLike, wrap_key: str | None = None) -> str:
    """Writes `.safetensors` (numpy, no torch; metadata format=pt as transformers
    expects) or `.pth/.pt/.bin` (torch, optionally wrapped as `{wrap_key: sd}`)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        if wrap_key is not None:
            raise ConversionError(f"{path}: safetensors files hold a flat state dict; cannot wrap it "
                                  f"as {{{wrap_key!r}: sd}} (write a .pth)")
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path,
                  metadata={"format": "pt"})
    elif path.endswith((".pth", ".pt", ".bin")):
        import torch

        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        torch.save({wrap_key: tensors} if wrap_key else tensors, path)
    else:
        raise ConversionError(f"{path}: unknown weight file type; write .safetensors or .pth/.pt/.bin")
    return path


# ----------------------------------------------------------------------------- outputs
# A converter never replaces something it did not write unless asked (`force`), and a
# converted checkpoint is written where `segjax.checkpoint.load_params` looks, with no
# other step beside it, so loaders return the converted params and nothing older.

# Orbax step directories of a segjax checkpoint root: "0", "1000", unfinished
# "12.orbax-checkpoint-tmp-...", and steps moved aside by the training loop ("12.corrupt").
_STEP_DIR = re.compile(r"^\d+(\..+)?$")


@contextlib.contextmanager
def _quiet_checkpoint_logs():
    """Silences Orbax's read-only notices and `load_params`'s per-step warnings (absl /
    segjax.checkpoint loggers) while a converter reads a checkpoint: a failure is
    reported once, by the ConversionError raised."""
    loggers = [logging.getLogger(n) for n in ("absl", "segjax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def checkpoint_kind(path: str | os.PathLike) -> str | None:
    """'workdir' (a training workdir: holds `checkpoints/`), 'checkpoint' (a checkpoint
    root: holds step directories), or None."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if any(_STEP_DIR.match(e) and os.path.isdir(os.path.join(path, e)) for e in os.listdir(path)):
        return "checkpoint"
    return None


def check_output_dir(out: str | os.PathLike, force: bool = False) -> None:
    """Refuses an output directory that is a file, or is not empty (without `force`)."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out}: exists and is not a directory (a segjax checkpoint is a directory)")
    if os.path.isdir(out) and os.listdir(out) and not force:
        kind = checkpoint_kind(out)
        what = {"workdir": "is a training workdir", "checkpoint": "already holds a segjax checkpoint"}.get(
            kind, "is not empty")
        raise ConversionError(f"{out}: {what}; refusing to write a converted checkpoint there "
                              "(pass --force to replace its checkpoint, or choose a new directory)")


def _remove_tree(path: str, patience_s: float = 5.0) -> None:
    """rmtree that outlasts writer threads of a failed Orbax save still creating files."""
    import time

    deadline = time.monotonic() + patience_s
    while os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def write_checkpoint(out: str | os.PathLike, params: Any, meta: dict, force: bool = False) -> str:
    """Writes a converted params-only checkpoint to `out` (see `check_output_dir`).

    The checkpoint is written and read back in a scratch directory first; only then,
    with `force`, are the steps that `load_params(out)` would read (those of a checkpoint
    root, or of a workdir's `checkpoints/`) deleted and the new step moved in, so a
    failed write leaves the old checkpoint as it was. Nothing else in `out` is touched.
    A training workdir is locked meanwhile (`segjax.runtime.WorkdirLock`): one that a
    running training holds is refused. Returns the directory written.
    """
    import tempfile

    from segjax.checkpoint import load_meta, resolve_dir, save_params
    from segjax.runtime import WorkdirError, WorkdirLock

    out = os.fspath(out)
    check_output_dir(out, force)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{out}: the checkpoint meta is not JSON ({one_line(e)})") from e
    target = resolve_dir(out)
    try:
        os.makedirs(target, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".segjax-convert-", dir=target)
    except OSError as e:
        raise ConversionError(f"{out}: cannot create the output directory ({one_line(e)})") from e
    try:
        try:
            save_params(scratch, params, meta)
            with _quiet_checkpoint_logs():
                load_meta(scratch)
        except Exception as e:  # noqa: BLE001 - Orbax reports a failed write in many ways
            raise ConversionError(f"{out}: writing the checkpoint failed ({one_line(e)})") from e
        lock = WorkdirLock(out) if checkpoint_kind(out) == "workdir" else None
        try:
            if lock is not None:
                lock.acquire()
        except WorkdirError as e:
            raise ConversionError(f"{out}: {one_line(e, 400).split(': ', 1)[-1]}") from e
        try:
            for entry in sorted(os.listdir(target)):
                full = os.path.join(target, entry)
                if _STEP_DIR.match(entry) and os.path.isdir(full):
                    shutil.rmtree(full)
            for entry in os.listdir(scratch):
                os.replace(os.path.join(scratch, entry), os.path.join(target, entry))
        finally:
            if lock is not None:
                lock.release()
    finally:
        _remove_tree(scratch)
    with _quiet_checkpoint_logs():
        written = load_meta(out)
    if written.get("step") != 0 or written.get("model") != meta.get("model"):
        raise ConversionError(f"{out}: loaders read step {written.get('step')} "
                              f"({written.get('model')!r}), not the converted checkpoint")
    return target


def check_output_file(path: str | os.PathLike, force: bool = False) -> None:
    """Refuses to overwrite an existing file (without `force`) or a directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConversionError(f"{path}: is a directory; give a file name (e.g. {os.path.join(path, 'model.pth')})")
    if os.path.exists(path) and not force:
        raise ConversionError(f"{path}: already exists (pass --force to overwrite it)")


# Weight files `from_pretrained` and `read_state_dict` look for in a model directory.
_HF_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def prepare_hf_dir(out: str | os.PathLike, force: bool = False) -> str:
    """A Hugging Face model directory to write: new or empty, or (with `force`) emptied
    of weight files and config.json, so that no stale shard or index outranks the new
    `model.safetensors`. Returns the directory."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out}: exists and is not a directory (Hugging Face models are directories)")
    if os.path.isdir(out) and os.listdir(out):
        if not force:
            raise ConversionError(f"{out}: directory is not empty (pass --force to replace its weights "
                                  "and config.json, or choose a new directory)")
        for entry in os.listdir(out):
            if (_HF_WEIGHTS.match(entry) or entry == "config.json") and os.path.isfile(os.path.join(out, entry)):
                os.remove(os.path.join(out, entry))
    os.makedirs(out, exist_ok=True)
    return out


def export_path(out: str | os.PathLike, default_name: str, force: bool = False,
                suffixes: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")) -> str:
    """The file a reverse converter writes: `out`, or `out/default_name` for a
    suffix-less `out` (a directory, which must be new or empty without `force`)."""
    out = os.fspath(out)
    suffix = os.path.splitext(out)[1]
    if suffix and suffix not in suffixes:
        raise ConversionError(f"{out}: unknown weight file type {suffix!r}; write one of {', '.join(suffixes)}")
    if not os.path.splitext(out)[1]:
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConversionError(f"{out}: exists and is not a directory")
        if os.path.isdir(out) and os.listdir(out) and not force:
            raise ConversionError(f"{out}: directory is not empty (pass --force to write "
                                  f"{default_name} into it, or choose a new path)")
        out = os.path.join(out, default_name)
    check_output_file(out, force)
    return out


def load_checkpoint(ckpt_dir: str | os.PathLike, family: str, prefixes: tuple[str, ...]) -> tuple[Any, dict]:
    """`load_params` for a reverse converter: a missing, unreadable or other-family
    checkpoint is a `ConversionError` naming the path."""
    from segjax.checkpoint import CheckpointError, load_params

    path = os.fspath(ckpt_dir)
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such checkpoint directory")
    try:
        with _quiet_checkpoint_logs():
            params, meta = load_params(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable segjax checkpoint ({one_line(e)})") from e
    model = str(meta.get("model", ""))
    if not model.startswith(prefixes):
        raise ConversionError(f"{path}: holds model {model!r}, not a {family} checkpoint "
                              f"(expected {' / '.join(p + '*' for p in prefixes)})")
    return params, meta
