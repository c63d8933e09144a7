"""The README's two commands exist and .ci/run runs the test command exactly."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_ci_runs_readme_test_command():
    cmds = _readme_commands()
    assert len(cmds) >= 2
    assert cmds[0].startswith("pip install -e . && python train.py")
    test_cmd = cmds[1].strip()
    assert "pytest" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert test_cmd in ci
