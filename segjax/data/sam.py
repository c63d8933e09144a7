"""SAM training and evaluation data: class-agnostic masks, resized as `SamPredictor` does.

Legend: B batch, M max masks per image (`max_masks`), S the model input side
(`img_size`), G the loss resolution (`mask_size`), (H, W) original image size,
(h, w) the resized image inside the S x S input, n masks of one record.

The training batch (what `segjax.models.sam.rollout.rollout_loss` reads):
  image    (B, S, S, 3) float32 RGB 0..255: resized so the longest side is S exactly
           as `segjax.inference.sam.transforms.resize_image` (ResizeLongestSide: PIL
           bilinear on uint8), zero padded bottom-right (the model normalises).
  image_hw (B, 2) int32, the resized (h, w).
  masks    (B, M, G, G) bool: each mask in the padded S x S frame, then averaged over
           (S/G) x (S/G) blocks and kept where the mean is >= 0.5; zero in padding.
  boxes    (B, M, 4) float32 XYXY tight box of each mask at S (x2 = last column + 1).
  valid    (B, M) bool, False on padding slots.
  index    (B,) int32, the record's position in the split.
The evaluation batch (`train=False`) holds the same keys with `masks` at full
resolution, (B, M, S, S) bool, what `segjax.evaluators.interactive` scores clicks on,
plus `example_valid` (B,) bool (False on the padding rows of the last batch).

Masks, from any record with `objects.rle` (compressed-RLE counts at (H, W)), i.e. the
`coco_format` (`segjax.data.coco`, the shapes data included) and `sa1b_format`
(`segjax.data.sa1b`) datasets:
  - candidates: not crowd (a crowd region is a group, not one object), area > 0 and
    area <= max_area_fraction * H * W (the paper drops masks covering more than 90%
    of the image); none in an image so elongated that a side would resize to 0 px;
  - each is resized with the image's own filter (a 0/255 PIL image, bilinear, the same
    geometry as the pixels; kept where >= 128); a mask left empty at the output
    resolution (G in training, S in evaluation) is dropped;
  - training samples at most M of the surviving masks uniformly at random (a random
    permutation, the first M survivors), evaluation keeps the first M in record order.
  The sampling and the flip use the per-example rng of `segjax.data.pipeline.Loader`,
  a pure function of (seed, example index in the stream), so resumption is exact.
  hflip (training only, probability 0.5) mirrors the resized image and its masks.
  A record with no surviving mask or an undecodable image is substituted by the next
  usable one and counted (`SamSource.num_without_masks`, `num_corrupt`).

`make_loader(config, split, process_index, process_count, train)` reads `config.data`:
  kind: 'shapes' (generated, `data.shapes` holds `ShapesSpec` fields), 'coco' (a
    COCO-format dataset `data.dataset`; `data.splits` maps split -> (image folder,
    instances JSON) to build it on first use) or 'sa1b' (an SA-1B-format dataset
    `data.dataset`; `data.splits` maps split -> folder of sa_*.jpg + sa_*.json, or a
    list of folders). "{root}" in split paths stands for `data.root`.
  data_dir ('' = ~/tensorflow_datasets), train_split, eval_split (tfds split strings),
  img_size (S, the model's), mask_size (G; 0 or absent: S / 4, the decoder's low-res
  size), max_masks (M, 64 in the paper), max_area_fraction (0.9), hflip,
  eval_max_masks (M of evaluation; absent: max_masks).
  Batch sizes: `config.batch_size` (training), `config.eval_batch_size` (evaluation;
  each row holds M full-resolution S x S masks, so keep it small). `config.eval.max_images`
  (0 or absent: all) limits an evaluation pass.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data import coco, sa1b, shapes
from segjax.data.decode import decode_image
from segjax.data.maskrcnn import DetectionSource
from segjax.data.pipeline import EvalLoader, Loader
from segjax.data.source import resolve_data_dir
from segjax.inference.sam.transforms import preprocess_shape, resize_image

Batch = dict[str, np.ndarray]
KINDS = ("shapes", "coco", "sa1b")


def default_mask_size(img_size: int) -> int:
    """G: the decoder's low-res logits side, 4 x the embedding grid (S / 16): S / 4."""
    return 4 * (img_size // 16)


@dataclasses.dataclass(frozen=True)
class SamPreprocess:
    """Decoded record -> one fixed-shape example (a row of the batch in the module doc).

    Attributes:
      img_size: S.
      mask_size: G, the output mask side; None: S (full resolution, evaluation).
      max_masks: M.
      max_area_fraction: masks covering more of the image are dropped.
      hflip: random horizontal flip (probability 0.5) when called with an rng.
    """

    img_size: int = 1024
    mask_size: int | None = 256
    max_masks: int = 64
    max_area_fraction: float = 0.9
    hflip: bool = False

    def __post_init__(self):
        g = self.out_size
        if self.img_size < 1 or g < 1 or self.img_size % g:
            raise ValueError(f"mask_size {self.mask_size} must divide img_size {self.img_size}")
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {self.max_masks}")
        if not 0 < self.max_area_fraction <= 1:
            raise ValueError(f"max_area_fraction must be in (0, 1], got {self.max_area_fraction}")

    @property
    def out_size(self) -> int:
        """The output mask side: G, or S when mask_size is None."""
        return self.img_size if self.mask_size is None else int(self.mask_size)

    def candidates(self, record: dict) -> np.ndarray:
        """Indices of the record's masks that pass the area filters (module doc), in order."""
        obj = record["objects"]
        n = len(obj["rle"])
        if not n:
            return np.zeros((0,), np.int64)
        h, w = int(record["height"]), int(record["width"])
        if min(preprocess_shape(h, w, self.img_size)) < 1:
            return np.zeros((0,), np.int64)  # so elongated that a side resizes to 0 px
        area = mask_utils.area([{"size": [h, w], "counts": bytes(r)} for r in obj["rle"]]).astype(np.float64)
        crowd = np.asarray(obj.get("iscrowd", np.zeros(n, bool)), bool).reshape(n)
        keep = ~crowd & (area > 0) & (area <= self.max_area_fraction * h * w)
        return np.flatnonzero(keep)

    def _mask(self, record: dict, i: int, flip: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """Mask i resized (and mirrored when `flip`): ((h, w) bool at S, (G, G) bool in
        the padded frame), or None when it is empty at the output resolution."""
        h0, w0 = int(record["height"]), int(record["width"])
        h, w = preprocess_shape(h0, w0, self.img_size)
        mask = resize_mask(mask_utils.decode({"size": [h0, w0], "counts": bytes(record["objects"]["rle"][i])}), (h, w))
        if flip:
            mask = mask[:, ::-1]
        s, g = self.img_size, self.out_size
        if g == s:
            return (mask, mask) if mask.any() else None
        low = block_mask(mask, s // g, g)
        return (mask, low) if low.any() else None

    def usable(self, record: dict) -> bool:
        """Whether some mask survives, in both orientations when flipping (tried largest
        first: usually one decode), so `select` never returns nothing."""
        cand = self.candidates(record)
        if not len(cand):
            return False
        h, w = int(record["height"]), int(record["width"])
        area = mask_utils.area([{"size": [h, w], "counts": bytes(record["objects"]["rle"][i])} for i in cand])
        flips = (False, True) if self.hflip else (False,)
        return any(all(self._mask(record, int(i), f) is not None for f in flips)
                   for i in cand[np.argsort(-area, kind="stable")])

    def select(self, record: dict, rng: np.random.Generator | None,
               flip: bool = False) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Up to M surviving masks: [(record index, (h, w) bool, (G, G) bool)] in record
        order; a uniform random subset (rng) or the first ones (None)."""
        cand = self.candidates(record)
        order = cand if rng is None else rng.permutation(cand)
        chosen = []
        for i in order:
            if len(chosen) == self.max_masks:
                break
            out = self._mask(record, int(i), flip)
            if out is not None:
                chosen.append((int(i), *out))
        return sorted(chosen, key=lambda c: c[0])

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> Batch:
        """Args:
          example: a `SamSource` record: image (H, W, C) uint8, height, width, objects
            with rle (n,) (and iscrowd), index.
          rng: per-example generator (training: flip, then sampling); None in evaluation.

        Returns:
          {image (S, S, 3) float32, image_hw (2,) int32, masks (M, G, G) bool (G = S
           when mask_size is None), boxes (M, 4) float32, valid (M,) bool, index () int32}.
        """
        image = decode_image(example["image"], rgb=True)
        flip = bool(rng is not None and self.hflip and rng.random() < 0.5)
        chosen = self.select(example, rng, flip)
        resized = resize_image(image, self.img_size)  # (h, w, 3) uint8
        h, w = resized.shape[:2]
        s, g, m = self.img_size, self.out_size, self.max_masks
        out_image = np.zeros((s, s, 3), np.float32)
        out_image[:h, :w] = resized[:, ::-1] if flip else resized
        masks = np.zeros((m, g, g), bool)
        boxes = np.zeros((m, 4), np.float32)
        for k, (_, full, low) in enumerate(chosen):
            masks[k] = low if g != s else np.pad(full, ((0, s - h), (0, s - w)))
            boxes[k] = tight_box(full)
        return {"image": out_image, "image_hw": np.array([h, w], np.int32), "masks": masks, "boxes": boxes,
                "valid": np.arange(m) < len(chosen), "index": np.asarray(example.get("index", -1), np.int32)}


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) 0/1 mask -> (h, w) bool: the image's filter (PIL bilinear, as
    `transforms.resize_image`) on the mask as a 0 / 255 "L" image, kept where >= 128.

    Applied as two one-axis PIL resizes, horizontal then vertical with a uint8
    intermediate (the passes of Pillow's C resampler, each with the whole image's
    coefficients), and only over the rows (first pass) and columns (second pass) that
    hold mask pixels: an all-zero input row or column gives an all-zero output, so the
    cost follows the mask's extent, not the image's.
    NOTE: Pillow's own one-call resize agrees except at rare pixels whose value lands
    on 127 / 128 when it rounds its intermediate after the other pass first (Pillow 13
    picks the pass order itself); tests/data/test_sam_data.py checks both.
    """
    mask = np.asarray(mask)
    big_h, big_w = mask.shape
    h, w = hw
    out = np.zeros((h, w), bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return out
    r0, r1 = rows[0], rows[-1] + 1
    band = mask[r0:r1].astype(np.uint8) * np.uint8(255)  # (rows, W)
    if w != big_w:  # the horizontal pass alone: same height, so PIL skips the vertical one
        band = np.asarray(Image.fromarray(band, mode="L").resize((w, r1 - r0), Image.BILINEAR))
    cols = np.flatnonzero(band.any(axis=0))
    if not len(cols):
        return out
    c0, c1 = cols[0], cols[-1] + 1
    column = np.zeros((big_h, c1 - c0), np.uint8)
    column[r0:r1] = band[:, c0:c1]
    if h != big_h:  # the vertical pass alone
        column = np.asarray(Image.fromarray(column, mode="L").resize((c1 - c0, h), Image.BILINEAR))
    out[:, c0:c1] = column >= 128
    return out


def block_mask(mask: np.ndarray, f: int, g: int) -> np.ndarray:
    """(h, w) bool with h, w <= g * f -> (g, g) bool: the mask zero padded to (g f, g f),
    then the mean of each f x f block >= 0.5 (summed only over the blocks the mask touches)."""
    low = np.zeros((g, g), bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return low
    b0, b1 = rows[0] // f, rows[-1] // f + 1  # block rows / columns touched
    c0, c1 = cols[0] // f, cols[-1] // f + 1
    window = np.zeros(((b1 - b0) * f, (c1 - c0) * f), np.int32)
    part = mask[b0 * f:b1 * f, c0 * f:c1 * f]
    window[:part.shape[0], :part.shape[1]] = part
    low[b0:b1, c0:c1] = window.reshape(b1 - b0, f, c1 - c0, f).sum(axis=(1, 3)) * 2 >= f * f
    return low


def tight_box(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> (4,) float32 XYXY, x2 / y2 one past the last set column / row."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float32)
class SamSource(DetectionSource):
    """Random-access records with the image decoded and `index` added; unusable ones substituted.

    `source[i]` returns record i (its `index` the raw position j actually read) with
    `image` decoded to (H, W, C) uint8. A record that has no mask `preprocess` would
    keep (`SamPreprocess.usable`), or whose image does not decode or disagrees with
    its stored size (`DetectionSource`), is replaced by the next good one, i+1, i+2,
    ... (mod N): the same on every host and rerun. Each kind is counted once per index.

    Attributes:
      num_corrupt, corrupt_indices, num_without_masks: distinct indices substituted so far.
    """

    def __init__(self, source: Sequence[dict], preprocess: SamPreprocess):
        super().__init__(source)
        self._preprocess = preprocess

    # A SAM training target is a usable mask: DetectionSource's count of records without one.
    num_without_masks = DetectionSource.num_without_target

    def _load(self, j: int, record: dict) -> dict | None:
        if not self._preprocess.usable(record):
            self._note(self._no_target, j, "has no usable mask (none left after the area filters and resizing)")
            return None
        out = super()._load(j, record)
        return None if out is None else {**out, "index": j}


def _split_paths(d, root: str) -> dict:
    """config.data.splits with "{root}" replaced: {split: path or tuple/list of paths}."""
    def fill(v):
        return str(v).replace("{root}", root) if isinstance(v, (str, os.PathLike)) else [fill(x) for x in v]
    return {k: fill(v) for k, v in dict(d.get("splits", {}) or {}).items()}


# kind -> open_split(data_dir, name, split) of its records.
_OPENERS: dict[str, Callable] = {"shapes": coco.open_split, "coco": coco.open_split, "sa1b": sa1b.open_split}


def open_records(config, split: str) -> Sequence[dict]:
    """The raw records of `split` of the configured dataset, prepared on first use
    (see the module doc for the `config.data` fields)."""
    d = config.data
    kind = d.get("kind", "shapes")
    if kind not in KINDS:
        raise ValueError(f"config.data.kind must be one of {KINDS}, got {kind!r}")
    data_dir = resolve_data_dir(d.get("data_dir") or None)
    if kind == "shapes":
        name = shapes.prepare_shapes(data_dir, shapes.ShapesSpec(**dict(d.get("shapes", {}) or {})))
    else:
        name = d.get("dataset", "")
        if not name:
            raise ValueError(f"config.data.dataset must name the {kind} dataset")
        splits = _split_paths(d, d.get("root", ""))
        if splits and kind == "coco":
            coco.prepare_coco(data_dir, name, {k: tuple(v) for k, v in splits.items()})
        elif splits:
            sa1b.prepare_sa1b(data_dir, name, splits)
    return _OPENERS[kind](data_dir, name, split)


def preprocess_from_config(config, train: bool) -> SamPreprocess:
    """The `SamPreprocess` of training (masks at G, sampled, flipped) or evaluation
    (full-resolution masks, the first eval_max_masks, no flip)."""
    d = config.data
    s = int(d.img_size)
    if train:
        return SamPreprocess(img_size=s, mask_size=int(d.get("mask_size", 0) or default_mask_size(s)),
                             max_masks=int(d.max_masks), max_area_fraction=float(d.get("max_area_fraction", 0.9)),
                             hflip=bool(d.get("hflip", False)))
    return SamPreprocess(img_size=s, mask_size=None, max_masks=int(d.get("eval_max_masks", 0) or d.max_masks),
                         max_area_fraction=float(d.get("max_area_fraction", 0.9)))


def make_loader(config, split: str, process_index: int, process_count: int, train: bool = True):
    """A `Loader` (train: infinite, shuffled, `config.batch_size`, `config.seed`) or an
    `EvalLoader` (one ordered pass, `config.eval_batch_size`, rows flagged by
    `example_valid`) of SAM batches (module doc) from `split` of the configured data.

    Both expose `num_corrupt`; `loader.source.num_without_masks` counts records
    substituted for having no usable mask.
    """
    pre = preprocess_from_config(config, train)
    source = SamSource(open_records(config, split), pre)
    if train:
        loader = Loader(source, pre, global_batch_size=int(config.batch_size), seed=int(config.seed),
                        process_index=process_index, process_count=process_count)
    else:
        max_images = int(config.get("eval", {}).get("max_images", 0) or 0)
        loader = EvalLoader(source, pre, global_batch_size=int(config.eval_batch_size),
                            process_index=process_index, process_count=process_count,
                            max_examples=max_images or None, valid_key="example_valid")
    loader.source = source
    return loader


def iterate_examples(batches: Iterable[Batch], valid_key: str = "example_valid") -> Iterable[Batch]:
    """Eval batches -> per-image dicts (rows whose `valid_key` is False are left out);
    per-image dicts (an (S, S, 3) image) pass through."""
    for batch in batches:
        if np.ndim(batch["image"]) == 3:
            yield batch
            continue
        for i in range(len(batch["image"])):
            if valid_key in batch and not bool(batch[valid_key][i]):
                continue
            yield {k: v[i] for k, v in batch.items()}
