"""Detection pipeline: torchvision-equal resize, flip, padding, substitution, determinism."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data import coco
from segjax.data import maskrcnn as maskrcnn_data
from segjax.data.pipeline import EvalLoader, Loader
from segjax.models.maskrcnn.mask_rcnn import MaskRCNN, prepare_image
from segjax.ops.resample import resize_image
from segjax.testing.coco_fixture import write_tiny_coco

torch.set_num_threads(1)


def _record(image_id, h, w, boxes, labels, masks, iscrowd=None, fmt="png", seed=0):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format=fmt)
    n = len(boxes)
    rle = np.empty(n, object)
    rle[:] = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in masks]
    return {"image": buffer.getvalue(), "image_id": np.int64(image_id), "height": np.int32(h),
            "width": np.int32(w), "objects": {
                "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
                "label": np.asarray(labels, np.int64), "category_id": np.asarray(labels, np.int64) * 10,
                "iscrowd": np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool),
                "rle": rle}}


def _box_record(image_id, h, w, boxes, labels, iscrowd=None, seed=0):
    """Masks = the boxes' pixels."""
    masks = []
    for x1, y1, x2, y2 in boxes:
        m = np.zeros((h, w), np.uint8)
        m[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = 1
        masks.append(m)
    return _record(image_id, h, w, boxes, labels, masks, iscrowd, seed=seed)


@pytest.mark.parametrize("hw,out", [((37, 53), (80, 115)), ((90, 70), (41, 23)), ((20, 20), (20, 20))])
def test_resize_matches_torch_interpolate(hw, out):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*hw, 3)).astype(np.uint8)
    ours = resize_image(image, out)
    ref = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=out,
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)  # a few float32 steps of 0..255 values
    mask = (rng.random(hw) > 0.5).astype(np.uint8)
    ours_m = mask[maskrcnn_data.nearest_indices(hw[0], out[0])][:, maskrcnn_data.nearest_indices(hw[1], out[1])]
    ref_m = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=out)[0, 0].byte()
    np.testing.assert_array_equal(ours_m, ref_m.numpy())


def test_preprocess_equals_torchvision_transform():
    """Image, boxes and masks equal GeneralizedRCNNTransform's resize (eval mode)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    h, w = 45, 70
    boxes = [[3.0, 4.0, 30.5, 20.0], [40.0, 10.0, 69.0, 44.0]]
    rec = _box_record(5, h, w, boxes, [2, 1])
    ex = maskrcnn_data.DetectionSource([rec])[0]
    pre = maskrcnn_data.DetectionPreprocess(min_size=64, max_size=90, pad_size=(96, 96), max_instances=4)
    out = pre(ex)
    t = GeneralizedRCNNTransform(64, 90, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    masks = maskrcnn_data.decode_masks(rec["objects"]["rle"], h, w)
    image_list, targets = t([torch.from_numpy(np.array(ex["image"])).permute(2, 0, 1).float()],
                            [{"boxes": torch.tensor(boxes), "labels": torch.tensor([2, 1]),
                              "masks": torch.from_numpy(masks)}])
    rh, rw = image_list.image_sizes[0]
    assert tuple(out["image_hw"]) == (rh, rw) and rh > h
    np.testing.assert_allclose(out["image"][:rh, :rw], image_list.tensors[0, :, :rh, :rw].permute(1, 2, 0).numpy(),
                               atol=1e-3)
    assert np.all(out["image"][rh:] == 0) and np.all(out["image"][:, rw:] == 0)
    np.testing.assert_allclose(out["boxes"][:2], targets[0]["boxes"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(out["masks"][:2, :rh, :rw], targets[0]["masks"].numpy())
    assert not out["masks"][:, rh:].any() and not out["masks"][:, :, rw:].any()
    np.testing.assert_array_equal(out["labels"], [2, 1, 0, 0])
    np.testing.assert_array_equal(out["valid"], [True, True, False, False])
    assert tuple(out["orig_hw"]) == (h, w) and out["image_id"] == 5
    assert out["image"].dtype == np.float32 and out["masks"].dtype == np.uint8
    assert out["boxes"].shape == (4, 4) and out["masks"].shape == (4, 96, 96)


# COCO's common photo sizes (h, w), portrait ones and two odd sizes: scale factors that
# are not simple fractions (300 x 451 -> 800 x 1202 is 2.666..., 640 x 480 -> 1066 x 800)
COCO_SIZES = [(427, 640), (375, 500), (333, 500), (300, 451), (640, 480), (480, 640), (612, 459), (517, 389),
              (271, 613)]
# Normalised units (ImageNet mean / std; values in about [-2.2, 2.7], where a float32
# step is 2.4e-7). The taps are torch's to the bit; what remains is that torchvision
# normalises before resizing and we after: at most 5 steps (1.19e-6) over 6 skimage
# photos x these 9 sizes x both torch kernels, <= 9.6e-7 on the photos below. The host
# resize before segjax.ops.resample was off by 1.1e-5 to 2.8e-5 here.
TRANSFORM_TOL = 1.5e-6


def _photo(hw: tuple[int, int], name: str) -> np.ndarray:
    """(h, w, 3) uint8: a skimage photo centre-cropped to the aspect of hw, PIL-resized."""
    import skimage.data

    img = getattr(skimage.data, name)()[..., :3]
    h, w = img.shape[:2]
    ch, cw = (h, round(h * hw[1] / hw[0])) if h * hw[1] <= w * hw[0] else (round(w * hw[0] / hw[1]), w)
    img = img[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    return np.array(Image.fromarray(img).resize((hw[1], hw[0]), Image.BICUBIC))


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("hw", COCO_SIZES)
def test_input_transform_equals_torchvision_at_default_sizes(hw, threads):
    """Our Mask R-CNN input (the data pipeline's and the predictor's resize + pad, then
    the model's normalisation) = GeneralizedRCNNTransform at min_size 800 / max_size 1333:
    the same sizes and the normalised tensors to TRANSFORM_TOL. torchvision normalises
    before it resizes, we after: the rest is rounding. torch picks another bilinear
    kernel with one thread, so both are checked."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from segjax.testing.images import IMAGENET_MEAN, IMAGENET_STD

    image = _photo(hw, ("rocket", "coffee", "chelsea", "astronaut")[sum(hw) % 4])
    t = GeneralizedRCNNTransform(800, 1333, IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist()).eval()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            images, _ = t([torch.from_numpy(image).permute(2, 0, 1).float() / 255])
    finally:
        torch.set_num_threads(old_threads)
    ref = images.tensors[0].permute(1, 2, 0).numpy()  # padded to a multiple of 32
    rh, rw = images.image_sizes[0]
    no_objects = {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros(0, np.int64),
                  "iscrowd": np.zeros(0, bool), "rle": []}
    pre = maskrcnn_data.DetectionPreprocess(pad_size=(1344, 1344), with_masks=False)
    out = pre({"image": image, "image_id": 0, "objects": no_objects})
    assert tuple(out["image_hw"]) == (rh, rw)
    padded, rhw = prepare_image(image)  # the predictor's path
    assert rhw == (rh, rw) and padded.shape == ref.shape
    np.testing.assert_array_equal(padded, out["image"][:ref.shape[0], :ref.shape[1]])
    ours = MaskRCNN().apply({}, out["image"][None], out["image_hw"][None], method=MaskRCNN.normalize)[0]
    ours = np.asarray(ours)[:ref.shape[0], :ref.shape[1]]
    err = np.abs(ours - ref).max()
    assert err <= TRANSFORM_TOL, f"{hw}: max |ours - torchvision| = {err:.2e}"


def test_crowd_excluded_truncation_and_category_ids():
    rec = _box_record(1, 32, 32, [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 30, 30], [2, 2, 8, 8]], [1, 2, 3, 1],
                      iscrowd=[False, True, False, False])
    ex = maskrcnn_data.DetectionSource([rec])[0]
    out = maskrcnn_data.DetectionPreprocess(32, 32, (32, 32), max_instances=2)(ex)
    # crowd dropped first, then only the first max_instances kept
    np.testing.assert_array_equal(out["labels"], [1, 3])
    np.testing.assert_allclose(out["boxes"], [[0, 0, 10, 10], [1, 1, 30, 30]])
    out = maskrcnn_data.DetectionPreprocess(32, 32, (32, 32), max_instances=4, label_key="category_id")(ex)
    np.testing.assert_array_equal(out["labels"], [10, 30, 10, 0])
    no_masks = maskrcnn_data.DetectionPreprocess(32, 32, (32, 32), max_instances=4, with_masks=False)(ex)
    assert "masks" not in no_masks
    np.testing.assert_array_equal(no_masks["boxes"], out["boxes"])


def test_hflip_moves_boxes_with_masks():
    rec = _box_record(1, 20, 30, [[2, 3, 9, 12]], [1])
    ex = maskrcnn_data.DetectionSource([rec])[0]
    pre = maskrcnn_data.DetectionPreprocess(20, 30, (20, 30), max_instances=1, hflip=True)
    flipped = None
    for seed in range(20):
        out = pre(ex, np.random.default_rng(seed))
        if out["boxes"][0, 0] != 2:
            flipped = out
            break
    assert flipped is not None
    np.testing.assert_allclose(flipped["boxes"][0], [21, 3, 28, 12])
    ys, xs = np.nonzero(flipped["masks"][0])
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (21, 28, 3, 12)
    np.testing.assert_array_equal(flipped["image"], pre(ex)["image"][:, ::-1])


def test_too_large_for_pad_is_an_error():
    ex = maskrcnn_data.DetectionSource([_box_record(1, 20, 40, [[0, 0, 5, 5]], [1])])[0]
    with pytest.raises(ValueError, match="does not fit pad_size"):
        maskrcnn_data.DetectionPreprocess(40, 80, (64, 64))(ex)


def test_training_substitutes_empty_tiny_only_and_corrupt_records(caplog):
    good = _box_record(1, 16, 16, [[1, 1, 9, 9]], [1])
    empty = _box_record(2, 16, 16, [], [])
    crowd_only = _box_record(3, 16, 16, [[1, 1, 9, 9]], [1], iscrowd=[True])
    tiny_only = _box_record(4, 16, 16, [[1, 1, 1.5, 9]], [1])
    corrupt = {**_box_record(5, 16, 16, [[1, 1, 9, 9]], [2]), "image": b"not an image"}
    src = maskrcnn_data.DetectionSource([empty, crowd_only, tiny_only, corrupt, good], require_target=True)
    # torchvision keeps crowd-only images for training (as all-negative examples).
    assert [int(src[i]["image_id"]) for i in range(5)] == [3, 3, 1, 1, 1]
    assert (src.num_without_target, src.num_corrupt) == (2, 1)
    crowd = maskrcnn_data.DetectionPreprocess(16, 16, (16, 16), max_instances=2)(src[1])
    assert not crowd["valid"].any() and not crowd["masks"].any()
    assert "no training target" in caplog.text and "failed to decode" in caplog.text
    # Evaluation keeps empty images.
    assert int(maskrcnn_data.DetectionSource([empty, good])[0]["image_id"]) == 2


def _tiny_source(tmp_path):
    image_dir, ann_file = write_tiny_coco(str(tmp_path))
    coco.prepare_coco(tmp_path / "tfds", "tiny", {"train": (image_dir, ann_file)})
    return coco.open_split(tmp_path / "tfds", "tiny", "train")


def test_loader_on_coco_records_is_deterministic_and_resumable(tmp_path):
    src = _tiny_source(tmp_path)
    pre = maskrcnn_data.DetectionPreprocess((32, 40), 64, (64, 64), max_instances=6, hflip=True)
    a = Loader(maskrcnn_data.DetectionSource(src, require_target=True), pre, global_batch_size=2, seed=0)
    b = Loader(maskrcnn_data.DetectionSource(src, require_target=True), pre, global_batch_size=2, seed=0)
    batch = a.get_batch(3)
    assert batch["image"].shape == (2, 64, 64, 3) and batch["masks"].shape == (2, 6, 64, 64)
    assert batch["boxes"].shape == (2, 6, 4) and batch["valid"].shape == (2, 6)
    assert batch["image_id"].dtype == np.int64
    # Image 2 has no annotations: never a training example.
    ids = np.concatenate([a.get_batch(s)["image_id"] for s in range(6)])
    assert set(ids) <= {1, 7} and len(set(ids)) == 2
    for k in batch:
        np.testing.assert_array_equal(batch[k], b.get_batch(3)[k])
    it = a.iterate(3)
    step, first = next(it)
    it.close()
    assert step == 3
    for k in batch:
        np.testing.assert_array_equal(first[k], batch[k])
    # boxes stay inside the resized image and cover their masks' pixels
    for i in range(2):
        rh, rw = batch["image_hw"][i]
        for box, m, v in zip(batch["boxes"][i], batch["masks"][i], batch["valid"][i]):
            if not v:
                assert not m.any() and not box.any()
                continue
            assert 0 <= box[0] < box[2] <= rw and 0 <= box[1] < box[3] <= rh
    # Two processes split each global batch.
    p0 = Loader(maskrcnn_data.DetectionSource(src, require_target=True), pre, global_batch_size=2, seed=0,
                process_index=0, process_count=2)
    p1 = Loader(maskrcnn_data.DetectionSource(src, require_target=True), pre, global_batch_size=2, seed=0,
                process_index=1, process_count=2)
    np.testing.assert_array_equal(np.concatenate([p0.get_batch(3)["image"], p1.get_batch(3)["image"]]),
                                  batch["image"])


def test_eval_loader_pads_last_batch(tmp_path):
    src = _tiny_source(tmp_path)
    pre = maskrcnn_data.DetectionPreprocess(32, 64, (64, 64), max_instances=6)
    loader = EvalLoader(maskrcnn_data.DetectionSource(src), pre, global_batch_size=2, valid_key="example_valid")
    assert (loader.num_examples, len(loader)) == (3, 2)
    batches = list(loader)
    np.testing.assert_array_equal(np.concatenate([b["example_valid"] for b in batches]), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 2, 0])
    ids = np.concatenate([b["image_id"] for b in batches])[:3]
    assert sorted(ids) == [1, 2, 7]
    assert len(EvalLoader(maskrcnn_data.DetectionSource(src), pre, global_batch_size=2, max_examples=2)) == 1
    assert os.path.isdir(tmp_path / "tfds")
