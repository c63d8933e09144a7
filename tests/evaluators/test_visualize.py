"""Detection drawing: masks tinted, boxes outlined, low scores hidden, PNG written."""

import numpy as np
from PIL import Image

from segjax.evaluators import visualize


def test_draw_detections_marks_masks_and_boxes(tmp_path):
    image = np.full((40, 50, 3), 128, np.uint8)
    boxes = np.array([[5, 20, 20, 35], [30, 5, 45, 20], [1, 1, 4, 4]], np.float32)
    masks = np.zeros((3, 40, 50), np.float32)
    masks[0, 22:34, 7:19] = 0.9
    masks[1, 8:18, 32:44] = 0.8
    masks[2, 1:4, 1:4] = 1.0
    out = visualize.draw_detections(image, boxes, np.array([1, 2, 1]), np.array([0.9, 0.7, 0.2]), masks,
                                    class_names=["circle", "square"], score_threshold=0.5)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    colours = visualize.palette(3)
    # inside mask 0: a blend towards label 1's colour
    expected = np.round(0.55 * 128 + 0.45 * colours[1].astype(np.float32))
    np.testing.assert_allclose(out[28, 12], expected, atol=1)
    # box outline of detection 1 (right edge, below the label text)
    np.testing.assert_array_equal(out[19, 45], colours[2])
    # detection 2 scores below the threshold: untouched
    np.testing.assert_array_equal(out[2, 2], image[2, 2])
    # elsewhere untouched
    np.testing.assert_array_equal(out[38, 48], image[38, 48])
    big = visualize.draw_detections(image[..., :1], boxes, np.array([1, 2, 1]), None, None, scale=3)
    assert big.shape == (120, 150, 3)
    path = visualize.save_png(str(tmp_path / "a" / "det.png"),
                              visualize.side_by_side([out, big]))
    assert Image.open(path).size == (50 + 4 + 150, 120)


def test_palette_distinct():
    p = visualize.palette(20)
    assert len({tuple(c) for c in p}) == 20
