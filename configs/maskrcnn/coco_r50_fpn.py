r"""Mask R-CNN R50-FPN on a local COCO 2017, torchvision's reference recipe.

COCO must be on local disk (nothing is downloaded); the first run writes it as
tfds ArrayRecord under data_dir (once; ~20 GB for train2017):

  python train.py --config configs/maskrcnn/coco_r50_fpn.py --workdir gs://.../mrcnn_r50 \
      --config.data.data_dir=/data/tfds --config.data.root=/data/coco
  python eval.py --config configs/maskrcnn/coco_r50_fpn.py --workdir ... \
      --config.eval.annotation_file=/data/coco/annotations/instances_val2017.json

Recipe (references/detection, maskrcnn_resnet50_fpn): SGD momentum 0.9, lr 0.02 at
batch 16, weight decay 1e-4, 26 epochs, 1000 linear warmup iterations, random
horizontal flip, min_size 800 / max_size 1333, trainable backbone layers 3.
NOTE: torchvision decays the lr 10x at epochs 16 and 22; segjax.optim offers cosine,
which the reference also supports (--lr-scheduler cosineannealinglr). The reference
initialises the backbone from ImageNet weights: pass them with
--config.init_from.path (a converted checkpoint). Labels are the 80 contiguous
classes (label_key='label'); use label_key='category_id' with num_classes=91 for
torchvision's 91-slot heads (e.g. converted COCO weights).
"""

from configs.common import parse_arg
from configs.maskrcnn.base import coco2017_data, maskrcnn_config
from segjax.models.maskrcnn.backbone import frozen_patterns

COCO_TRAIN_IMAGES = 117_266  # train2017 images with annotations


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = maskrcnn_config("mask_rcnn_r50_fpn", min_size=800, max_size=1333, pad_size=(1344, 1344),
                        max_instances=100)
    c.model.kwargs = {"num_classes": 81, "bn_eps": 1e-5}
    c.batch_size = 16
    c.eval_batch_size = 8
    epochs = 26
    c.total_steps = epochs * COCO_TRAIN_IMAGES // c.batch_size
    coco2017_data(c)
    c.optim.name = "sgd"
    c.optim.lr = 0.02 * c.batch_size / 16
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.schedule = "cosine"
    c.optim.frozen = frozen_patterns(3)
    c.compute_dtype = "float32"
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint.save_every = 2000
    c.init_from.allow_missing = (r"^backbone/fpn/", r"^rpn/", r"^roi_heads/")
    if arg.runlocal:
        c.batch_size = 2
        c.eval_batch_size = 2
        c.total_steps = 10
        c.eval.max_images = 8
        c.eval_every = 10
    return c
