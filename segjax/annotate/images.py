"""The image folder being annotated: listing, safe name resolution, decoding.

Images are named by their path relative to IMAGE_DIR with '/' separators (the COCO
`file_name`). A name from a request is resolved only if it is relative, has no '..'
or empty component, resolves (symlinks followed) to a file inside IMAGE_DIR, and is
one of the listed image files; anything else is an `ImageNameError`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from segjax.data.decode import read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_NAME_LENGTH = 1024


class ImageNameError(ValueError):
    """A requested image name is not an image of the folder."""


class ImageFolder:
    """The images under `root` (recursively, sorted by relative path)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"IMAGE_DIR {root} is not a folder")
        self._sizes: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.names = self._scan()

    def _scan(self) -> list[str]:
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in filenames:
                if f.startswith(".") or not f.lower().endswith(IMAGE_SUFFIXES):
                    continue
                path = Path(dirpath, f)
                try:
                    inside = path.resolve().is_relative_to(self.root)
                except OSError:
                    inside = False
                if inside and path.is_file():
                    names.append(path.relative_to(self.root).as_posix())
        return sorted(names)

    def path(self, name: str) -> Path:
        """The file of a listed image name; ImageNameError for anything else."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
            raise ImageNameError("image name must be a non-empty relative path")
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or os.path.isabs(name) or any(p in ("", ".", "..") for p in parts):
            raise ImageNameError(f"image name {name!r} must be relative to IMAGE_DIR without '.' or '..' parts")
        path = (self.root / Path(*parts)).resolve()
        if not path.is_relative_to(self.root):
            raise ImageNameError(f"image {name!r} is outside IMAGE_DIR")
        if name not in self.names:
            raise ImageNameError(f"no image {name!r} in IMAGE_DIR")
        return path

    def size(self, name: str) -> tuple[int, int]:
        """(H, W) from the file header (no decoding); ValueError if it is not an image."""
        with self._lock:
            if name not in self._sizes:
                try:
                    with Image.open(self.path(name)) as im:
                        w, h = im.size
                except OSError:
                    h = w = 0
                self._sizes[name] = (h, w)
            if self._sizes[name] == (0, 0):
                raise ValueError(f"cannot read image {name!r}")
            return self._sizes[name]

    def read(self, name: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB; ValueError naming the file if it cannot be decoded."""
        path = self.path(name)
        try:
            return read_image(path, rgb=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot decode image {name!r}: {e}") from None

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()
