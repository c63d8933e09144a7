"""A tiny converted SAM, generated images with known objects, and the annotation server
as a subprocess (`segjax.testing.annotate_page.AnnotateServer`), for tests/annotate."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from segjax.testing.annotate_page import AnnotateServer

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


@pytest.fixture
def start_server():
    servers = []

    def start(workspace, out, *extra) -> AnnotateServer:
        servers.append(AnnotateServer(workspace["images"], workspace["ckpt"], out, "--categories", "blob,other",
                                      *extra))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()
