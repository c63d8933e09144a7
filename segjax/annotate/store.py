"""The annotation file: a COCO instances JSON kept in memory and rewritten atomically.

Layout written (what `segjax.data.coco`, pycocotools and the Mask R-CNN configs read):
  images: [{id, file_name (relative to IMAGE_DIR), height, width, segjax_done}]:
    the images with an annotation or marked done (an image marked done without
    annotations is an image without objects for training);
  annotations: [{id, image_id, category_id, segmentation: compressed RLE
    {size: [H, W], counts: str}, area, bbox [x, y, w, h] (the mask's tight box),
    iscrowd: 0, segjax: {points, labels, box, score, source}}] (the prompts that made
    the mask, so it can be edited later);
  categories: [{id, name, supercategory}] with ids 1..K.

Every change is written at once: a temporary file in the same folder, flushed and
fsync'ed, then `os.replace` onto the target (and the folder fsync'ed: segjax.atomic_write),
so the file on disk is always a complete JSON. An existing file is validated on open; anything
malformed is a `StoreError` naming what is wrong, and the file is left untouched.
Undo / redo is a server-side history of operations (add, delete, update).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segjax.atomic_write import atomic_open

MAX_HISTORY = 200


class StoreError(ValueError):
    """The annotation file cannot be used (malformed, or a request does not fit it)."""


def mask_to_coco(mask: np.ndarray) -> tuple[dict, int, list[float]]:
    """(H, W) bool -> (compressed RLE with str counts, area, bbox [x, y, w, h])."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    area = int(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, area, bbox


def coco_to_mask(segmentation: dict) -> np.ndarray:
    """Compressed RLE (str or bytes counts) -> (H, W) bool."""
    rle = dict(segmentation)
    if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


def atomic_write_json(path: str, data: Any) -> None:
    """Writes `data` as JSON to `path` so that `path` always holds a complete file."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, separators=(",", ":"), allow_nan=False)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(data: Any, where: str) -> None:
    """Raises StoreError unless `data` is an annotation file this store wrote (or a
    compatible COCO instances JSON with compressed-RLE masks)."""
    if not isinstance(data, dict):
        raise StoreError(f"{where}: not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise StoreError(f"{where}: '{key}' must be a list")
    cats = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or not _int(c.get("id")) or not isinstance(c.get("name"), str):
            raise StoreError(f"{where}: bad category {c!r} (needs an integer id and a name)")
        cats.add(c["id"])
    sizes, names = {}, set()
    for im in data["images"]:
        if (not isinstance(im, dict) or not _int(im.get("id")) or not isinstance(im.get("file_name"), str)
                or not _int(im.get("height")) or not _int(im.get("width"))):
            raise StoreError(f"{where}: bad image entry {im!r} (needs integer id, height, width and a file_name)")
        if im["id"] in sizes or im["file_name"] in names:
            raise StoreError(f"{where}: duplicate image {im['id']} / {im['file_name']!r}")
        sizes[im["id"]] = (im["height"], im["width"])
        names.add(im["file_name"])
    ids = set()
    for a in data["annotations"]:
        if not isinstance(a, dict) or not _int(a.get("id")) or a["id"] in ids:
            raise StoreError(f"{where}: annotation without a unique integer id: {str(a)[:200]}")
        ids.add(a["id"])
        if a.get("image_id") not in sizes:
            raise StoreError(f"{where}: annotation {a['id']} refers to unknown image {a.get('image_id')!r}")
        if a.get("category_id") not in cats:
            raise StoreError(f"{where}: annotation {a['id']} has unknown category {a.get('category_id')!r}")
        seg = a.get("segmentation")
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str) or \
                list(seg.get("size", [])) != list(sizes[a["image_id"]]):
            raise StoreError(f"{where}: annotation {a['id']}: segmentation must be a compressed RLE of the image "
                             f"size {list(sizes[a['image_id']])}")
        try:
            coco_to_mask(seg)
        except Exception as e:  # pycocotools raises various types on bad strings
            raise StoreError(f"{where}: annotation {a['id']}: unreadable RLE ({e})") from None


class AnnotationStore:
    """The COCO JSON at `path`: opened (and validated) if present, else created empty.

    categories: names that must exist (ids 1..K in this order for a new file; names
    missing from an existing file are appended).
    """

    def __init__(self, path: str | os.PathLike, categories: list[str] | tuple[str, ...] = ()):
        self.path = os.path.abspath(os.fspath(path))
        self._lock = threading.RLock()
        self._undo: list[tuple] = []
        self._redo: list[tuple] = []
        if os.path.exists(self.path):
            try:
                with open(self.path, "rb") as f:
                    data = json.loads(f.read())
            except (OSError, ValueError) as e:
                raise StoreError(f"{self.path} exists but is not a readable JSON file ({e}); move it away or pick "
                                 "another --out (it is never overwritten)") from None
            validate(data, self.path)
        else:
            folder = os.path.dirname(self.path)
            if not os.path.isdir(folder):
                raise StoreError(f"the folder of {self.path} does not exist")
            data = {"info": {"description": "segjax.annotate"}, "images": [], "annotations": [],
                    "categories": []}
        self.data = data
        changed = not os.path.exists(self.path)
        for name in categories:
            if self.category_id(name) is None:
                self._add_category(name)
                changed = True
        if changed:
            self.save()

    # ------------------------------------------------------------------ reads
    def category_id(self, name: str) -> int | None:
        for c in self.data["categories"]:
            if c["name"] == name:
                return c["id"]
        return None

    def categories(self) -> list[dict]:
        return copy.deepcopy(self.data["categories"])

    def image_entry(self, file_name: str) -> dict | None:
        for im in self.data["images"]:
            if im["file_name"] == file_name:
                return im
        return None

    def annotations(self, file_name: str | None = None) -> list[dict]:
        """Annotations (deep copies), of one image or all, in id order."""
        with self._lock:
            if file_name is None:
                return copy.deepcopy(self.data["annotations"])
            im = self.image_entry(file_name)
            if im is None:
                return []
            return [copy.deepcopy(a) for a in self.data["annotations"] if a["image_id"] == im["id"]]

    def get(self, ann_id: int) -> dict:
        for a in self.data["annotations"]:
            if a["id"] == ann_id:
                return a
        raise KeyError(f"no annotation with id {ann_id}")

    def file_name_of(self, image_id: int) -> str:
        for im in self.data["images"]:
            if im["id"] == image_id:
                return im["file_name"]
        raise KeyError(f"no image with id {image_id}")

    def progress(self) -> dict[str, dict]:
        """file_name -> {annotations: count, done: bool} for the images in the file."""
        counts: dict[int, int] = {}
        for a in self.data["annotations"]:
            counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
        return {im["file_name"]: {"annotations": counts.get(im["id"], 0), "done": bool(im.get("segjax_done"))}
                for im in self.data["images"]}

    def export(self) -> dict:
        """The file's content: images without annotations that are not marked done are
        left out (they would be read as images without objects)."""
        with self._lock:
            used = {a["image_id"] for a in self.data["annotations"]}
            images = [im for im in self.data["images"] if im["id"] in used or im.get("segjax_done")]
            return copy.deepcopy({**self.data, "images": images})

    # ------------------------------------------------------------------ writes
    def save(self) -> None:
        """Writes `export()` to the file, atomically."""
        with self._lock:
            atomic_write_json(self.path, self.export())

    def _add_category(self, name: str) -> int:
        cid = max((c["id"] for c in self.data["categories"]), default=0) + 1
        self.data["categories"].append({"id": cid, "name": name, "supercategory": "object"})
        return cid

    def _image_id(self, file_name: str, hw: tuple[int, int]) -> int:
        im = self.image_entry(file_name)
        if im is None:
            im = {"id": max((i["id"] for i in self.data["images"]), default=0) + 1, "file_name": file_name,
                  "height": int(hw[0]), "width": int(hw[1]), "segjax_done": False}
            self.data["images"].append(im)
        elif (im["height"], im["width"]) != tuple(hw):
            raise StoreError(f"{file_name} is {hw[0]}x{hw[1]} now but {im['height']}x{im['width']} in {self.path}")
        return im["id"]

    def add(self, file_name: str, hw: tuple[int, int], mask: np.ndarray, category: str,
            prompt: dict | None = None, score: float | None = None, source: str = "click") -> dict:
        """Adds a (H, W) bool mask of image `file_name` as a new annotation; saves."""
        with self._lock:
            ann = self._new_annotation(file_name, hw, mask, category, prompt, score, source)
            self.data["annotations"].append(ann)
            self._record(("add", copy.deepcopy(ann)))
            self.save()
            return copy.deepcopy(ann)

    def _new_annotation(self, file_name, hw, mask, category, prompt, score, source) -> dict:
        mask = np.asarray(mask, bool)
        if mask.shape != tuple(hw):
            raise StoreError(f"mask of shape {mask.shape} for an image of {hw}")
        if not mask.any():
            raise StoreError("the mask is empty: nothing to accept")
        cid = self.category_id(category)
        if cid is None:
            cid = self._add_category(category)
        image_id = self._image_id(file_name, hw)
        rle, area, bbox = mask_to_coco(mask)
        next_id = max((a["id"] for a in self.data["annotations"]), default=0) + 1
        # ids are never reused within a session (an undone add keeps its id reserved)
        next_id = max(next_id, max((op[-1]["id"] for op in self._undo + self._redo), default=0) + 1)
        return {"id": next_id, "image_id": image_id, "category_id": cid, "segmentation": rle, "area": area,
                "bbox": bbox, "iscrowd": 0,
                "segjax": {**(prompt or {}), "score": None if score is None else float(score), "source": source}}

    def update(self, ann_id: int, mask: np.ndarray | None = None, category: str | None = None,
               prompt: dict | None = None, score: float | None = None) -> dict:
        """Replaces an annotation's mask (and prompts) and/or category; saves."""
        with self._lock:
            ann = self.get(ann_id)
            old = copy.deepcopy(ann)
            if category is not None:
                cid = self.category_id(category)
                ann["category_id"] = cid if cid is not None else self._add_category(category)
            if mask is not None:
                im = next(i for i in self.data["images"] if i["id"] == ann["image_id"])
                mask = np.asarray(mask, bool)
                if mask.shape != (im["height"], im["width"]) or not mask.any():
                    raise StoreError("the new mask is empty or of the wrong size")
                ann["segmentation"], ann["area"], ann["bbox"] = mask_to_coco(mask)
                ann["segjax"] = {**(prompt or {}), "score": None if score is None else float(score),
                                 "source": "edit"}
            self._record(("update", old, copy.deepcopy(ann)))
            self.save()
            return copy.deepcopy(ann)

    def delete(self, ann_id: int) -> dict:
        with self._lock:
            ann = self.get(ann_id)
            self.data["annotations"].remove(ann)
            self._record(("delete", copy.deepcopy(ann)))
            self.save()
            return ann

    def set_done(self, file_name: str, hw: tuple[int, int], done: bool) -> None:
        with self._lock:
            image_id = self._image_id(file_name, hw)
            next(i for i in self.data["images"] if i["id"] == image_id)["segjax_done"] = bool(done)
            self.save()

    # ------------------------------------------------------------------ history
    def _record(self, op: tuple) -> None:
        self._undo.append(op)
        del self._undo[:-MAX_HISTORY]
        self._redo.clear()

    def _apply(self, op: tuple, inverse: bool) -> dict:
        kind = op[0]
        if kind == "update":
            target = op[1] if inverse else op[2]
            ann = self.get(target["id"])
            ann.clear()
            ann.update(copy.deepcopy(target))
            return target
        if (kind == "add") == inverse:  # undo an add / redo a delete: remove it
            self.data["annotations"].remove(self.get(op[1]["id"]))
        else:  # undo a delete / redo an add: put it back, in id order
            self.data["annotations"].append(copy.deepcopy(op[1]))
            self.data["annotations"].sort(key=lambda a: a["id"])
        return op[1]

    def undo(self) -> dict | None:
        """Reverts the last add / delete / update; returns {op, annotation} or None."""
        return self._step(self._undo, self._redo, inverse=True)

    def redo(self) -> dict | None:
        """Applies the last undone operation again; returns {op, annotation} or None."""
        return self._step(self._redo, self._undo, inverse=False)

    def _step(self, source: list, target: list, inverse: bool) -> dict | None:
        with self._lock:
            if not source:
                return None
            op = source.pop()
            ann = self._apply(op, inverse=inverse)
            target.append(op)
            self.save()
            return {"op": op[0], "annotation": copy.deepcopy(ann)}
