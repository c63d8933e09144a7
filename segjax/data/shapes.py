"""`shapes`: a procedurally generated instance-segmentation dataset (no download).

Each image is a noisy background (random base colour, a linear gradient and
Gaussian pixel noise) with 1..`max_objects` filled shapes of three classes, circle,
square and triangle, of random colour, size, position (and rotation for triangles).
Shapes may overlap; a later shape occludes earlier ones, and a placement that would
hide more than `max_occlusion` of an earlier shape's visible area is re-drawn, so
every annotated instance stays recognisable. Instance masks are the visible pixels,
boxes their tight XYXY extent.

`write_shapes_coco(root, ...)` writes it as a COCO-format folder (PNG images and
`annotations/instances_{split}.json`, masks as compressed RLE), so pycocotools
evaluates against the same JSON, and `prepare_shapes(data_dir, ...)` turns that
folder into the `coco_format/NAME` tfds dataset read by `segjax.data.coco`. An
image is a pure function of (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from segjax.atomic_write import atomic_open
from segjax.data import coco
from segjax.data.tfds_builder import file_lock

CLASSES = ("circle", "square", "triangle")
SPLIT_IDS = {"train": 0, "val": 1}

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """What to generate.

    Attributes:
      image_size: images are (image_size, image_size) RGB.
      num_train, num_val: images per split.
      max_objects: objects per image are uniform in 1..max_objects.
      min_size, max_size: object extent (circle diameter, square side, triangle
        circumscribed diameter) in pixels, uniform.
      max_occlusion: largest fraction of an earlier object's visible area a new one
        may cover.
      seed: everything derives from it.
    """

    image_size: int = 128
    num_train: int = 2000
    num_val: int = 200
    max_objects: int = 4
    min_size: int = 16
    max_size: int = 48
    max_occlusion: float = 0.4
    seed: int = 0

    @property
    def name(self) -> str:
        """The tfds dataset name, unique per spec: shapes_<size>_<train>_<val>_<objects>_s<seed>."""
        base = f"shapes_{self.image_size}_{self.num_train}_{self.num_val}_{self.max_objects}_s{self.seed}"
        default = ShapesSpec(image_size=self.image_size, num_train=self.num_train, num_val=self.num_val,
                             max_objects=self.max_objects, seed=self.seed)
        if self != default:  # other geometry knobs: keep names distinct
            base += f"_{self.min_size}_{self.max_size}_{round(self.max_occlusion * 100)}"
        return base

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[split]


def _shape_mask(kind: str, cx: float, cy: float, size: float, angle: float, image_size: int) -> np.ndarray:
    """(S, S) bool mask of one filled shape centred at (cx, cy)."""
    pil = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(pil)
    r = size / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif kind == "square":
        h = size / 2  # side = size
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif kind == "triangle":
        pts = [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(pil) > 127


def generate_image(spec: ShapesSpec, split: str, index: int) -> tuple[np.ndarray, list[dict]]:
    """One image and its instances.

    Returns:
      image: (S, S, 3) uint8.
      instances: [{label: 1-based class index, mask: (S, S) bool visible pixels,
        full_area: pixels of the whole shape}], in drawing order (later ones on top).
    """
    s = spec.image_size
    rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], index])
    base = rng.uniform(30, 225, 3)
    gradient = rng.uniform(-40, 40, 3)
    direction = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1) - 0.5
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy)[..., None]  # (S, S, 1) in [-0.71, 0.71]
    image = base + gradient * ramp + rng.normal(0, rng.uniform(4, 16), (s, s, 3))
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        kind_index = int(rng.integers(len(CLASSES)))
        colour = rng.uniform(0, 255, 3)
        # A colour that stands out from the background (at least 80 apart in RGB).
        for _ in range(20):
            if np.linalg.norm(colour - base) >= 80:
                break
            colour = rng.uniform(0, 255, 3)
        for _ in range(20):
            size = rng.uniform(spec.min_size, spec.max_size)
            margin = size / 2
            cx, cy = rng.uniform(margin, s - margin, 2)
            mask = _shape_mask(CLASSES[kind_index], cx, cy, size, rng.uniform(0, 2 * math.pi), s)
            if all((o["mask"] & mask).sum() <= spec.max_occlusion * o["mask"].sum() for o in objects):
                break
        else:
            continue  # no placement leaves the others visible enough: skip this object
        for o in objects:
            o["mask"] = o["mask"] & ~mask
        shade = colour + rng.normal(0, 6, (s, s, 3))
        image = np.where(mask[..., None], shade, image)
        objects.append({"label": kind_index + 1, "mask": mask, "full_area": int(mask.sum())})
    objects = [o for o in objects if o["mask"].any()]
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _annotation(obj: dict, image_id: int, ann_id: int) -> dict:
    mask = obj["mask"]
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"id": ann_id, "image_id": image_id, "category_id": obj["label"],
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "area": float(mask.sum()), "iscrowd": 0,
            "segmentation": {"size": list(mask.shape), "counts": rle["counts"].decode()}}


def write_shapes_coco(root: str | os.PathLike, spec: ShapesSpec = ShapesSpec()) -> dict[str, tuple[str, str]]:
    """Writes the COCO-format folder for `spec` under `root` (idempotent per file).

    Layout: root/{train,val}/NNNNNN.png and root/annotations/instances_{split}.json.

    Returns:
      {split: (image folder, instances JSON)} for `prepare_coco`.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    splits = {}
    for split in SPLIT_IDS:
        image_dir = os.path.join(root, split)
        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        splits[split] = (image_dir, ann_file)
        if os.path.exists(ann_file):
            continue  # written last, so its presence means the split is complete
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(spec.num_images(split)):
            image, objects = generate_image(spec, split, i)
            image_id = i + 1
            file_name = f"{i:06d}.png"
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="png")
            with open(os.path.join(image_dir, file_name), "wb") as f:
                f.write(buffer.getvalue())
            images.append({"id": image_id, "file_name": file_name, "height": spec.image_size,
                           "width": spec.image_size})
            for obj in objects:
                annotations.append(_annotation(obj, image_id, len(annotations) + 1))
        with atomic_open(ann_file, "w") as f:
            json.dump({"info": {"description": f"segjax shapes {spec}"}, "images": images,
                       "annotations": annotations, "categories": categories}, f)
    return splits


def prepare_shapes(data_dir: str | os.PathLike, spec: ShapesSpec = ShapesSpec()) -> str:
    """Generates `spec` (COCO folder under data_dir/shapes_coco/NAME) and prepares the
    tfds dataset `coco_format/NAME` in `data_dir`. Idempotent and process-safe.

    Returns:
      NAME, for `coco.open_split(data_dir, NAME, split)`.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    name = spec.name
    if os.path.exists(os.path.join(coco.dataset_dir(data_dir, name), "dataset_info.json")):
        return name
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f".shapes_{name}.lock")):
        splits = write_shapes_coco(os.path.join(data_dir, "shapes_coco", name), spec)
        coco.prepare_coco(data_dir, name, splits)
    return name
