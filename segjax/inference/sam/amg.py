"""Segment everything: a drop-in for `segment_anything.SamAutomaticMaskGenerator`.

Legend: P prompts per batch (points_per_batch), M = 3 masks per prompt, K kept masks,
(H, W) image size, (h, w) crop size.

The reference's algorithm: for the whole image and each crop of `crop_n_layers`
layers, embed the crop, prompt a grid of single foreground points in batches
(multimask), drop masks under `pred_iou_thresh`, score stability on the
full-resolution logits, drop masks under `stability_score_thresh`, threshold, drop
masks whose box touches a crop edge that is not an image edge, encode as RLE, NMS per
crop (`box_nms_thresh`, by predicted IoU) and across crops (`crop_nms_thresh`,
preferring smaller crops), optionally remove small islands and holes.

On the device (jitted per crop size): the decoder, the upscaling of the logits to the
crop, stability scores, thresholding and mask boxes. On the host: the
variable-size filtering, RLE, NMS and small-region clean-up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from segjax.inference.sam import amg_crops, rle
from segjax.inference.sam.box_nms import batched_nms
from segjax.inference.sam.mask_regions import remove_small_regions
from segjax.inference.sam.postprocess import mask_boxes, stability_score
from segjax.inference.sam.predictor import MASK_THRESHOLD, SamImage, SamInputError, SamPredictor
from segjax.inference.sam.transforms import check_image, numeric_array, scale_coords

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


class SamAutomaticMaskGenerator:
    """Masks for everything in an image, with the reference's options and records.

    predictor_or_model: a `SamPredictor`, a segjax SAM checkpoint directory, or a SAM
    module (then pass `params=`). See the module docstring for the algorithm and
    `segment_anything.SamAutomaticMaskGenerator` for the meaning of each option.
    """

    def __init__(self, predictor_or_model: Any, points_per_side: int | None = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7, crop_n_layers: int = 0,
                 crop_nms_thresh: float = 0.7, crop_overlap_ratio: float = 512 / 1500,
                 crop_n_points_downscale_factor: int = 1, point_grids: list[np.ndarray] | None = None,
                 min_mask_region_area: int = 0, output_mode: str = "binary_mask", params: Any = None) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise SamInputError("Exactly one of points_per_side or point_grid must be provided.")
        if not _is_int(crop_n_layers, 0):
            raise SamInputError(f"crop_n_layers must be an integer >= 0, got {crop_n_layers}")
        if points_per_side is not None:
            if not _is_int(points_per_side, 1):
                raise SamInputError(f"points_per_side must be an integer >= 1, got {points_per_side}")
            self.point_grids = amg_crops.build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = [numeric_array(g, f"point_grids[{i}]") for i, g in enumerate(point_grids)]
            for i, g in enumerate(self.point_grids):
                if g.ndim != 2 or g.shape[-1] != 2 or len(g) == 0:
                    raise SamInputError(f"point_grids[{i}] must be (N, 2) with N >= 1 points (x, y) in [0, 1], "
                                        f"got shape {g.shape}")
        if len(self.point_grids) < crop_n_layers + 1:
            raise SamInputError(f"{len(self.point_grids)} point grids for {crop_n_layers + 1} crop layers")
        if output_mode not in OUTPUT_MODES:
            raise SamInputError(f"Unknown output_mode {output_mode}.")
        if output_mode == "coco_rle":
            from pycocotools import mask as _  # noqa: F401  (fail early, as the reference)
        if points_per_batch < 1:
            raise SamInputError(f"points_per_batch must be >= 1, got {points_per_batch}")

        if isinstance(predictor_or_model, SamPredictor):
            self.predictor = predictor_or_model
        elif isinstance(predictor_or_model, (str, os.PathLike)):
            self.predictor = SamPredictor.from_checkpoint(predictor_or_model)
        elif params is not None:
            self.predictor = SamPredictor(predictor_or_model, params)
        else:
            raise TypeError("predictor_or_model must be a SamPredictor, a checkpoint directory, or a SAM "
                            f"module with params=..., got {type(predictor_or_model).__name__}")
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        # NOTE: scoring is a program of its own, after the predictor's upscaling ones, on
        # purpose. Fused into one, XLA:CPU (seen with jax 0.10) turns the upscaling
        # gathers plus several consumers (threshold, counts, boxes) into a fusion much
        # slower than materialising the logits in between (benchmarks/README.md).
        self._score = jax.jit(self._score_impl)

    # ------------------------------------------------------------------ device part
    def _score_impl(self, logits):
        """(P, M, h, w) logits (the predictor's upscaling to the crop size) -> masks
        (N, h, w) bool, stability (N,), boxes (N, 4) int32, N = P * M."""
        logits = logits.reshape(-1, *logits.shape[-2:])
        stab = stability_score(logits, MASK_THRESHOLD, self.stability_score_offset)
        masks = logits > MASK_THRESHOLD
        return masks, stab, mask_boxes(masks)

    # ------------------------------------------------------------------ host part
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """(H, W, 3) uint8 RGB -> list of records, as the reference:

        segmentation ((H, W) bool, or an RLE dict per output_mode), area (int), bbox
        (XYWH ints), predicted_iou (float), point_coords ([[x, y]]), stability_score
        (float), crop_box (XYWH ints).
        """
        image = check_image(image)
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(data, self.min_mask_region_area,
                                                  max(self.box_nms_thresh, self.crop_nms_thresh))
        if self.output_mode == "coco_rle":
            segs = [rle.coco_encode_rle(r) for r in data["rles"]]
        elif self.output_mode == "binary_mask":
            segs = [rle.rle_to_mask(r) for r in data["rles"]]
        else:
            segs = data["rles"]
        records = []
        for i, seg in enumerate(segs):
            records.append({
                "segmentation": seg,
                "area": rle.area_from_rle(data["rles"][i]),
                "bbox": amg_crops.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": data["iou_preds"][i].item(),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": data["stability_score"][i].item(),
                "crop_box": amg_crops.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
            })
        return records

    def _generate_masks(self, image: np.ndarray) -> dict[str, Any]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = amg_crops.generate_crop_boxes(orig_size, self.crop_n_layers,
                                                               self.crop_overlap_ratio)
        parts = [self._process_crop(image, box, layer, orig_size) for box, layer in zip(crop_boxes, layer_idxs)]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            # prefer masks from smaller crops (the reference's score: 1 / crop area, float32)
            cb = data["crop_boxes"]
            scores = np.float32(1.0) / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1])).astype(np.float32)
            keep = batched_nms(data["boxes"].astype(np.float32), scores, np.zeros(len(cb)), self.crop_nms_thresh)
            data = _take(data, keep)
        return data

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer_idx: int,
                      orig_size: tuple[int, int]) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_size = cropped.shape[:2]
        state = self.predictor.embed_images([cropped])[0]
        points = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]  # (N, 2) float64 crop px
        parts = [self._process_batch(state, points[a:a + self.points_per_batch], crop_box, orig_size)
                 for a in range(0, len(points), self.points_per_batch)]
        data = _cat(parts)
        keep = batched_nms(data["boxes"].astype(np.float32), data["iou_preds"], np.zeros(len(data["boxes"])),
                           self.box_nms_thresh)
        data = _take(data, keep)
        data["boxes"] = amg_crops.uncrop_boxes(data["boxes"], crop_box)
        data["points"] = amg_crops.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64)[None], (len(data["rles"]), 1))
        return data

    def _process_batch(self, state: SamImage, points: np.ndarray, crop_box: list[int],
                       orig_size: tuple[int, int]) -> dict[str, Any]:
        pred = self.predictor
        orig_h, orig_w = orig_size
        n = len(points)
        coords = np.zeros((self.points_per_batch, 2, 2), np.float32)  # point, padding point
        coords[:n, 0] = scale_coords(points, state.original_size, pred.img_size).astype(np.float32)
        labels = np.tile(np.array([[1, -1]], np.int32), (self.points_per_batch, 1))
        low, iou = pred.decode(coords, labels, multimask_output=True, image=state)
        logits = pred.upscale(low, return_logits=True, image=state)  # (P, M) logits at the crop size
        masks, stab, boxes = self._score(logits)
        m = iou.shape[-1]
        iou = np.asarray(iou, np.float32)[:n].reshape(-1)
        stab = np.asarray(stab)[:n * m]
        boxes = np.asarray(boxes)[:n * m].astype(np.int64)
        keep = np.ones(n * m, bool)
        if self.pred_iou_thresh > 0.0:
            keep &= iou > np.float32(self.pred_iou_thresh)
        if self.stability_score_thresh > 0.0:
            keep &= stab >= np.float32(self.stability_score_thresh)
        keep &= ~amg_crops.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        idx = np.flatnonzero(keep)
        kept_masks = np.asarray(masks)[idx] if len(idx) else np.zeros((0, *state.original_size), bool)
        kept_masks = amg_crops.uncrop_masks(kept_masks, crop_box, orig_h, orig_w)
        return {
            "rles": rle.masks_to_rle(kept_masks),
            "iou_preds": iou[idx],
            "points": np.repeat(points, m, axis=0)[idx],
            "stability_score": stab[idx],
            "boxes": boxes[idx],
        }

    @staticmethod
    def postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float) -> dict[str, Any]:
        """Removes islands and holes under `min_area` px from every mask, then NMS again
        with unchanged masks preferred (score 1 vs 0), as the reference."""
        if len(data["rles"]) == 0:
            return data
        new_masks, scores = [], []
        for r in data["rles"]:
            mask = rle.rle_to_mask(r)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(mask)
            scores.append(float(not (changed_holes or changed_islands)))
        masks = np.stack(new_masks)
        boxes = amg_crops.mask_to_box(masks)
        keep = batched_nms(boxes.astype(np.float32), np.asarray(scores, np.float32), np.zeros(len(boxes)),
                           nms_thresh)
        data = {k: (list(v) if isinstance(v, list) else v.copy()) for k, v in data.items()}
        for i in keep:
            if scores[i] == 0.0:
                data["rles"][i] = rle.masks_to_rle(masks[i:i + 1])[0]
                data["boxes"][i] = boxes[i]
        return _take(data, keep)


def _is_int(value: Any, low: int) -> bool:
    """value is an integer (any int-valued number) >= low."""
    try:
        return int(value) == value and value >= low
    except (TypeError, ValueError, OverflowError):
        return False


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        out[key] = sum(vals, []) if isinstance(vals[0], list) else np.concatenate(vals, axis=0)
    return out


def _take(data: dict[str, Any], idx: np.ndarray) -> dict[str, Any]:
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in data.items()}
