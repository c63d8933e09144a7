"""MAE reconstruction: de-normalised predictions and the picture people look at.

Legend: B batch, L patches, P patch size, H/W image size.
"""

from __future__ import annotations

import os

import numpy as np

from segjax.models.mae import denormalise_patches, unpatchify

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def reconstruction_views(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch_size: int,
                         norm_pix_loss: bool) -> dict[str, np.ndarray]:
    """The official MAE visualisation: masked input, reconstruction, and paste.

    Args:
      images: (B, H, W, C) normalised model input.
      pred: (B, L, P*P*C) model prediction.
      mask: (B, L), 1 = removed.
      norm_pix_loss: the model predicts per-patch normalised pixels; undo it with each
        patch's own mean/var from the input, as the MAE demo does.
    Returns:
      dict of (B, H, W, C) arrays in the normalised input space: 'original', 'masked'
      (removed patches zeroed), 'reconstruction', 'paste' (visible patches from the
      input, removed ones from the reconstruction).
    """
    images = np.asarray(images, np.float32)
    pred = np.asarray(pred, np.float32)
    b, h, w, c = images.shape
    gh, gw = h // patch_size, w // patch_size
    if norm_pix_loss:
        pred = np.asarray(denormalise_patches(pred, images, patch_size))
    recon = np.asarray(unpatchify(pred, patch_size, gh, gw, c))
    m = np.repeat(np.asarray(mask, np.float32)[:, :, None], patch_size**2 * c, axis=-1)
    m = np.asarray(unpatchify(m, patch_size, gh, gw, c))  # (B, H, W, C), 1 = removed
    return {"original": images, "masked": images * (1 - m), "reconstruction": recon,
            "paste": images * (1 - m) + recon * m}


def to_uint8(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised (…, H, W, 3) -> uint8 RGB."""
    return np.clip((images * std + mean) * 255.0, 0, 255).round().astype(np.uint8)


def grid_image(views: dict[str, np.ndarray], max_rows: int = 8, scale: int = 1,
               columns=("masked", "reconstruction", "paste", "original"),
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Rows = examples, columns = views; returns (rows*H', 4*W', 3) uint8 with 2px gaps."""
    rows = []
    n = min(max_rows, views["original"].shape[0])
    for i in range(n):
        tiles = [to_uint8(views[c][i], mean, std) for c in columns]
        if scale > 1:
            tiles = [t.repeat(scale, 0).repeat(scale, 1) for t in tiles]
        gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        row = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
        rows += [row, np.full((2, row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(rows[:-1], axis=0)


def save_png(path: str, image: np.ndarray) -> str:
    """Writes an (H, W, 3) uint8 image as PNG (directories created)."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path
