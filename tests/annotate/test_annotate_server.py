"""The annotation server over HTTP: hostile requests, kill -9 between accepts, resume,
and the written JSON read by pycocotools and by the COCO-format dataset builder."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

CENTER = (50, 40)  # the disc of a.png (conftest.OBJECTS)


def _predict(server, session, image="a.png", points=((CENTER[0], CENTER[1]),), labels=(1,), **kw):
    status, r = server.call("POST", "/api/predict", {"session": session, "image": image,
                                                     "points": [list(p) for p in points], "labels": list(labels),
                                                     **kw})
    assert status == 200, r
    return r


def test_hostile_requests_get_4xx_with_a_message(workspace, start_server, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"not for you")
    os.symlink(tmp_path / "secret.png", os.path.join(workspace["images"], "escape.png"))
    broken = os.path.join(workspace["images"], "broken.png")
    with open(os.path.join(workspace["images"], "a.png"), "rb") as f:
        open(broken, "wb").write(f.read()[:200])  # a truncated PNG
    try:
        server = start_server(workspace, tmp_path / "out.json")
        s = "hostile"
        good = {"session": s, "image": "a.png", "points": [[10, 10]], "labels": [1]}
        cases = {
            "dotdot": ("GET", "/api/image?name=../out.json", None, None, 404),
            "dotdot_inside": ("GET", "/api/image?name=sub/../a.png", None, None, 404),
            "absolute": ("GET", "/api/image?name=/etc/passwd", None, None, 404),
            "symlink_escape": ("GET", "/api/image?name=escape.png", None, None, 404),
            "unknown_image": ("POST", "/api/embed", {"image": "nope.png"}, None, 404),
            "corrupt_image": ("POST", "/api/embed", {"image": "broken.png"}, None, 400),
            "corrupt_image_done": ("POST", "/api/done", {"image": "broken.png"}, None, 400),
            "corrupt_image_predict": ("POST", "/api/predict", {**good, "image": "broken.png"}, None, 400),
            "traversal_in_body": ("POST", "/api/predict", {**good, "image": "../../etc/passwd"}, None, 404),
            "malformed_json": ("POST", "/api/predict", None, b'{"session": "x", "image": ', 422),
            "not_an_object": ("POST", "/api/predict", None, b"[1, 2, 3]", 422),
            "huge_body": ("POST", "/api/predict", None, b'{"pad": "' + b"x" * (2 << 20) + b'"}', 413),
            "nan": ("POST", "/api/predict", None, json.dumps({**good, "points": [[float("nan"), 3]]}).encode(), 422),
            "inf_box": ("POST", "/api/predict", None,
                        json.dumps({**good, "box": [0, 0, float("inf"), 5]}).encode(), 422),
            "outside_point": ("POST", "/api/predict", {**good, "points": [[500, 10]]}, None, 400),
            "negative_point": ("POST", "/api/predict", {**good, "points": [[-1, 10]]}, None, 400),
            "inverted_box": ("POST", "/api/predict", {**good, "points": [], "labels": [], "box": [50, 50, 10, 10]},
                             None, 400),
            "label_count": ("POST", "/api/predict", {**good, "labels": [1, 0]}, None, 400),
            "bad_label": ("POST", "/api/predict", {**good, "labels": [7]}, None, 422),
            "empty_prompt": ("POST", "/api/predict", {**good, "points": [], "labels": []}, None, 400),
            "unknown_field": ("POST", "/api/predict", {**good, "evil": 1}, None, 422),
            "unknown_prediction": ("POST", "/api/predict", {**good, "mask": {"pred_id": "feedbeef"}}, None, 404),
            "unknown_annotation_prompt": ("POST", "/api/predict", {**good, "mask": {"annotation": 99}}, None, 404),
            "accept_unknown_prediction": ("POST", "/api/annotations",
                                          {"session": s, "image": "a.png", "pred_id": "feedbeef",
                                           "category": "blob"}, None, 404),
            "delete_unknown": ("DELETE", "/api/annotations/12345", None, None, 404),
            "delete_not_int": ("DELETE", "/api/annotations/abc", None, None, 422),
            "undo_nothing": ("POST", "/api/undo", None, None, 404),
            "bad_session": ("POST", "/api/predict", {**good, "session": "../x"}, None, 422),
        }
        cases.update({  # what a page of another site could send: not JSON, or a rebinding Host
            "form_post": ("POST", "/api/undo", None, b"a=1", 415,
                          {"Content-Type": "application/x-www-form-urlencoded"}),
            "plain_delete": ("DELETE", "/api/annotations/1", None, None, 415, {"Content-Type": "text/plain"}),
            "rebinding_host": ("GET", "/api/images", None, None, 421, {"Host": "evil.example:80"}),
        })
        for name, (method, path, body, raw, want, *headers) in cases.items():
            status, r = server.call(method, path, body, raw, headers=headers[0] if headers else None)
            assert status == want, (name, status, r)
            assert isinstance(r, dict) and r.get("detail"), (name, r)
            assert "Traceback" not in r["detail"], (name, r)
        # a declared oversized body is refused before it is read (what `call` falls back to
        # when the server answers 413 while the body is still being sent)
        # (with the headers urllib had prepared, Host and Content-Length included, as in the fallback)
        status, payload, ctype = server._headers_only("POST", "/api/predict", 3 << 20,
                                                      [("Content-type", "application/json"), ("Content-length", "9"),
                                                       ("Host", server.url.split("//")[1])], 60)
        assert status == 413 and "json" in ctype and b"request body over" in payload, (status, payload)
        # a real prediction still works afterwards, and an out-of-range candidate is refused
        pred = _predict(server, s)
        status, r = server.call("POST", "/api/annotations", {"session": s, "image": "a.png",
                                                            "pred_id": pred["pred_id"], "index": 7,
                                                            "category": "blob"})
        assert status == 404 and "candidates" in r["detail"]
        assert not os.path.exists(tmp_path / "out.json") or json.load(open(tmp_path / "out.json"))["annotations"] == []
    finally:
        os.unlink(os.path.join(workspace["images"], "escape.png"))
        os.unlink(broken)


def test_kill_between_accepts_keeps_every_mask_and_resumes(workspace, start_server, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "ann.json"
    server = start_server(workspace, out)
    s = "killer"
    status, info = server.call("POST", "/api/embed", {"session": s, "image": "a.png"})
    assert status == 200 and not info["cached"] and (info["height"], info["width"]) == (96, 128)
    status, info = server.call("POST", "/api/embed", {"session": s, "image": "a.png"})
    assert info["cached"]
    accepted = []
    p1 = _predict(server, s)
    assert len(p1["candidates"]) == 3  # a single click: the 3 ambiguous masks, best first
    assert [c["score"] for c in p1["candidates"]] == sorted((c["score"] for c in p1["candidates"]), reverse=True)
    status, a1 = server.call("POST", "/api/annotations", {"session": s, "image": "a.png",
                                                         "pred_id": p1["pred_id"], "index": 0, "category": "blob"})
    assert status == 200, a1
    accepted.append(a1)
    p2 = _predict(server, s, image="b.png", points=(), labels=(), box=[60, 35, 100, 75])
    assert len(p2["candidates"]) == 3
    status, a2 = server.call("POST", "/api/annotations", {"session": s, "image": "b.png",
                                                         "pred_id": p2["pred_id"], "index": 1, "category": "other"})
    assert status == 200, a2
    accepted.append(a2)
    server.kill()

    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [a1["id"], a2["id"]]
    coco = COCO(str(out))
    for a, (pred, index) in zip(accepted, [(p1, 0), (p2, 1)]):
        mask = coco.annToMask(coco.anns[a["id"]]).astype(bool)
        bits = np.frombuffer(base64.b64decode(pred["candidates"][index]["bits"]), np.uint8)
        np.testing.assert_array_equal(mask, np.unpackbits(bits, count=96 * 128).reshape(96, 128).astype(bool))
        assert coco.anns[a["id"]]["area"] == mask.sum() > 0
        assert coco.anns[a["id"]]["bbox"] == list(mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))))
    assert {c["name"]: c["id"] for c in data["categories"]} == {"blob": 1, "other": 2}
    assert sorted(im["file_name"] for im in data["images"]) == ["a.png", "b.png"]

    # restart on the same file: it resumes (ids continue; the image list shows progress)
    server = start_server(workspace, out)
    status, listing = server.call("GET", "/api/images")
    progress = {im["name"]: im["annotations"] for im in listing["images"]}
    assert progress == {"a.png": 1, "b.png": 1, "sub/c.png": 0}
    p3 = _predict(server, s, image="sub/c.png", points=((40, 60), (5, 5)), labels=(1, 0), multimask=False)
    assert len(p3["candidates"]) == 1
    status, a3 = server.call("POST", "/api/annotations", {"session": s, "image": "sub/c.png",
                                                         "pred_id": p3["pred_id"], "index": 0, "category": "new"})
    assert status == 200 and a3["id"] == 3
    # edit: a click added to an accepted mask, its low-res logits as the mask prompt
    p4 = _predict(server, s, points=((CENTER[0], CENTER[1]), (90, 80)), labels=(1, 0), multimask=False,
                  mask={"annotation": a1["id"]})
    status, edited = server.call("PATCH", f"/api/annotations/{a1['id']}", {"session": s, "pred_id": p4["pred_id"]})
    assert status == 200 and edited["segjax"]["source"] == "edit" and edited["segjax"]["points"][1] == [90, 80]
    status, _ = server.call("DELETE", f"/api/annotations/{a2['id']}")
    assert status == 200
    assert [a["id"] for a in json.loads(out.read_text())["annotations"]] == [1, 3]
    assert server.call("POST", "/api/undo")[0] == 200  # the delete
    assert server.call("POST", "/api/undo")[0] == 200  # the edit
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3]
    logits = {p.name for p in (tmp_path / ".segjax_annotate_cache" / "logits").glob("*/*.npy")}
    assert logits == {"2.npy", "3.npy"}  # 1's logits were the undone edit's: dropped
    assert data["annotations"][0]["segmentation"] == a1["segmentation"]
    assert server.call("POST", "/api/redo")[0] == 200
    status, exported = server.call("GET", "/api/export")
    assert exported == json.loads(out.read_text())
    server.kill()

    # the Mask R-CNN COCO config reads the file with the README's overrides
    from configs.maskrcnn import coco_r50_fpn
    from segjax.data import coco as coco_data
    from segjax.tasks import maskrcnn as maskrcnn_task

    config = coco_r50_fpn.get_config()
    config.data.splits = {"train": (workspace["images"], str(out)), "val": (workspace["images"], str(out))}
    config.data.dataset = "annotated"
    config.data.data_dir = str(tmp_path / "tfds")
    data_dir, name = maskrcnn_task.dataset(config)
    meta = coco_data.dataset_metadata(data_dir, name)
    maskrcnn_task.check_num_classes(config, meta)
    assert meta["category_names"] == ["blob", "other", "new"]
    assert meta["counts"]["train"]["annotations_written"] == 3
    records = coco_data.open_split(data_dir, name, "train")
    assert sorted(r["file_name"].decode() if isinstance(r["file_name"], bytes) else r["file_name"]
                  for r in records) == ["a.png", "b.png", "sub/c.png"]


def test_corrupt_out_is_a_clear_error_and_left_alone(workspace, tmp_path, capsys):
    from segjax.annotate.__main__ import main

    out = tmp_path / "ann.json"
    for text in ('{"images": [], "annotations": [', '{"images": [], "annotations": [{"id": 1}], "categories": []}'):
        out.write_text(text)
        assert main([workspace["images"], "--checkpoint", workspace["ckpt"], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(out) in err and "error:" in err
        assert out.read_text() == text


@pytest.mark.parametrize("name", ["../a.png", "/abs.png", "sub/../a.png", "", "a\x00.png", "missing.png"])
def test_image_folder_refuses_names(workspace, name):
    from segjax.annotate.images import ImageFolder, ImageNameError

    folder = ImageFolder(workspace["images"])
    assert folder.names == ["a.png", "b.png", "sub/c.png"]
    with pytest.raises(ImageNameError):
        folder.path(name)


def test_mask_matches_predictor_for_the_same_prompts(workspace, start_server, tmp_path):
    """Click, pick the 2nd candidate, click again (mask prompt = that candidate's
    logits): the stored mask is what SamPredictor returns for the same prompts."""
    from pycocotools import mask as mask_utils

    from segjax.data.decode import read_image
    from segjax.inference.sam.predictor import SamPredictor

    server = start_server(workspace, tmp_path / "ann.json")
    s = "match"
    p1 = _predict(server, s)
    p2 = _predict(server, s, points=(CENTER, (100, 20)), labels=(1, 0), multimask=False,
                  mask={"pred_id": p1["pred_id"], "index": 1})
    status, ann = server.call("POST", "/api/annotations", {"session": s, "image": "a.png", "pred_id": p2["pred_id"],
                                                          "category": "blob"})
    assert status == 200
    got = mask_utils.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}).astype(bool)

    pred = SamPredictor.from_checkpoint(workspace["ckpt"])
    pred.set_image(read_image(os.path.join(workspace["images"], "a.png")))
    _, iou, low = pred.predict(np.array([CENTER], float), np.array([1]), multimask_output=True)
    second = np.argsort(-iou, kind="stable")[1]
    masks, _, _ = pred.predict(np.array([CENTER, (100, 20)], float), np.array([1, 0]),
                               mask_input=low[second][None], multimask_output=False)
    assert masks[0].any()
    np.testing.assert_array_equal(got, masks[0])
