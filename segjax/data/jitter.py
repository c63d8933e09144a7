"""Large-scale jitter (Ghiasi et al. 2021, "Simple Copy-Paste"; the ViTDet recipe), host side.

Legend: h/w input size, n instances, S output side (the crop), rh/rw resized size,
(y0, x0) crop offset, ch/cw the image content inside the S x S output.

detectron2's `ResizeScale(min_scale, max_scale, S, S)` + `FixedSizeCrop((S, S),
pad=True)`, as ViTDet's COCO LSJ loader uses them (after the random flip):

  1. scale ~ U(min_scale, max_scale); output_scale = min(scale * S / h, scale * S / w);
     (rh, rw) = round((h, w) * output_scale) (numpy rounding, at least 1 px).
  2. offset = round(max(rh - S, 0), max(rw - S, 0)) * u), u ~ U(0, 1): ONE u for
     both axes, as detectron2 draws it.
  3. crop [y0, y0 + S) x [x0, x0 + S); an image smaller than the crop is padded
     bottom / right with 0 (never an error): the output is always (S, S, 3), and
     image_hw = (ch, cw) says where the content is.
  4. instances: masks resized (nearest) and cropped; boxes the tight boxes of the
     cropped masks (detectron2's `recompute_boxes`, which ViTDet sets), or, without
     masks, the scaled boxes shifted and clipped to the content; instances whose box
     or mask is empty are dropped (`filter_empty_instances`).

The image is resized with PIL's bilinear filter (antialiased when shrinking, as
detectron2's `ResizeTransform` on uint8 images), in float (`interpolate_host`).
NOTE: detectron2 pads with 128 (its pixel mean); here the pad is 0 like the rest of
segjax's detection pipeline, whose model normalises and zeroes the area outside
image_hw. Masks use torch's 'nearest' (`nearest_indices`), detectron2 PIL's NEAREST.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from segjax.ops.resample import interpolate_host, nearest_indices


@dataclasses.dataclass(frozen=True)
class JitterSample:
    """The random draw of one example: resized size and crop offset."""

    scale: float
    resized_hw: tuple[int, int]
    offset: tuple[int, int]  # (y0, x0)


@dataclasses.dataclass(frozen=True)
class LargeScaleJitter:
    """Resize by a random scale of `size`, then a random `size` x `size` crop (padded).

    Attributes:
      size: S, the output side (1024 in ViTDet).
      min_scale, max_scale: the scale range (0.1, 2.0 in ViTDet).
      recompute_boxes: boxes from the cropped masks (ViTDet's setting) when masks are
        given; False keeps the transformed, clipped boxes.
    """

    size: int = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    recompute_boxes: bool = True

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"lsj size must be >= 1, got {self.size}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"lsj scales must satisfy 0 < min_scale <= max_scale, got "
                             f"({self.min_scale}, {self.max_scale})")

    def sample(self, h: int, w: int, rng: np.random.Generator) -> JitterSample:
        """Draws the scale and the crop offset for an (h, w) image."""
        if h < 1 or w < 1:
            raise ValueError(f"cannot jitter an empty {h}x{w} image")
        scale = float(rng.uniform(self.min_scale, self.max_scale))
        out_scale = min(scale * self.size / h, scale * self.size / w)
        rh, rw = (max(int(v), 1) for v in np.round(np.multiply((h, w), out_scale)))
        u = float(rng.uniform(0.0, 1.0))
        y0, x0 = (int(v) for v in np.round(np.multiply((max(rh - self.size, 0), max(rw - self.size, 0)), u)))
        return JitterSample(scale, (rh, rw), (y0, x0))

    def apply(self, sample: JitterSample, image: np.ndarray, boxes: np.ndarray,
              masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Applies a drawn jitter.

        Args:
          image: (h, w, 3) uint8 or float.
          boxes: (n, 4) float32 XYXY in input pixels.
          masks: (n, h, w) uint8 or None.
        Returns:
          {'image': (S, S, 3) float32 (0 outside the content), 'image_hw': (2,) int32
          (ch, cw), 'boxes': (n', 4) float32 XYXY in output pixels, 'masks': (n', S, S)
          uint8 (when masks were given), 'keep': (n',) int64 indices of the kept
          instances}.
        """
        h, w = image.shape[:2]
        (rh, rw), (y0, x0), s = sample.resized_hw, sample.offset, self.size
        ch, cw = min(rh - y0, s), min(rw - x0, s)
        out = np.zeros((s, s, image.shape[2]), np.float32)
        out[:ch, :cw] = interpolate_host(image, (rh, rw), axes=(0, 1), mode="bilinear", antialias=True,
                                         window=((y0, y0 + ch), (x0, x0 + cw)))  # only the crop
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scaled = boxes * np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        shifted = scaled - np.array([x0, y0, x0, y0], np.float32)
        clipped = np.clip(shifted, 0, np.array([cw, ch, cw, ch], np.float32))
        result = {"image": out, "image_hw": np.array([ch, cw], np.int32)}
        keep = np.ones(len(boxes), bool)
        if masks is not None:
            iy = nearest_indices(h, rh)[y0:y0 + ch]
            ix = nearest_indices(w, rw)[x0:x0 + cw]
            cropped = np.zeros((len(boxes), s, s), np.uint8)
            cropped[:, :ch, :cw] = masks[:, iy][:, :, ix]
            keep &= cropped.any(axis=(1, 2))
            if self.recompute_boxes:
                clipped = mask_boxes(cropped)
            result["masks"] = cropped
        keep &= (clipped[:, 2] - clipped[:, 0] > 1e-5) & (clipped[:, 3] - clipped[:, 1] > 1e-5)
        kept = np.flatnonzero(keep)
        result["boxes"] = clipped[kept]
        if masks is not None:
            result["masks"] = result["masks"][kept]
        result["keep"] = kept
        return result

    def __call__(self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`apply(sample(h, w, rng), ...)`."""
        return self.apply(self.sample(image.shape[0], image.shape[1], rng), image, boxes, masks)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(n, H, W) masks -> (n, 4) float32 XYXY tight boxes, x1 = last column + 1 (detectron2
    `BitMasks.get_bounding_boxes`); zeros for an empty mask."""
    n = len(masks)
    out = np.zeros((n, 4), np.float32)
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # (n, H), (n, W)
    for i in range(n):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys):
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out
