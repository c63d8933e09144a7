"""Converter CLI reliability: unusable sources and outputs, for every family and --reverse.

Each failure is one line on stderr, `error: PATH: cause`, exit status 2, no traceback,
and nothing written. A non-empty output is refused unless --force; with --force the old
checkpoint is replaced completely (loaders return the converted step), and nothing that
is not a checkpoint step is deleted. Sources are random segjax models exported with the
reverse converters, so the tests need no reference library beyond torch for `.pth`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from segjax.testing import importorskip

importorskip("torch")

from segjax.checkpoint import flatten_paths, load_params, save_params
from segjax.convert import common
from segjax.convert import mae as mae_conv
from segjax.convert import maskrcnn as maskrcnn_conv
from segjax.convert import sam as sam_conv
from segjax.convert.__main__ import main as cli
from segjax.runtime import WorkdirLock

FAMILIES = ("mae", "sam", "maskrcnn")
MODEL = {"mae": "mae_vit_tiny", "sam": "sam_vit_tiny", "maskrcnn": "mask_rcnn_tiny"}


def _random_params(name: str) -> dict:
    if name.startswith("mae_"):
        shapes = mae_conv._abstract_leaves(name, {}, 32, 3)
    elif name.startswith("sam_"):
        shapes = sam_conv._abstract_leaves(name, {})
    else:
        shapes = maskrcnn_conv._abstract_leaves(name, {})
    rng = np.random.default_rng(0)
    flat = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    for k in flat:
        if k.endswith("/var"):  # BatchNorm variances must be positive
            flat[k] = np.abs(flat[k]) + 1.0
    return common.unflatten(flat)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (segjax checkpoint, torch-format source that converts back to it)."""
    d = tmp_path_factory.mktemp("sources")
    out = {}
    for fam in FAMILIES:
        ckpt = d / f"{fam}_ckpt"
        save_params(ckpt, _random_params(MODEL[fam]), {"model": MODEL[fam], "model_kwargs": {},
                                                      "params": "mae" if fam == "mae" else fam})
        if fam == "mae":  # a Hugging Face directory: safetensors + config.json (heads, eps)
            src = mae_conv.export(ckpt, d / "mae_hf", "hf")
        elif fam == "sam":
            src = sam_conv.export(ckpt, d / "sam.pth")
        else:
            src = maskrcnn_conv.export(ckpt, d / "maskrcnn.pth")
        out[fam] = (ckpt, src)
    return out


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _weights_file(src) -> str:
    return os.path.join(src, "model.safetensors") if os.path.isdir(src) else str(src)


# ----------------------------------------------------------------------------- unusable sources


def _bad_source(case: str, tmp_path, real: str) -> tuple[str, str]:
    """(path, words of the expected cause) for a broken source of the kind `case`."""
    data = open(real, "rb").read()
    if case == "missing_file":
        return str(tmp_path / "nope.pth"), "no such file or directory"
    if case == "missing_dir":
        return str(tmp_path / "no_such_dir"), "no such file or directory"
    if case == "empty_pth":
        (tmp_path / "empty.pth").write_bytes(b"")
        return str(tmp_path / "empty.pth"), "empty file"
    if case == "truncated_pth":
        import torch

        torch.save({"w": torch.zeros(4096)}, tmp_path / "full.pth")
        full = (tmp_path / "full.pth").read_bytes()
        (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
        return str(tmp_path / "cut.pth"), "truncated or corrupt"
    if case == "truncated_legacy_pth":
        import torch

        torch.save({"w": torch.zeros(4096)}, tmp_path / "full.pth", _use_new_zipfile_serialization=False)
        full = (tmp_path / "full.pth").read_bytes()
        (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
        return str(tmp_path / "cut.pth"), "truncated or corrupt"
    if case == "garbage_pth":
        (tmp_path / "junk.pth").write_bytes(b"this is not a torch file at all")
        return str(tmp_path / "junk.pth"), "truncated or corrupt"
    if case == "truncated_safetensors":
        if not real.endswith(".safetensors"):
            from safetensors.numpy import save_file

            save_file({"w": np.zeros(4096, np.float32)}, str(tmp_path / "full.safetensors"))
            data = (tmp_path / "full.safetensors").read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
        return str(tmp_path / "cut.safetensors"), "not a readable safetensors file"
    if case == "garbage_safetensors":
        (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
        return str(tmp_path / "junk.safetensors"), "not a readable safetensors file"
    if case == "dir_without_weights":
        (tmp_path / "emptydir").mkdir()
        return str(tmp_path / "emptydir"), "is a directory without any of"
    if case == "bad_config_json":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "model.safetensors").write_bytes(
            data if real.endswith(".safetensors") else _any_safetensors(tmp_path))
        (tmp_path / "hf" / "config.json").write_text("{ not json")
        return str(tmp_path / "hf"), "unreadable config.json"
    if case == "unknown_suffix":
        (tmp_path / "weights.npz").write_bytes(b"PK")
        return str(tmp_path / "weights.npz"), "unknown weight file type"
    raise AssertionError(case)


def _any_safetensors(tmp_path) -> bytes:
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(4, np.float32)}, str(tmp_path / "tiny.safetensors"))
    return (tmp_path / "tiny.safetensors").read_bytes()


SOURCE_CASES = ("missing_file", "missing_dir", "empty_pth", "truncated_pth", "truncated_legacy_pth",
                "garbage_pth", "truncated_safetensors", "garbage_safetensors", "dir_without_weights",
                "bad_config_json", "unknown_suffix")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", SOURCE_CASES)
def test_unusable_source_is_one_line_exit_2(sources, tmp_path, capsys, family, case):
    path, cause = _bad_source(case, tmp_path, _weights_file(sources[family][1]))
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli([family, path, str(out)]) == 2
    one_error_line(capsys, path if case != "bad_config_json" else os.path.join(path, "config.json"), cause)
    assert not out.exists()


def test_cli_subprocess_exit_status_and_no_traceback(tmp_path):
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    proc = subprocess.run([sys.executable, "-m", "segjax.convert", "maskrcnn", str(tmp_path / "cut.pth"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'cut.pth'}: "), proc.stderr
    assert "truncated or corrupt" in lines[0] and not (tmp_path / "out").exists()


def test_safetensors_conversion_never_imports_torch(sources, tmp_path):
    """torch is imported only where a `.pth` is read or written."""
    _, src = sources["mae"]
    code = ("import sys\nfrom segjax.convert.__main__ import main\n"
            f"rc = main(['mae', {str(src)!r}, {str(tmp_path / 'sj')!r}])\n"
            "rc = rc or main(['mae', '--reverse', " + repr(str(tmp_path / "sj")) + ", "
            + repr(str(tmp_path / "back.safetensors")) + ", '--format', 'timm'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- outputs


def _same_params(a, b) -> None:
    fa, fb = flatten_paths(a), flatten_paths(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.mark.parametrize("family", FAMILIES)
def test_non_empty_outputs_are_refused_unless_force(sources, tmp_path, capsys, family):
    ckpt, src = sources[family]
    expected, _ = load_params(ckpt)
    other = {"w": np.zeros(3, np.float32)}
    argv = [family, str(src)] + (["--variant", MODEL[family]] if family == "maskrcnn" else [])

    # 1. an output that already holds a checkpoint (here: a training-like step 100)
    out = tmp_path / "ckpt"
    save_params(out, other, {"model": "something_else"}, step=100)
    capsys.readouterr()
    assert cli(argv + [str(out)]) == 2
    one_error_line(capsys, out, "already holds a segjax checkpoint", "--force")
    assert load_params(out)[1]["step"] == 100  # untouched
    assert cli(argv + [str(out), "--force"]) == 0
    params, meta = load_params(out)
    assert meta["step"] == 0 and meta["model"] == MODEL[family]
    assert sorted(os.listdir(out)) == ["0"]  # the old step is gone, not just outranked
    _same_params(params, expected)

    # 2. a training workdir: checkpoints/ (loaders read there) plus other files
    work = tmp_path / "workdir"
    save_params(work / "checkpoints", other, {"model": "trained"}, step=500)
    (work / "tensorboard").mkdir()
    (work / "tensorboard" / "events.out").write_text("curve")
    capsys.readouterr()
    assert cli(argv + [str(work)]) == 2
    one_error_line(capsys, work, "is a training workdir")
    assert load_params(work)[1]["step"] == 500
    with WorkdirLock(str(work)):  # a running training holds it: not even --force
        capsys.readouterr()
        assert cli(argv + [str(work), "--force"]) == 2
        one_error_line(capsys, work, "running process")
    assert load_params(work)[1]["step"] == 500
    assert cli(argv + [str(work), "--force"]) == 0
    assert not (work / WorkdirLock.NAME).exists()
    params, meta = load_params(work)
    assert meta["step"] == 0 and meta["model"] == MODEL[family]
    _same_params(params, expected)
    assert (work / "tensorboard" / "events.out").read_text() == "curve"
    assert sorted(os.listdir(work / "checkpoints")) == ["0"]

    # 3. a non-empty directory that is no checkpoint: --force writes beside its files
    misc = tmp_path / "misc"
    misc.mkdir()
    (misc / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert cli(argv + [str(misc)]) == 2
    one_error_line(capsys, misc, "is not empty")
    assert cli(argv + [str(misc), "--force"]) == 0
    assert (misc / "notes.txt").read_text() == "keep me"
    assert load_params(misc)[1]["model"] == MODEL[family]

    # 4. a file is never replaced by a checkpoint directory
    f = tmp_path / "file.bin"
    f.write_bytes(b"precious")
    for force in ([], ["--force"]):
        capsys.readouterr()
        assert cli(argv + [str(f)] + force) == 2
        one_error_line(capsys, f, "is not a directory")
        assert f.read_bytes() == b"precious"

    # 5. an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert cli(argv + [str(tmp_path / "empty")]) == 0


REVERSE = {"mae": (["--format", "official"], "model.pth"), "sam": (["--format", "official"], "model.pth"),
           "maskrcnn": ([], "model.pth")}


@pytest.mark.parametrize("family", FAMILIES)
def test_reverse_sources_and_outputs(sources, tmp_path, capsys, family):
    ckpt, _ = sources[family]
    fmt, _ = REVERSE[family]

    def rev(src, out, *extra):
        capsys.readouterr()
        return cli([family, "--reverse", str(src), str(out), *fmt, *extra])

    # unusable checkpoints
    assert rev(tmp_path / "missing", tmp_path / "a.pth") == 2
    one_error_line(capsys, tmp_path / "missing", "no such checkpoint directory")
    (tmp_path / "not_ckpt").mkdir()
    assert rev(tmp_path / "not_ckpt", tmp_path / "a.pth") == 2
    one_error_line(capsys, tmp_path / "not_ckpt", "not a readable segjax checkpoint")
    other = sources["sam" if family != "sam" else "mae"][0]
    assert rev(other, tmp_path / "a.pth") == 2
    one_error_line(capsys, other, "not a", "checkpoint")
    assert not (tmp_path / "a.pth").exists()

    # an existing output file: refused, then replaced with --force
    out = tmp_path / "w.pth"
    out.write_bytes(b"old")
    assert rev(ckpt, out) == 2
    one_error_line(capsys, out, "already exists", "--force")
    assert out.read_bytes() == b"old"
    assert rev(ckpt, out, "--force") == 0
    assert out.stat().st_size > 100
    # a non-empty directory as a suffix-less output
    d = tmp_path / "dir"
    d.mkdir()
    (d / "other.txt").write_text("x")
    assert rev(ckpt, d) == 2
    one_error_line(capsys, d, "is not empty")
    assert rev(ckpt, d, "--force") == 0 and (d / "model.pth").exists() and (d / "other.txt").exists()
    # an output name of no known weight type
    assert rev(ckpt, tmp_path / "w.txt") == 2
    one_error_line(capsys, tmp_path / "w.txt", "unknown weight file type")


def test_reverse_hf_directory_refused_then_replaced(sources, tmp_path, capsys):
    ckpt, _ = sources["mae"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale")  # would shadow nothing, but is stale
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "README.md").write_text("model card")
    capsys.readouterr()
    assert cli(["mae", "--reverse", str(ckpt), str(out), "--format", "hf"]) == 2
    one_error_line(capsys, out, "not empty", "--force")
    assert cli(["mae", "--reverse", str(ckpt), str(out), "--format", "hf", "--force"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    sd, _ = common.read_state_dict(out)
    assert "vit.embeddings.cls_token" in sd


def test_mae_reverse_without_format_is_one_line(sources, tmp_path, capsys):
    capsys.readouterr()
    assert cli(["mae", "--reverse", str(sources["mae"][0]), str(tmp_path / "x.pth")]) == 2
    one_error_line(capsys, "--format")


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """--force replaces the old checkpoint only once the new one is written and readable."""
    import segjax.checkpoint

    out = tmp_path / "ckpt"
    save_params(out, {"w": np.ones(3, np.float32)}, {"model": "old"}, step=7)

    def disk_full(directory, params, meta, step=0):
        os.makedirs(os.path.join(directory, "0.orbax-checkpoint-tmp"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segjax.checkpoint, "save_params", disk_full)
    with pytest.raises(common.ConversionError, match="writing the checkpoint failed.*No space left"):
        common.write_checkpoint(out, {"w": np.zeros(3, np.float32)}, {"model": "new"}, force=True)
    monkeypatch.undo()
    params, meta = load_params(out)
    assert meta["step"] == 7 and meta["model"] == "old" and sorted(os.listdir(out)) == ["7"]
    np.testing.assert_array_equal(params["w"], np.ones(3, np.float32))
    with pytest.raises(common.ConversionError, match="meta is not JSON"):
        common.write_checkpoint(out, {"w": np.zeros(3, np.float32)}, {"model": "new", "x": object()}, force=True)
    assert sorted(os.listdir(out)) == ["7"]
