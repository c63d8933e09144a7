"""segjax.atomic_write: the target is the old or the new complete file, never half."""

import os
import signal
import subprocess
import sys

import pytest

from segjax.atomic_write import atomic_open


def test_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    with atomic_open(target, "w") as f:
        f.write("old")
    with atomic_open(target, "w") as f:
        f.write("new")
        assert target.read_text() == "old"  # nothing visible before the block ends
    assert target.read_text() == "new"
    assert sorted(os.listdir(target.parent)) == ["a.json"]


def test_an_error_in_the_block_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_kill_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"previous")
    code = ("import os, sys, time\nfrom segjax.atomic_write import atomic_open\n"
            f"with atomic_open({str(target)!r}) as f:\n"
            "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"previous"


def test_only_whole_file_write_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "a", "a"):
            pass
