"""The annotation file on its own: atomic rewrites, validation on open, undo / redo."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from segjax.annotate import store as store_mod
from segjax.annotate.store import AnnotationStore, StoreError

HW = (20, 30)


def _mask(x0, y0, x1, y1):
    m = np.zeros(HW, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_add_update_delete_undo_redo(tmp_path):
    out = tmp_path / "ann.json"
    st = AnnotationStore(out, ["cat", "dog"])
    assert json.loads(out.read_text())["categories"] == [
        {"id": 1, "name": "cat", "supercategory": "object"}, {"id": 2, "name": "dog", "supercategory": "object"}]
    a = st.add("x.png", HW, _mask(2, 3, 10, 8), "dog", {"points": [[5.0, 5.0]], "labels": [1], "box": None}, 0.9)
    b = st.add("sub/y.png", HW, _mask(0, 0, 4, 4), "bird")  # a new category gets the next id
    assert (a["id"], b["id"], b["category_id"]) == (1, 2, 3)
    assert a["bbox"] == [2.0, 3.0, 8.0, 5.0] and a["area"] == 40
    coco = COCO(str(out))
    np.testing.assert_array_equal(coco.annToMask(coco.anns[1]).astype(bool), _mask(2, 3, 10, 8))
    st.update(1, mask=_mask(0, 0, 30, 20), category="cat")
    st.delete(2)
    data = json.loads(out.read_text())
    assert [(x["id"], x["category_id"], x["area"]) for x in data["annotations"]] == [(1, 1, 600)]
    assert [im["file_name"] for im in data["images"]] == ["x.png"]  # y.png has nothing left and is not done
    assert st.export() == data
    assert st.undo()["op"] == "delete" and st.undo()["op"] == "update"
    data = json.loads(out.read_text())
    assert [(x["id"], x["category_id"], x["area"]) for x in data["annotations"]] == [(1, 2, 40), (2, 3, 16)]
    assert st.redo()["op"] == "update"
    assert json.loads(out.read_text())["annotations"][0]["area"] == 600
    st.add("x.png", HW, _mask(1, 1, 2, 2), "cat")  # a new change clears the redo history
    assert st.redo() is None
    assert st.undo()["annotation"]["id"] == 3
    assert st.add("x.png", HW, _mask(1, 1, 2, 2), "cat")["id"] == 4  # an undone id is not reused
    st.set_done("z.png", HW, True)  # done without annotations: an image without objects
    assert "z.png" in [im["file_name"] for im in json.loads(out.read_text())["images"]]
    with pytest.raises(StoreError, match="empty"):
        st.add("x.png", HW, np.zeros(HW, bool), "cat")
    with pytest.raises(StoreError, match="20x30"):
        st.add("x.png", (21, 30), np.ones((21, 30), bool), "cat")
    with pytest.raises(KeyError):
        st.delete(99)
    # reopening resumes: same annotations, ids continue
    again = AnnotationStore(out, ["cat", "fish"])
    assert [x["id"] for x in again.annotations()] == [1, 2, 4]
    assert again.category_id("fish") == 4
    assert again.add("x.png", HW, _mask(3, 3, 5, 5), "fish")["id"] == 5


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    out = tmp_path / "ann.json"
    st = AnnotationStore(out, ["cat"])
    st.add("x.png", HW, _mask(2, 3, 10, 8), "cat")
    before = out.read_text()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        st.add("x.png", HW, _mask(0, 0, 3, 3), "cat")
    assert out.read_text() == before
    assert [f for f in os.listdir(tmp_path) if f != "ann.json"] == []  # no temporary file left


@pytest.mark.parametrize("text, match", [
    ("not json", "not a readable JSON"),
    ("[]", "not a JSON object"),
    ('{"images": [], "annotations": []}', "'categories' must be a list"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}], "categories": [{"id": 1, "name": "c"}],'
     ' "annotations": [{"id": 1, "image_id": 2, "category_id": 1}]}', "unknown image"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}], "categories": [{"id": 1, "name": "c"}],'
     ' "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"size": [3, 2], "counts": "2"}}]}',
     "compressed RLE of the image size"),
    ('{"images": [{"id": 1, "file_name": "a.png", "height": 2, "width": 2}], "categories": [{"id": 1, "name": "c"}],'
     ' "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "segmentation": {"size": [2, 2], "counts": "4"}}]}',
     "unknown category"),
])
def test_a_malformed_file_is_refused_and_left_alone(tmp_path, text, match):
    out = tmp_path / "ann.json"
    out.write_text(text)
    with pytest.raises(StoreError, match=match):
        AnnotationStore(out, ["cat"])
    assert out.read_text() == text
