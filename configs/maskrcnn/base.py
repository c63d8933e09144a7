"""Fields every Mask R-CNN config has: the task, the detection batch and COCO evaluation.

Variants (`coco_r50_fpn.py`, `shapes.py`) start from `maskrcnn_config(...)` and set
their model, data source and recipe.
"""

import ml_collections

from configs.base import base_config


def maskrcnn_config(model: str, min_size: int, max_size: int, pad_size: tuple[int, int],
                    max_instances: int) -> ml_collections.ConfigDict:
    """base_config() + the Mask R-CNN task: `model` from the registry, images resized by
    torchvision's rule (min_size / max_size) and padded to `pad_size`, at most
    `max_instances` objects per image, COCO AP through pycocotools."""
    c = base_config()
    c.task = "maskrcnn"
    c.model.name = model
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.min_size = min_size
    c.data.max_size = max_size
    c.data.pad_size = pad_size
    c.data.max_instances = max_instances
    c.data.hflip = True
    c.data.label_key = "label"
    c.eval = {"max_images": 0, "num_draw": 8, "backend": "pycocotools", "annotation_file": "",
              "score_threshold": 0.5}
    return c


def coco2017_data(c: ml_collections.ConfigDict) -> None:
    """A local COCO 2017 as the data: `data.root` holds train2017/, val2017/ and
    annotations/ ("{root}" in the split paths stands for it, so one flag points at
    another copy of COCO); prepared as tfds `coco2017` in data_dir on first use."""
    c.data.kind = "coco"
    c.data.name = "coco"
    c.data.dataset = "coco2017"
    c.data.root = "/data/coco"
    c.data.splits = {
        "train": ("{root}/train2017", "{root}/annotations/instances_train2017.json"),
        "val": ("{root}/val2017", "{root}/annotations/instances_val2017.json")}
