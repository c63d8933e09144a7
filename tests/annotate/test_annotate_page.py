"""The annotation page in a real browser: headless Chromium (the distribution's
package, installed by .ci/run) driven by Selenium with the distribution's
chromedriver, over the tiny SAM and generated images."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from segjax.testing import importorskip, in_ci
from segjax.testing.annotate_page import browser_paths, click, drag, headless_chromium, keys, wait_for

CENTER = (50, 40)  # the disc of a.png (conftest.OBJECTS)


@pytest.fixture
def browser(tmp_path):
    if browser_paths() is None:
        msg = "headless Chromium + chromedriver are not installed (apt-get install -y chromium chromium-driver)"
        if in_ci():
            raise RuntimeError(msg)
        pytest.skip(msg)
    importorskip("selenium")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    drv = headless_chromium(downloads)
    drv.downloads = downloads
    yield drv
    drv.quit()


def _idle(drv):
    wait_for(drv, "return document.body.dataset.busy === '0' && !window.segjax.state.inflight", True)


def _n_annotations(drv) -> int:
    return drv.execute_script("return document.querySelectorAll('#annotation-list li').length")


def test_click_box_accept_undo_reload_export(workspace, start_server, browser, tmp_path):
    from pycocotools.coco import COCO

    from segjax.data.decode import read_image
    from segjax.inference.sam.predictor import SamPredictor

    out = tmp_path / "ann.json"
    server = start_server(workspace, out, "--propose-points", "4", "--propose-iou-thresh", "0",
                          "--propose-stability-thresh", "0")
    drv = browser
    drv.get(server.url + "/")
    wait_for(drv, "return document.body.dataset.opened", "a.png")
    assert "embedded in" in drv.find_element("id", "embed-status").text
    shortcuts = drv.find_element("id", "shortcuts").text
    for word in ("foreground", "background", "box", "undo", "Delete", "propose"):
        assert word in shortcuts

    # one click: 3 candidates with their IoU; key 2 picks the second
    click(drv, *CENTER)
    wait_for(drv, "return document.body.dataset.predictions", "1")
    cands = drv.find_elements("css selector", "#candidates span")
    assert len(cands) == 3 and all("IoU" in c.text for c in cands)
    keys(drv, "2")
    assert drv.execute_script("return window.segjax.state.chosen") == 1
    # a background point (right click) refines it, the chosen candidate's logits as the mask prompt
    click(drv, 100, 20, right=True)
    wait_for(drv, "return document.body.dataset.predictions", "2")
    _idle(drv)
    assert drv.execute_script("return window.segjax.state.labels") == [1, 0]
    keys(drv, "\ue007")  # Enter: accept with the category field's value ("blob")
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 1)

    # drag a box around the disc, accept
    drag(drv, 28, 18, 72, 62)
    wait_for(drv, "return document.body.dataset.predictions", "3")
    _idle(drv)
    box = drv.execute_script("return window.segjax.state.box")
    assert box is not None and drv.execute_script("return window.segjax.state.points.length") == 0
    keys(drv, "\ue007")
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 2)
    # undo (server side: the accept), redo, undo again
    keys(drv, "z", ctrl=True)
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 1)
    keys(drv, "z", ctrl=True, shift=True)
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 2)
    keys(drv, "z", ctrl=True)
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 1)
    _idle(drv)
    assert len(json.loads(out.read_text())["annotations"]) == 1

    # screenshot: the accepted mask is drawn over the image exactly where it is
    drv.save_screenshot(str(tmp_path / "page.png"))
    canvas = drv.find_element("id", "canvas")
    canvas.screenshot(str(tmp_path / "canvas.png"))
    shot = np.asarray(Image.open(tmp_path / "canvas.png").convert("RGB")).astype(int)
    coco = COCO(str(out))
    ann = coco.dataset["annotations"][0]
    mask = coco.annToMask(ann).astype(bool)
    image = read_image(os.path.join(workspace["images"], "a.png")).astype(int)
    scale = drv.execute_script("return window.segjax.state.scale")
    hh, ww = shot.shape[:2]
    assert abs(hh - 96 * scale) <= 1 and abs(ww - 128 * scale) <= 1
    # the canvas draws without smoothing: sample the centre of each image pixel's block
    cy = np.minimum(((np.arange(96) + 0.5) * scale).astype(int), hh - 1)
    cx = np.minimum(((np.arange(128) + 0.5) * scale).astype(int), ww - 1)
    tinted = np.abs(shot[cy][:, cx] - image).max(-1) > 25
    assert mask.any() and (~mask).any()
    assert tinted[mask].mean() > 0.99 and tinted[~mask].mean() < 0.01, (tinted[mask].mean(), tinted[~mask].mean())

    # the stored masks are what SamPredictor gives for the prompts the page sent
    pred = SamPredictor.from_checkpoint(workspace["ckpt"])
    pred.set_image(read_image(os.path.join(workspace["images"], "a.png")))
    pts, labels = np.asarray(ann["segjax"]["points"]), np.asarray(ann["segjax"]["labels"])
    _, iou, low = pred.predict(pts[:1], labels[:1], multimask_output=True)
    second = np.argsort(-iou, kind="stable")[1]
    want, _, low_accepted = pred.predict(pts, labels, mask_input=low[second][None], multimask_output=False)
    np.testing.assert_array_equal(mask, want[0])

    # reload: resumes from the server (the accepted mask, the embedding from the cache)
    drv.refresh()
    wait_for(drv, "return document.body.dataset.opened", "a.png")
    assert _n_annotations(drv) == 1
    assert "cache" in drv.find_element("id", "embed-status").text

    # propose, accept the first candidate (Y), reject the next (N), stop (Esc)
    keys(drv, "p")
    wait_for(drv, "return !!window.segjax.state.proposal", True)
    keys(drv, "y")
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 2)
    keys(drv, "n")
    keys(drv, "\ue00c")  # Esc
    wait_for(drv, "return !!window.segjax.state.proposal", False)
    data = json.loads(out.read_text())
    assert [a["segjax"]["source"] for a in data["annotations"]] == ["click", "propose"]

    # edit the first mask (select it, E, a background click, Enter): its logits are the mask prompt
    first_id = data["annotations"][0]["id"]
    drv.find_element("css selector", f"#annotation-list li[data-id='{first_id}']").click()
    wait_for(drv, "return window.segjax.state.selected", first_id)
    keys(drv, "e")
    assert drv.execute_script("return window.segjax.state.editing") == first_id
    click(drv, 20, 80, right=True)
    wait_for(drv, "return document.body.dataset.predictions", "1")
    _idle(drv)
    keys(drv, "\ue007")
    wait_for(drv, "return window.segjax.state.editing", None)
    _idle(drv)
    edited = json.loads(out.read_text())["annotations"][0]
    assert edited["id"] == first_id and edited["segjax"]["source"] == "edit"
    want, _, _ = pred.predict(np.asarray(edited["segjax"]["points"]), np.asarray(edited["segjax"]["labels"]),
                              mask_input=low_accepted[0][None], multimask_output=False)
    assert edited["segjax"]["labels"] == [0]
    from pycocotools import mask as mask_utils

    got = mask_utils.decode({**edited["segmentation"], "counts": edited["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(got.astype(bool), want[0])
    # delete the proposed one (select, Delete)
    second_id = json.loads(out.read_text())["annotations"][1]["id"]
    drv.find_element("css selector", f"#annotation-list li[data-id='{second_id}']").click()
    wait_for(drv, "return window.segjax.state.selected", second_id)
    keys(drv, "\ue017")  # Delete
    wait_for(drv, "return document.querySelectorAll('#annotation-list li').length", 1)
    assert [a["id"] for a in json.loads(out.read_text())["annotations"]] == [first_id]

    # export through the page's link: the same JSON as the file
    drv.find_element("id", "export").click()
    target = drv.downloads / "annotations.json"
    deadline = time.time() + 30
    while not target.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads(target.read_text()) == json.loads(out.read_text())
