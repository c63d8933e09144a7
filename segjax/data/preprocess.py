"""Image-classification / MAE preprocessing of one decoded example (host numpy + PIL).

Train: optional random-resized-crop (torchvision's `RandomResizedCrop` sampling) and
optional horizontal flip; eval: a plain resize. Both then replicate grey to RGB,
scale to [0, 1] and normalise with the ImageNet mean/std that MAE uses. All
randomness comes from the `np.random.Generator` passed in, which the pipeline derives
from (seed, global example index), so an example's augmentation never depends on
thread scheduling or on which host reads it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Samples a crop box as torchvision's `RandomResizedCrop.get_params` does.

    Up to 10 tries: area fraction ~ U(scale), log aspect (w/h) ~ U(log ratio); the
    first box that fits is placed uniformly. Otherwise a centre crop with the aspect
    clamped to `ratio`.

    Returns:
      (top, left, h, w) in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalize(
    image: np.ndarray,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> np.ndarray:
    """image (..., H, W, 3) uint8 -> (x / 255 - mean) / std, float32."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Decoded example -> model-ready example.

    Attributes:
      image_size: output (H, W), or one int for square.
      random_resized_crop_scale: area-fraction range of the train crop, e.g.
        (0.2, 1.0) for MAE pre-training; None resizes the whole image.
      random_resized_crop_ratio: aspect (w/h) range of the train crop.
      hflip: random horizontal flip in training (MAE: True; digits: False, since a
        mirrored digit is a different glyph).
      interpolation: "bilinear" (default), "bicubic" or "nearest"; PIL antialiases
        when shrinking.
      mean, std: per-channel normalisation of [0, 1] pixels.
    """

    image_size: int | tuple[int, int]
    random_resized_crop_scale: tuple[float, float] | None = None
    random_resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the output."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Preprocesses one example; augments only when `rng` is given.

        Args:
          example: {image: (h, w, C) uint8 with C in {1, 3}, label: () int32 optional}.
          rng: per-example generator for the train augmentations; None for eval.

        Returns:
          {image: (H, W, 3) float32 normalised, label: () int32 when present}.
        """
        image = example["image"]
        h, w = image.shape[:2]
        box = (0, 0, h, w)
        if rng is not None and self.random_resized_crop_scale is not None:
            box = random_resized_crop_box(rng, h, w, self.random_resized_crop_scale,
                                          self.random_resized_crop_ratio)
        image = self._crop_resize(image, box)
        if rng is not None and self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)  # greyscale -> RGB
        out = {"image": normalize(image, self.mean, self.std)}
        if "label" in example:
            out["label"] = np.asarray(example["label"], np.int32)
        return out

    def _crop_resize(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """image (h, w, C) uint8, box (top, left, bh, bw) -> (H, W, C) uint8."""
        top, left, bh, bw = box
        out_h, out_w = self.size
        if (top, left, bh, bw) == (0, 0, *image.shape[:2]) and (bh, bw) == (out_h, out_w):
            return image
        pil = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
        # PIL's `box` crops and resizes in one resampling pass.
        pil = pil.resize((out_w, out_h), resample=_RESAMPLE[self.interpolation],
                         box=(left, top, left + bw, top + bh))
        return np.asarray(pil).reshape(out_h, out_w, image.shape[-1])
