"""Instance-detection input pipeline: decode, flip, resize, pad, static-shape targets.

Legend: B batch, M max instances, H/W padded size, h/w original size, n instances
of one record.

The batch (what `segjax.models.maskrcnn.mask_rcnn` trains and evaluates on):
  image (B, H, W, 3) float32 RGB 0..255, resized, padded bottom-right with 0,
  image_hw (B, 2) int32 resized size inside the pad, orig_hw (B, 2) int32,
  image_id (B,) int64,
  boxes (B, M, 4) float32 XYXY in resized pixels, labels (B, M) int32 (1..K; 0 on padding),
  masks (B, M, H, W) uint8 full-image instance masks in the padded frame,
  valid (B, M) bool,
  and, from `EvalLoader(DetectionSource(...), ..., valid_key="example_valid")`,
  example_valid (B,) bool (False on the padding examples of the last batch) and
  index (B,) int32 (position in the split).

Targets follow torchvision's detection references: crowd instances are never
targets (they stay in the evaluation ground truth); the resize is
GeneralizedRCNNTransform's (scale = min(min_size / short side, max_size / long side),
output size floor(side * scale), bilinear without antialias for the image and
nearest for the masks, all with torch's arithmetic from `segjax.ops.resample`, boxes
scaled by the per-axis size ratio); the training flip
happens before the resize, as in references/detection/transforms.py. With `lsj`,
training examples take detectron2's large-scale jitter instead of the resize
(`segjax.data.jitter`: random scale, fixed-size crop padded to a static shape,
instances that leave the crop dropped).

Batches come from `segjax.data.pipeline`'s `Loader` / `EvalLoader` over a
`DetectionSource`, so determinism and resumption are theirs: training batch `step`
is a pure function of (seed, step, process), and the loader state is the step.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from segjax.data.decode import DecodedSource, decode_image
from segjax.data.jitter import LargeScaleJitter
from segjax.ops.resample import nearest_indices, resize_image, resized_hw  # the model's input convention

Batch = dict[str, np.ndarray]
_log = logging.getLogger(__name__)


def decode_masks(rles: Sequence[bytes], h: int, w: int) -> np.ndarray:
    """Compressed-RLE counts -> (n, h, w) uint8 masks."""
    if not len(rles):
        return np.zeros((0, h, w), np.uint8)
    masks = mask_utils.decode([{"size": [h, w], "counts": bytes(r)} for r in rles])  # (h, w, n)
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


@dataclasses.dataclass(frozen=True)
class DetectionPreprocess:
    """Decoded detection record -> fixed-shape example.

    Attributes:
      min_size: short-side target(s); training picks one uniformly per example
        (torchvision's multi-scale `min_size` tuple), evaluation uses the last.
      max_size: long-side cap.
      pad_size: output (H, W); every resized image must fit (checked).
      max_instances: M; extra instances are dropped (logged).
      hflip: random horizontal flip (probability 0.5) in training.
      label_key: 'label' (contiguous 1..K) or 'category_id' (the JSON's ids, e.g. for
        torchvision's 91-class COCO heads).
      with_masks: produce the `masks` target; False (evaluation) skips decoding and
        the (M, H, W) array, 180 MB per COCO image at M=100, 1344x1344.
      lsj: large-scale jitter (`segjax.data.jitter.LargeScaleJitter`) in training,
        instead of the min_size / max_size resize (after the flip, as detectron2's LSJ
        loader); its S x S output sits at the top left of pad_size (S must fit).
        Evaluation keeps the resize.
    """

    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    pad_size: tuple[int, int] = (1344, 1344)
    max_instances: int = 100
    hflip: bool = False
    label_key: str = "label"
    with_masks: bool = True
    lsj: LargeScaleJitter | None = None

    def __post_init__(self):
        if self.lsj is not None and (self.lsj.size > self.pad_size[0] or self.lsj.size > self.pad_size[1]):
            raise ValueError(f"the large-scale jitter crop {self.lsj.size}x{self.lsj.size} does not fit "
                             f"pad_size {tuple(self.pad_size)}")
        if self.label_key not in ("label", "category_id"):
            raise ValueError(f"label_key must be 'label' or 'category_id', got {self.label_key!r}")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {self.max_instances}")

    @property
    def min_sizes(self) -> tuple[int, ...]:
        return (self.min_size,) if isinstance(self.min_size, int) else tuple(int(s) for s in self.min_size)

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> Batch:
        """Args:
          example: `DetectionSource` output: image (h, w, C) uint8 and the record's
            objects (bbox (n, 4) XYXY, label/category_id (n,), iscrowd (n,), rle (n,)).
          rng: per-example generator for the training augmentation; None in eval.

        Returns:
          One row of the batch described in the module doc (without the B axis; no
          `masks` when `with_masks` is False).
        """
        image = example["image"]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        h, w = image.shape[:2]
        obj = example["objects"]
        keep = np.flatnonzero(~np.asarray(obj["iscrowd"], bool))
        if len(keep) > self.max_instances:
            _log.warning("image %s has %d instances; keeping the first max_instances=%d",
                         example.get("image_id"), len(keep), self.max_instances)
            keep = keep[: self.max_instances]
        boxes = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)[keep]
        labels = np.asarray(obj[self.label_key], np.int32)[keep]
        masks = decode_masks([obj["rle"][i] for i in keep] if self.with_masks else [], h, w)  # (n, h, w)

        min_size = self.min_sizes[-1]
        if rng is not None:
            min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))]
            if self.hflip and rng.random() < 0.5:
                image, masks = image[:, ::-1], masks[:, :, ::-1]
                boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=-1)

        ph, pw = self.pad_size
        out_image = np.zeros((ph, pw, 3), np.float32)
        m = self.max_instances
        out = {}
        if self.with_masks:
            out["masks"] = np.zeros((m, ph, pw), np.uint8)
        out_boxes = np.zeros((m, 4), np.float32)
        if rng is not None and self.lsj is not None:
            jit = self.lsj(image, boxes, masks if self.with_masks else None, rng)
            s = self.lsj.size
            rh, rw = (int(v) for v in jit["image_hw"])
            out_image[:s, :s] = jit["image"]
            labels = labels[jit["keep"]]
            n = len(labels)  # instances that left the crop are dropped
            out_boxes[:n] = jit["boxes"]
            if self.with_masks:
                out["masks"][:n, :s, :s] = jit["masks"]
        else:
            rh, rw = resized_hw(h, w, min_size, self.max_size)
            if rh > ph or rw > pw:
                raise ValueError(f"resized image {rh}x{rw} does not fit pad_size {self.pad_size} "
                                 f"(min_size {min_size}, max_size {self.max_size})")
            out_image[:rh, :rw] = resize_image(image, (rh, rw))
            n = len(keep)
            if self.with_masks and n:
                out["masks"][:n, :rh, :rw] = masks[:, nearest_indices(h, rh)][:, :, nearest_indices(w, rw)]
            out_boxes[:n] = boxes * np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        out_labels = np.zeros((m,), np.int32)
        out_labels[:n] = labels
        return {"image": out_image, "image_hw": np.array([rh, rw], np.int32),
                "orig_hw": np.array([h, w], np.int32),
                "image_id": np.asarray(example["image_id"], np.int64),
                "boxes": out_boxes, "labels": out_labels, **out, "valid": np.arange(m) < n}


def has_training_target(record: dict) -> bool:
    """torchvision's `_has_valid_annotation` (references/detection/coco_utils.py) for
    instance masks: some annotation, crowd included, whose box is wider and taller
    than 1 px. (An image with only crowd regions stays a training image, with no
    targets: all its anchors and proposals are negatives.)"""
    boxes = np.asarray(record["objects"]["bbox"], np.float32).reshape(-1, 4)
    return bool(((boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)).any())


class DetectionSource(DecodedSource):
    """Random-access detection records with the image decoded; bad records substituted.

    `source[i]` returns record i with `image` decoded to (h, w, C) uint8. A record
    whose image does not decode (or, with `require_target`, that has no training
    target: images without annotations or with only tiny boxes, which torchvision's
    training set removes) is replaced by the next good one, i+1,
    i+2, ... (mod N): the same on every host and rerun, and the batch shapes never
    change. Each kind is counted once per index.

    Attributes:
      num_corrupt, corrupt_indices, num_without_target: distinct indices substituted so far.
    """

    def __init__(self, source: Sequence[dict], require_target: bool = False):
        super().__init__(source, image_key="image")
        self._require_target = require_target
        self._no_target: set[int] = set()

    @property
    def num_without_target(self) -> int:
        with self._lock:
            return len(self._no_target)

    def _load(self, j: int, record: dict) -> dict | None:
        if self._require_target and not has_training_target(record):
            self._note(self._no_target, j, "has no training target (no box > 1 px)")
            return None
        encoded = record["image"]  # a missing key is a broken setup, not a bad file: it propagates
        try:
            image = decode_image(encoded)
        except Exception as e:  # noqa: BLE001 - image decoders raise all sorts on bad bytes.
            self._note(self._corrupt, j, f"failed to decode ({type(e).__name__}: {e})")
            return None
        if image.shape[:2] != (int(record["height"]), int(record["width"])):
            self._note(self._corrupt, j, f"decodes to {image.shape[:2]}, not its stored size")
            return None
        return {**record, "image": image}
