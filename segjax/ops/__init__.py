"""Pure jnp ops (no parameters) with static shapes: boxes, RoIAlign/RoIPool, NMS,
matching and sampling, mask pasting. Each mirrors a torchvision op (see its module).
`resample` holds torch's interpolation taps (host numpy and jnp forms) for every
`F.interpolate`-style resize in segjax."""

from segjax.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    remove_small_boxes,
)
from segjax.ops.masks import paste_masks_in_image
from segjax.ops.matcher import match, sample_balanced
from segjax.ops.nms import batched_nms, nms
from segjax.ops.roi_align import fpn_levels, multiscale_roi_align, roi_align
from segjax.ops.roi_pool import roi_pool

__all__ = [
    "batched_nms", "box_area", "box_cxcywh_to_xyxy", "box_iou", "box_xyxy_to_cxcywh", "clip_boxes",
    "decode_boxes", "encode_boxes", "fpn_levels", "match", "multiscale_roi_align", "nms",
    "paste_masks_in_image", "remove_small_boxes", "roi_align", "roi_pool", "sample_balanced",
]
