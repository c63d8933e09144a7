"""A tiny converted SAM, generated images with known objects, and the annotation server
as a subprocess (`python -m segjax.annotate`), for the tests of segjax.annotate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, W = 96, 128
# (file name, disc centre (x, y), radius, colour): one known object per image
OBJECTS = [("a.png", (50, 40), 20, (220, 60, 60)), ("b.png", (80, 55), 18, (60, 200, 60)),
           ("sub/c.png", (40, 60), 16, (60, 60, 220))]


def disc_mask(center, radius) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - center[0]) ** 2 + (yy - center[1]) ** 2 < radius ** 2


def write_images(folder) -> None:
    for name, center, radius, color in OBJECTS:
        image = np.full((H, W, 3), 30, np.uint8)
        image[disc_mask(center, radius)] = color
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(folder, name))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """{root, images, ckpt}: the tiny SAM (random weights through the converter) and
    the generated images."""
    from segjax.testing import importorskip

    importorskip("segment_anything")
    from segjax.testing.sam_official import TINY, converted

    root = tmp_path_factory.mktemp("annotate")
    _, ckpt = converted(str(root), TINY, seed=0)
    images = root / "images"
    write_images(images)
    return {"root": root, "images": str(images), "ckpt": ckpt}


class Server:
    """`python -m segjax.annotate` on a free port; `.url`, `.call(...)`, `.kill()`."""

    def __init__(self, workspace, out, *extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "segjax.annotate", workspace["images"], "--checkpoint", workspace["ckpt"],
             "--out", str(out), "--categories", "blob,other", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on (http://\S+)/", line)
            if m:
                self.url = m.group(1)
                return
        self.kill()
        raise RuntimeError("the server did not start:\n" + "".join(lines))

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
        """(status, parsed JSON or bytes)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, payload, ctype = e.code, e.read(), e.headers.get("content-type", "")
        return status, (json.loads(payload) if "json" in ctype else payload)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no clean-up runs
            self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def start_server():
    servers = []

    def start(workspace, out, *extra) -> Server:
        servers.append(Server(workspace, out, *extra))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()
