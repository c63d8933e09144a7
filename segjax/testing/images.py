"""Real photographs as model inputs (skimage ships them; no download)."""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def chelsea() -> np.ndarray:
    """(300, 451, 3) uint8 RGB: a real photo, not square (so a model's padding matters)."""
    import skimage.data

    return skimage.data.chelsea()


def photo_batch(size: int, names: tuple[str, ...] = ("astronaut", "chelsea")) -> np.ndarray:
    """(B, size, size, 3) float32: centre-cropped, resized, ImageNet-normalised photos."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), np.float32) / 255.0
        out.append((img - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(out).astype(np.float32)


def masking_noise(batch: int, num_patches: int, seed: int = 0) -> np.ndarray:
    """(B, L) uniform noise, as MAE draws it (torch.rand)."""
    return np.random.default_rng(seed).random((batch, num_patches), dtype=np.float32)
