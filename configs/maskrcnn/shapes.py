r"""Mask R-CNN (tiny) trained from scratch on the generated `shapes` dataset, on CPU.

No download: 2000 train / 200 val 128x128 images of circles, squares and triangles
(segjax.data.shapes), generated and prepared as tfds on first use.

  python train.py --config configs/maskrcnn/shapes.py --workdir workdirs/maskrcnn_shapes
  python eval.py --config configs/maskrcnn/shapes.py --workdir workdirs/maskrcnn_shapes

eval.py writes COCO box/mask AP, workdir/eval/detections_step*.json (COCO results,
RLE masks) and workdir/images/maskrcnn_step*.png (detections | ground truth).
`--config configs/maskrcnn/shapes.py:runlocal` is a few-minute smoke run.

The AP and time of a recorded run of this config are in benchmarks/README.md.
"""

from configs.common import parse_arg
from configs.maskrcnn.base import maskrcnn_config
from segjax.models.maskrcnn.backbone import frozen_patterns


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = maskrcnn_config("mask_rcnn_tiny", min_size=128, max_size=128, pad_size=(128, 128), max_instances=8)
    # 3 shape classes + background; the tiny variant's anchors (8..128 px) suit 128 px images.
    c.model.kwargs = {"num_classes": 4, "min_size": 128, "max_size": 128}
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 1200
    c.data.kind = "shapes"
    c.data.name = "shapes"
    c.data.shapes = {"image_size": 128, "num_train": 2000, "num_val": 200, "max_objects": 4, "seed": 0}
    # From scratch (no ImageNet backbone): AdamW is the stable choice at this scale.
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.b2 = 0.999
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 100
    c.optim.grad_clip_norm = 10.0
    c.optim.frozen = frozen_patterns(5)  # BatchNorm tensors only: every ResNet stage trains
    c.log_every = 20
    c.eval_every = 600
    c.checkpoint.save_every = 300
    if arg.runlocal:
        c.data.shapes = {"image_size": 128, "num_train": 200, "num_val": 40, "max_objects": 4, "seed": 0}
        c.total_steps = 100
        c.optim.warmup_steps = 20
        c.eval_every = 100
        c.checkpoint.save_every = 50
        c.log_every = 10
    return c
