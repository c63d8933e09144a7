"""`sa1b_format`: SA-1B-format datasets (one image + one JSON per image) from local folders, as tfds.

The layout of Segment Anything's SA-1B release: a folder of `sa_<id>.jpg` and
`sa_<id>.json`, each JSON
  {"image": {image_id, width, height, file_name},
   "annotations": [{id, segmentation: {size: [h, w], counts: COCO compressed-RLE str},
                    bbox (XYWH), area, predicted_iou, stability_score, crop_box,
                    point_coords}, ...]}.
`prepare_sa1b(data_dir, name, splits)` writes it as ArrayRecord under
`data_dir/sa1b_format/NAME/1.0.0` without TensorFlow (splits: split -> folder or list of
folders); `open_split` reads a split back for random access, with the image left as
encoded bytes; `dataset_metadata` returns the sources and counts.

One record per image (tfds key = image_id), laid out as `segjax.data.coco`'s records
so the SAM pipeline (`segjax.data.sam`) reads both:
  image: the file's bytes, image_id () int64, height () int32, width () int32,
  file_name () bytes,
  objects: n masks, each
    id (n,) int64, bbox (n, 4) float32 XYXY from the mask (pycocotools' toBbox),
    area (n,) float32 mask pixels, rle (n,) bytes compressed-RLE counts at (height, width),
    predicted_iou (n,) float32, stability_score (n,) float32 (NaN where absent).

What is skipped, each counted (metadata `counts[split]`) and logged with the file
(the first `coco.MAX_WARNINGS` of each kind per split): a JSON that does not parse or
is not an object with an `image` object (`bad_json`), an image entry without an
integer image_id (`bad_image_records`), a duplicate image_id, a missing or undecodable
image file (`missing_images`, `corrupt_images`), an image whose decoded size is not the
JSON's width / height (`size_mismatch_images`); per annotation: not an object or an id
that is not an integer (`bad_annotation_records`) and a segmentation that is not a
valid RLE of the image's size (`bad_segmentation`: wrong `size`, a string that does
not parse, runs not summing to height * width; `coco.segmentation_to_rle` checks it).
Images without annotations are written (and counted); the SAM pipeline substitutes
them. Only an unreadable folder stops the build.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils

from segjax.data import coco
from segjax.data.coco import _skip as skip_record  # one logger-and-counter for every builder
from segjax.data.coco import as_int
from segjax.data.decode import decode_image
from segjax.data.tfds_builder import LocalBuilder, LocalDatasetInfo, image_record_features, prepare_once

FILE_FORMAT = "array_record"
BUILDER_NAME = "sa1b_format"
VERSION = "1.0.0"

COUNTS = ("json_files", "images_written", "bad_json", "bad_image_records", "duplicate_images",
          "missing_images", "corrupt_images", "size_mismatch_images", "images_without_annotations",
          "annotations_in_json", "annotations_written", "bad_annotation_records", "bad_segmentation")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Sa1bFormatConfig(tfds.core.BuilderConfig):
    """A named SA-1B-format dataset.

    Attributes:
      splits: split name -> folders of sa_*.jpg + sa_*.json. Only needed to build.
    """

    splits: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


class Sa1bFormat(LocalBuilder):
    """Reads local SA-1B-format folders; registered in tfds as `sa1b_format`."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Images as stored bytes, RLE masks, XYXY boxes."}

    def _info(self) -> tfds.core.DatasetInfo:
        vector = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)  # noqa: E731
        return LocalDatasetInfo(
            builder=self,
            description="A local SA-1B-format mask dataset (segjax.data.sa1b).",
            features=image_record_features({
                "id": vector(np.int64),
                "bbox": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
                "area": vector(np.float32),
                "rle": vector(np.object_),
                "predicted_iou": vector(np.float32),
                "stability_score": vector(np.float32),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Local files only.
        splits = _checked_splits(self.builder_config)
        self.info.metadata.update({"sources": {s: [os.path.abspath(f) for f in fs] for s, fs in splits.items()},
                                   "counts": {}})
        return {split: self._generate_examples(split, folders) for split, folders in splits.items()}

    def _generate_examples(self, split: str, folders: Sequence[str]) -> Iterator[tuple[int, dict]]:
        counts = dict.fromkeys(COUNTS, 0)
        seen: set[int] = set()
        for folder in folders:
            for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.json"))):
                counts["json_files"] += 1
                record = image_record(path, counts)
                if record is None:
                    continue
                if record["image_id"] in seen:
                    skip_record(counts, "duplicate_images", path, f"image_id {record['image_id']} seen before")
                    continue
                seen.add(record["image_id"])
                counts["images_written"] += 1
                counts["images_without_annotations"] += not len(record["objects"]["id"])
                counts["annotations_written"] += len(record["objects"]["id"])
                yield record["image_id"], record
        self.info.metadata["counts"][split] = counts
        skipped = {k: v for k, v in counts.items() if v and k not in (
            "json_files", "images_written", "annotations_in_json", "annotations_written")}
        _log.info("sa1b_format/%s %s: wrote %d images of %d JSON files, %d of %d masks; %s",
                  self.builder_config.name, split, counts["images_written"], counts["json_files"],
                  counts["annotations_written"], counts["annotations_in_json"], skipped or "nothing skipped")


def _checked_splits(config: Sa1bFormatConfig) -> dict[str, tuple[str, ...]]:
    """config.splits, after checking there is one and that every folder exists."""
    if not config.splits:
        raise ValueError(f"sa1b_format/{config.name} has no splits to build: pass splits="
                         "{split: folder or [folders]} to prepare_sa1b")
    for split, folders in config.splits.items():
        for folder in folders:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"split {split!r}: {folder} is not a folder")
    return dict(config.splits)


def image_record(json_path: str, counts: dict[str, int]) -> dict | None:
    """One SA-1B JSON (and the image it names, in the same folder) -> a record (module
    doc), or None after counting why it is skipped."""
    try:
        with open(json_path, "rb") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        skip_record(counts, "bad_json", json_path, f"not readable JSON ({type(e).__name__}: {e})")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("image"), dict):
        skip_record(counts, "bad_json", json_path, "not an object with an 'image' object")
        return None
    info = data["image"]
    image_id = as_int(info.get("image_id"))
    file_name = info.get("file_name", os.path.splitext(os.path.basename(json_path))[0] + ".jpg")
    hw = (info.get("height"), info.get("width"))
    if image_id is None or not isinstance(file_name, str) or any(as_int(v) is None or v <= 0 for v in hw):
        skip_record(counts, "bad_image_records", json_path,
                    f"image entry needs an integer image_id, a file_name, positive height / width: {str(info)[:100]}")
        return None
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        skip_record(counts, "bad_json", json_path, f"'annotations' is a {type(anns).__name__}, not a list")
        return None
    path = os.path.join(os.path.dirname(json_path), file_name)
    try:
        with open(path, "rb") as f:
            encoded = f.read()
    except OSError as e:
        skip_record(counts, "missing_images", json_path, f"image {path} cannot be read ({e})")
        return None
    try:
        h, w = decode_image(encoded).shape[:2]
    except Exception as e:  # noqa: BLE001 - PIL raises all sorts on bad bytes.
        skip_record(counts, "corrupt_images", json_path, f"{path} is not a readable image ({type(e).__name__}: {e})")
        return None
    if (h, w) != (as_int(hw[0]), as_int(hw[1])):
        skip_record(counts, "size_mismatch_images", json_path, f"{path} is {h}x{w} but the JSON says {hw[0]}x{hw[1]}")
        return None
    return {"image": encoded, "image_id": image_id, "height": h, "width": w, "file_name": file_name.encode(),
            "objects": convert_annotations(anns, h, w, counts, json_path)}


def convert_annotations(anns: Sequence, height: int, width: int, counts: dict[str, int],
                        where: str = "") -> dict[str, np.ndarray]:
    """One image's SA-1B annotations -> the record's `objects` arrays (n kept masks)."""
    kept: dict[str, list] = {k: [] for k in ("id", "area", "rle", "predicted_iou", "stability_score")}
    for i, ann in enumerate(anns):
        counts["annotations_in_json"] += 1
        ann_id = as_int(ann.get("id")) if isinstance(ann, dict) else None
        what = f"{where} annotation {ann.get('id')!r}" if isinstance(ann, dict) else f"{where} annotations[{i}]"
        if ann_id is None:
            skip_record(counts, "bad_annotation_records", what, "not an object with an integer id")
            continue
        rle = coco.segmentation_to_rle(ann.get("segmentation"), height, width)
        if rle is None:
            segm = str(ann.get("segmentation"))[:80]
            skip_record(counts, "bad_segmentation", what,
                        f"segmentation is not an RLE of the {height}x{width} image: {segm}")
            continue
        kept["id"].append(ann_id)
        kept["area"].append(float(mask_utils.area(rle)))
        kept["rle"].append(rle["counts"])
        for k in ("predicted_iou", "stability_score"):
            v = ann.get(k)
            kept[k].append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan)
    rles = [{"size": [height, width], "counts": c} for c in kept["rle"]]
    xywh = mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))
    rle_array = np.empty(len(kept["rle"]), dtype=object)
    rle_array[:] = kept["rle"]
    return {"id": np.asarray(kept["id"], np.int64),
            "bbox": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32),
            "area": np.asarray(kept["area"], np.float32), "rle": rle_array,
            "predicted_iou": np.asarray(kept["predicted_iou"], np.float32),
            "stability_score": np.asarray(kept["stability_score"], np.float32)}


def dataset_dir(data_dir: str | os.PathLike, name: str) -> str:
    """Where `sa1b_format/NAME` is (or would be) prepared: data_dir/sa1b_format/NAME/1.0.0."""
    return os.path.join(os.path.expanduser(os.fspath(data_dir)), BUILDER_NAME, coco._check_name(name), VERSION)


def prepare_sa1b(data_dir: str | os.PathLike, name: str,
                 splits: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]) -> Sa1bFormat:
    """Writes the SA-1B-format dataset `name` as ArrayRecord under `data_dir` unless present.

    Idempotent and process-safe (a lock file; tfds writes into a temporary directory
    and renames it). A prepared dataset is never rebuilt: pick a new `name` when the
    sources change.

    Args:
      data_dir: tfds data root.
      name: the dataset's name ([a-z0-9_]+).
      splits: split -> folder (or list of folders) of sa_*.jpg + sa_*.json, e.g.
        {"train": ["sa1b/sa_000000", "sa1b/sa_000001"], "val": "sa1b/sa_000999"}.

    Returns:
      The prepared builder.
    """
    data_dir = os.path.expanduser(os.fspath(data_dir))
    folders = {s: tuple(os.fspath(f) for f in ([v] if isinstance(v, (str, os.PathLike)) else v))
               for s, v in splits.items()}
    config = Sa1bFormatConfig(name=coco._check_name(name), splits=folders)
    return prepare_once(lambda: Sa1bFormat(config=config, data_dir=data_dir, file_format=FILE_FORMAT), data_dir,
                        f".sa1b_format_{name}.lock", f"sa1b_format/{name}", FILE_FORMAT)


def open_split(data_dir: str | os.PathLike, name: str, split: str) -> Sequence[dict]:
    """Random-access records of a prepared split (tfds split strings work: 'train[:10%]');
    the image stays encoded bytes."""
    path = dataset_dir(data_dir, name)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        raise FileNotFoundError(f"sa1b_format/{name} is not prepared in {os.fspath(data_dir)!r}; build it with "
                                "segjax.data.sa1b.prepare_sa1b(data_dir, name, {split: folder})")
    builder = tfds.builder_from_directory(path)
    return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


def dataset_metadata(data_dir: str | os.PathLike, name: str) -> dict:
    """{sources: {split: [folders]}, counts: {split: {...}}}."""
    with open(os.path.join(dataset_dir(data_dir, name), "metadata.json")) as f:
        return json.load(f)
