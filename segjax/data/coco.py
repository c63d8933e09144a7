"""`coco_format`: any COCO-format instance-segmentation dataset from local paths, as tfds.

A dataset is named by the user (`name`) and described by its splits, each an image
folder plus an instances JSON (the COCO "instances_*.json" layout: `images`,
`annotations` with polygon, uncompressed-RLE or compressed-RLE `segmentation`,
`categories`). `prepare_coco(data_dir, name, splits)` writes it as ArrayRecord under
`data_dir/coco_format/NAME/1.0.0` without TensorFlow; `open_split` reads a split back
for random access; `dataset_metadata` returns the category mapping and the counts.

One record per image (tfds key = image id):
  image: the image file's bytes, unchanged (JPEG/PNG/...; decoded by the pipeline),
  image_id () int64, height () int32, width () int32, file_name () bytes,
  objects: M instances, each
    id (M,) int64 annotation id,
    bbox (M, 4) float32 XYXY in original pixels, clamped to the image,
    category_id (M,) int64 the JSON's id,
    label (M,) int64 contiguous 1..K (sorted category ids; 0 is background),
    iscrowd (M,) bool, area (M,) float32 (the JSON's `area`, else the mask's),
    rle (M,) bytes: pycocotools compressed-RLE counts of the (height, width) mask.

What is skipped or kept (torchvision's detection references are the model: crowd
regions stay in the ground truth for COCOeval but never become training targets;
boxes are clamped and kept only with x2 > x1 and y2 > y1), each counted, logged and
stored in the metadata under `counts[split]`:
  images: an entry that is not an object or whose id is not an integer (or whose
    file_name, height or width is malformed), missing or corrupt files (anything
    `segjax.data.decode.decode_image`, the pipeline's decoder, refuses) and a decoded
    size that disagrees with the JSON are skipped; images without annotations are kept
    (they hold false positives in evaluation; the training pipeline substitutes them).
  annotations: an entry that is not an object (or whose iscrowd is not 0/1), an id,
    image_id or category_id that is not an integer (`bad_ids`; an integral float such
    as 3.0 is read as 3), an unknown image or category, a malformed bbox (not 4 finite
    numbers) or segmentation (polygons of fewer than 3 finite points; an RLE of
    another size, with negative runs or runs not summing to height * width; a
    compressed-RLE string that does not parse), and a degenerate box (zero width or
    height after clamping) are skipped; crowd annotations, tiny boxes (width or
    height <= 1 px) and empty masks are kept.
Each skipped record is logged with its id (the first `MAX_WARNINGS` of each kind per
split, then a count). The build stops only when a file itself is unusable: not JSON,
not an object with `images`, `annotations` and `categories` lists, or categories
without integer ids (the label mapping depends on them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from segjax.data.decode import decode_image
from segjax.data.tfds_builder import LocalBuilder, LocalDatasetInfo, image_record_features, prepare_once

FILE_FORMAT = "array_record"
BUILDER_NAME = "coco_format"
VERSION = "1.0.0"

_log = logging.getLogger(__name__)

# Count names, in the order the build summary prints them.
IMAGE_COUNTS = ("images_in_json", "images_written", "bad_image_records", "missing_images", "corrupt_images",
                "size_mismatch_images", "duplicate_images", "images_without_annotations")
ANNOTATION_COUNTS = ("annotations_in_json", "annotations_written", "annotations_of_skipped_images",
                     "crowd_annotations",
                     "degenerate_boxes", "tiny_boxes", "empty_masks", "bad_annotation_records", "bad_ids",
                     "bad_bbox", "bad_segmentation", "unknown_category", "unknown_image")
# Skipped records logged one by one per kind and split; the rest only counted.
MAX_WARNINGS = 20


@dataclasses.dataclass(eq=False)
class CocoFormatConfig(tfds.core.BuilderConfig):
    """A named COCO-format dataset.

    Attributes:
      splits: split name -> (image folder, instances JSON path). Only needed to build;
        reading a prepared dataset needs just the name.
    """

    splits: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


class CocoFormat(LocalBuilder):
    """Reads a local COCO-format dataset; registered in tfds as `coco_format`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Images as stored bytes, XYXY boxes, RLE masks, contiguous labels."}

    def _info(self) -> tfds.core.DatasetInfo:
        return LocalDatasetInfo(
            builder=self,
            description="A local COCO-format instance-segmentation dataset (segjax.data.coco).",
            features=image_record_features({
                "id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "category_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "label": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "iscrowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                "rle": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Local files only.
        splits = dict(self.builder_config.splits)
        if not splits:
            raise ValueError(f"dataset {self.builder_config.name!r} has no splits to build: pass "
                             "splits={split: (image_dir, instances_json)}")
        datasets = {split: _load_json(ann) for split, (_, ann) in splits.items()}
        categories = _categories(datasets)
        self.info.metadata.update({
            "category_ids": [c["id"] for c in categories],
            "category_names": [c.get("name", str(c["id"])) for c in categories],
            "categories": categories,
            "sources": {s: {"image_dir": os.path.abspath(d), "annotations": os.path.abspath(a)}
                        for s, (d, a) in splits.items()},
            "counts": {},
        })
        label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
        return {split: self._generate_examples(split, splits[split][0], datasets[split], label_of)
                for split in splits}

    def _generate_examples(self, split: str, image_dir: str, dataset: dict,
                           label_of: dict[int, int]) -> Iterator[tuple[int, dict]]:
        """Yields (image id, record); counts what it skips into metadata['counts'][split]."""
        counts = dict.fromkeys(IMAGE_COUNTS + ANNOTATION_COUNTS, 0)
        images = valid_images(dataset, counts)
        by_image = group_annotations(dataset, counts, {int(im["id"]) for im in images})
        for image_info in images:
            record = _image_record(image_info, image_dir, by_image, label_of, counts)
            if record is not None:
                yield record["image_id"], record
        counts["annotations_of_skipped_images"] = sum(
            len(anns) for anns in by_image.values() if anns is not _SEEN)
        self.info.metadata["counts"][split] = counts
        _log_counts(self.builder_config.name, split, counts)


def _load_json(path: str) -> dict:
    """The instances JSON; ValueError naming the path when the file is unusable."""
    try:
        with open(path, "rb") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a COCO instances file: not valid JSON ({e})") from None
    if not isinstance(dataset, dict):
        raise ValueError(f"{path} is not a COCO instances file: the JSON is a {type(dataset).__name__}, "
                         "not an object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: no {', '.join(map(repr, missing))} "
                         "(needs 'images', 'annotations' and 'categories')")
    for k in ("images", "annotations", "categories"):
        if not isinstance(dataset[k], list):
            raise ValueError(f"{path}: {k!r} must be a list, is a {type(dataset[k]).__name__}")
    return dataset


def as_int(value: Any) -> int | None:
    """A JSON id as an int: ints (not bools) and integral floats (3.0); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _skip(counts: dict[str, int], kind: str, what: str, why: str) -> None:
    """Counts one skipped record under `kind` and logs it (the first MAX_WARNINGS per kind)."""
    counts[kind] += 1
    if counts[kind] <= MAX_WARNINGS:
        _log.warning("%s: %s; skipped", what, why)
    if counts[kind] == MAX_WARNINGS:
        _log.warning("(further %s records are counted, not logged)", kind)


def _categories(datasets: Mapping[str, dict]) -> list[dict]:
    """The categories sorted by id; every split must declare the same ones."""
    result = None
    for split, dataset in datasets.items():
        for i, c in enumerate(dataset["categories"]):
            if not isinstance(c, dict) or as_int(c.get("id")) is None:
                raise ValueError(f"split {split!r}: categories[{i}] = {str(c)[:100]} has no integer 'id'; "
                                 "the label mapping cannot be built")
        cats = sorted(({"id": as_int(c["id"]), "name": str(c.get("name", c["id"]))}
                       for c in dataset["categories"]), key=lambda c: c["id"])
        if len({c["id"] for c in cats}) != len(cats):
            raise ValueError(f"split {split!r}: duplicate category ids")
        if result is None:
            result = cats
        elif cats != result:
            raise ValueError(f"split {split!r} declares other categories than the first split; the "
                             "contiguous label mapping must be the same in every split")
    if not result:
        raise ValueError("the dataset declares no categories")
    return result


def valid_images(dataset: dict, counts: dict[str, int]) -> list[dict]:
    """The `images` entries that are objects with an integer id, a string file_name and
    (if given) integer height and width, ids as ints; the others counted and logged."""
    out = []
    for i, im in enumerate(dataset.get("images", [])):
        what = f"image {im['id']!r}" if isinstance(im, dict) and im.get("id") is not None else f"images[{i}]"
        if not isinstance(im, dict):
            counts["images_in_json"] += 1
            _skip(counts, "bad_image_records", what, f"not a JSON object ({type(im).__name__})")
            continue
        image_id = as_int(im.get("id"))
        hw = [im.get(k) for k in ("height", "width") if im.get(k) is not None]
        if image_id is None:
            why = "id is not an integer"
        elif not isinstance(im.get("file_name", ""), str):
            why = "file_name is not a string"
        elif any(as_int(v) is None or v <= 0 for v in hw):
            why = f"height / width {hw} are not positive integers"
        else:
            out.append({**im, "id": image_id})
            continue
        counts["images_in_json"] += 1
        _skip(counts, "bad_image_records", what, why)
    return out


def group_annotations(dataset: dict, counts: dict[str, int],
                      image_ids: set[int] | None = None) -> dict[int, list[dict]]:
    """Annotations by image id, in file order, their ids checked to be integers;
    counts (and logs) those that are not objects, have non-integer ids or an unknown
    image. image_ids: the images that exist (default: every integer id in `images`)."""
    if image_ids is None:
        image_ids = {as_int(im.get("id")) for im in dataset.get("images", []) if isinstance(im, dict)}
    by_image: dict[int, list[dict]] = {}
    for i, ann in enumerate(dataset.get("annotations", [])):
        counts["annotations_in_json"] += 1
        if not isinstance(ann, dict):
            _skip(counts, "bad_annotation_records", f"annotations[{i}]", f"not a JSON object ({type(ann).__name__})")
            continue
        what = f"annotation {ann['id']!r}" if ann.get("id") is not None else f"annotations[{i}] (no id)"
        bad = [f"{k} {ann[k]!r}" for k in ("id", "image_id") if ann.get(k) is not None and as_int(ann[k]) is None]
        if ann.get("id") is None or bad:
            _skip(counts, "bad_ids", what, f"{' and '.join(bad)} not an integer" if bad else "no id")
            continue
        image_id = as_int(ann.get("image_id"))
        if image_id is None or image_id not in image_ids:
            _skip(counts, "unknown_image", what, f"image_id {ann.get('image_id')!r} is not an image of the file")
            continue
        by_image.setdefault(image_id, []).append({**ann, "id": as_int(ann["id"]), "image_id": image_id})
    return by_image


def _image_record(image_info: dict, image_dir: str, by_image: dict[int, list[dict]],
                  label_of: dict[int, int], counts: dict[str, int]) -> dict | None:
    """One image's record, or None (counted) when its file is missing or unreadable."""
    counts["images_in_json"] += 1
    image_id = int(image_info["id"])
    if by_image.get(image_id) is _SEEN:
        _skip(counts, "duplicate_images", f"image {image_id}", "a second image entry with this id")
        return None
    file_name = str(image_info.get("file_name", ""))
    path = os.path.join(image_dir, file_name)
    try:
        with open(path, "rb") as f:
            encoded = f.read()
    except OSError as e:
        counts["missing_images"] += 1
        _log.warning("image %d: cannot read %s (%s); skipped", image_id, path, e)
        return None
    try:
        # the pipeline's own decoder: truncated or corrupt data, and pixel formats it
        # cannot turn into 8 bits, fail here rather than at training time
        h, w = decode_image(encoded).shape[:2]
    except Exception as e:  # noqa: BLE001 - PIL raises all sorts on bad bytes.
        counts["corrupt_images"] += 1
        _log.warning("image %d: %s is not a readable image (%s: %s); skipped", image_id, path,
                     type(e).__name__, e)
        return None
    json_hw = (image_info.get("height"), image_info.get("width"))
    if any(v is not None and v != actual for v, actual in zip(json_hw, (h, w))):
        counts["size_mismatch_images"] += 1
        _log.warning("image %d: %s is %dx%d but the JSON says %sx%s; skipped", image_id, path, h, w,
                     json_hw[0], json_hw[1])
        return None
    objects = convert_annotations(by_image.pop(image_id, []), h, w, label_of, counts)
    by_image[image_id] = _SEEN
    counts["images_written"] += 1
    if not len(objects["id"]):
        counts["images_without_annotations"] += 1
    return {"image": encoded, "image_id": image_id, "height": h, "width": w,
            "file_name": file_name.encode(), "objects": objects}


_SEEN: list = []  # by_image marker of an image already written (duplicate ids).


def convert_annotations(anns: Sequence[dict], height: int, width: int, label_of: Mapping[int, int],
                        counts: dict[str, int]) -> dict[str, np.ndarray]:
    """One image's COCO annotations -> the record's `objects` arrays (see the module doc).

    Args:
      anns: the image's annotation dicts (COCO JSON), in file order.
      height, width: the image size the segmentations refer to.
      label_of: category id -> contiguous label (1..K).
      counts: running counters, updated in place.

    Returns:
      {id (M,), bbox (M, 4) XYXY, category_id (M,), label (M,), iscrowd (M,), area (M,),
       rle (M,) object array of bytes}, for the M annotations kept.
    """
    kept: dict[str, list] = {k: [] for k in ("id", "bbox", "category_id", "label", "iscrowd", "area", "rle")}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict):
            _skip(counts, "bad_annotation_records", f"annotation #{i} of the image",
                  f"not a JSON object ({type(ann).__name__})")
            continue
        ann_id = as_int(ann.get("id"))
        what = f"annotation {ann.get('id')!r}"
        category_id = ann.get("category_id")
        bad = [f"{k} {ann[k]!r}" for k in ("id", "category_id") if ann.get(k) is not None and as_int(ann[k]) is None]
        if ann_id is None or bad:
            _skip(counts, "bad_ids", what, f"{' and '.join(bad)} not an integer" if bad else "no id")
            continue
        category_id = as_int(category_id)
        if category_id is None or category_id not in label_of:
            _skip(counts, "unknown_category", what, f"category_id {ann.get('category_id')!r} is not a category "
                  "of the file")
            continue
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, float):  # (True / False are 1 / 0)
            _skip(counts, "bad_annotation_records", what, f"iscrowd {iscrowd!r} is not 0 or 1")
            continue
        box = _clamped_xyxy(ann.get("bbox"), height, width)
        if box is None:
            _skip(counts, "bad_bbox", what, f"bbox {str(ann.get('bbox'))[:80]} is not 4 finite numbers")
            continue
        if not (box[2] > box[0] and box[3] > box[1]):
            _skip(counts, "degenerate_boxes", what, f"bbox {ann.get('bbox')} has no area inside the "
                  f"{height}x{width} image")
            continue
        rle = segmentation_to_rle(ann.get("segmentation"), height, width)
        if rle is None:
            _skip(counts, "bad_segmentation", what, "segmentation is malformed (see coco.segmentation_to_rle) "
                  f"for the {height}x{width} image: {str(ann.get('segmentation'))[:80]}")
            continue
        iscrowd = bool(iscrowd)
        counts["crowd_annotations"] += iscrowd
        counts["tiny_boxes"] += (box[2] - box[0] <= 1) or (box[3] - box[1] <= 1)
        mask_area = float(mask_utils.area(rle))
        counts["empty_masks"] += mask_area == 0
        area = ann.get("area")
        area = float(area) if _is_number(area) and math.isfinite(area) else mask_area
        kept["id"].append(ann_id)
        kept["bbox"].append(box)
        kept["category_id"].append(category_id)
        kept["label"].append(label_of[category_id])
        kept["iscrowd"].append(iscrowd)
        kept["area"].append(area)
        kept["rle"].append(rle["counts"])
        counts["annotations_written"] += 1
    rle_array = np.empty(len(kept["rle"]), dtype=object)
    rle_array[:] = kept["rle"]
    return {"id": np.asarray(kept["id"], np.int64),
            "bbox": np.asarray(kept["bbox"], np.float32).reshape(-1, 4),
            "category_id": np.asarray(kept["category_id"], np.int64),
            "label": np.asarray(kept["label"], np.int64),
            "iscrowd": np.asarray(kept["iscrowd"], np.bool_),
            "area": np.asarray(kept["area"], np.float32),
            "rle": rle_array}


def _clamped_xyxy(bbox: Any, height: int, width: int) -> list[float] | None:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2] clamped to the image; None when malformed."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _finite_numbers(bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict | None:
    """A COCO `segmentation` -> compressed RLE {'size': [h, w], 'counts': bytes}, or None.

    Polygons (a list of [x0, y0, x1, y1, ...] of finite numbers) are rasterised and
    merged as pycocotools' `annToRLE` does; uncompressed RLE (list counts, used for
    crowds) is compressed; compressed RLE is used as is once its string parses (see
    `rle_string_counts`). None when malformed or sized for another image: every RLE
    must hold non-negative runs summing to height * width (pycocotools decodes
    anything, reading past short data, so a garbage string would only fail later).
    """
    try:
        if isinstance(segm, list):
            # NOTE: pycocotools reads a first polygon of exactly 4 numbers as a box;
            # polygons need >= 3 points, so shorter or odd-length ones are dropped.
            polys = [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0]
            if not polys or not all(_finite_numbers(p) for p in polys):
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in polys], height, width))
        elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
            size = segm["size"]
            if not isinstance(size, (list, tuple)) or [as_int(v) for v in size] != [height, width]:
                return None
            counts = segm["counts"]
            if isinstance(counts, list):
                runs = [as_int(c) for c in counts]
                if any(c is None or c < 0 for c in runs) or sum(runs) != height * width:
                    return None
                rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
            elif isinstance(counts, (str, bytes)):
                counts = counts.encode() if isinstance(counts, str) else counts
                runs = rle_string_counts(counts)
                if runs is None or any(c < 0 for c in runs) or sum(runs) != height * width:
                    return None
                rle = {"size": [height, width], "counts": counts}
            else:
                return None
        else:
            return None
    except Exception:  # noqa: BLE001 - pycocotools raises bare Exceptions on bad input.
        return None
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else bytes(counts)}


def rle_string_counts(counts: bytes) -> list[int] | None:
    """The runs of a compressed-RLE counts string (pycocotools' `rleFrString`), or None
    when it is not one: a character outside '0'..'o' (48..111) or a number cut short.

    Each run is 5-bit groups, least significant first, in chars c - 48 with 0x20
    meaning "more follows" and 0x10 of the last group the sign; from the third run on,
    the value is a difference to the run two before.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_numbers(values: Sequence) -> bool:
    """Every value is a JSON number (not a bool or a string) and finite."""
    return all(_is_number(v) and math.isfinite(v) for v in values)


def _log_counts(name: str, split: str, counts: dict[str, int]) -> None:
    skipped = {k: v for k, v in counts.items() if v and k not in (
        "images_in_json", "images_written", "annotations_in_json", "annotations_written")}
    _log.info("coco_format/%s %s: wrote %d of %d images, %d of %d annotations; %s", name, split,
              counts["images_written"], counts["images_in_json"], counts["annotations_written"],
              counts["annotations_in_json"], skipped or "nothing skipped")


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]*", name):
        raise ValueError(f"dataset name must match [a-z0-9][a-z0-9_]*, got {name!r}")
    return name


def dataset_dir(data_dir: str | os.PathLike, name: str) -> str:
    """Where `coco_format/NAME` is (or would be) prepared: data_dir/coco_format/NAME/1.0.0."""
    return os.path.join(os.path.expanduser(os.fspath(data_dir)), BUILDER_NAME, _check_name(name), VERSION)


def prepare_coco(data_dir: str | os.PathLike, name: str,
                 splits: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]]) -> CocoFormat:
    """Writes the COCO-format dataset `name` as ArrayRecord under `data_dir` unless present.

    Idempotent and safe when several processes call it at once (a lock file; tfds
    writes into a temporary directory and renames it). A prepared dataset is never
    rebuilt: pick a new `name` when the sources change.

    Args:
      data_dir: tfds data root.
      name: the dataset's name ([a-z0-9_]+).
      splits: split -> (image folder, instances JSON), e.g.
        {"train": ("coco/train2017", "coco/annotations/instances_train2017.json")}.

    Returns:
      The prepared builder.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    config = CocoFormatConfig(name=_check_name(name),
                              splits={s: (os.fspath(d), os.fspath(a)) for s, (d, a) in splits.items()})
    return prepare_once(lambda: CocoFormat(config=config, data_dir=data_dir, file_format=FILE_FORMAT), data_dir,
                        f".coco_format_{name}.lock", f"coco_format/{name}", FILE_FORMAT)


def _read_only_builder(data_dir: str | os.PathLike, name: str):
    path = dataset_dir(data_dir, name)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(
            f"coco_format/{name} is not prepared in {os.path.dirname(os.path.dirname(os.path.dirname(path)))!r}; "
            "build it with segjax.data.coco.prepare_coco(data_dir, name, {split: (image_dir, json)})")
    return tfds.builder_from_directory(path)


def open_split(data_dir: str | os.PathLike, name: str, split: str) -> Sequence[dict]:
    """Random-access records of a prepared split (tfds split strings work: 'train[:10%]').

    The image stays encoded bytes (decoded in the pipeline, which survives corrupt
    files); see the module doc for the record layout.
    """
    builder = _read_only_builder(data_dir, name)
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def dataset_metadata(data_dir: str | os.PathLike, name: str) -> dict:
    """{category_ids, category_names, categories, sources, counts: {split: {...}}}."""
    with open(os.path.join(dataset_dir(data_dir, name), "metadata.json")) as f:
        return json.load(f)


def num_classes(metadata: Mapping) -> int:
    """K + 1: the contiguous labels 1..K plus background 0."""
    return len(metadata["category_ids"]) + 1


def record_annotations(record: Mapping) -> list[dict]:
    """A record's objects back as COCO annotation dicts (XYWH bbox, compressed RLE)."""
    obj = record["objects"]
    h, w = int(record["height"]), int(record["width"])
    anns = []
    for i in range(len(obj["id"])):
        x1, y1, x2, y2 = (float(v) for v in obj["bbox"][i])
        counts = obj["rle"][i]
        anns.append({"id": int(obj["id"][i]), "image_id": int(record["image_id"]),
                     "category_id": int(obj["category_id"][i]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                     "area": float(obj["area"][i]), "iscrowd": int(bool(obj["iscrowd"][i])),
                     "segmentation": {"size": [h, w], "counts": counts.decode() if isinstance(counts, bytes)
                                      else str(counts)}})
    return anns


def ground_truth(records: Sequence[Mapping], metadata: Mapping) -> dict:
    """A COCO instances dict (images, annotations, categories) rebuilt from records.

    Annotation ids are renumbered 1.. (COCOeval needs them unique and non-zero);
    everything else is as stored, so it equals the source JSON less what the build
    skipped.
    """
    images, annotations = [], []
    for record in records:
        images.append({"id": int(record["image_id"]), "height": int(record["height"]),
                       "width": int(record["width"]),
                       "file_name": _as_str(record.get("file_name", b""))})
        annotations.extend(record_annotations(record))
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    return {"images": images, "annotations": annotations,
            "categories": [dict(c) for c in metadata["categories"]]}


def _as_str(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode() if isinstance(value, bytes) else str(value)
