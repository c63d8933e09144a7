r"""ViTDet-B Mask R-CNN on a local COCO 2017 from an MAE ViT-B/16, the paper's recipe.

Li, Mao, Girshick, He 2022; detectron2 projects/ViTDet `mask_rcnn_vitdet_b_100ep`
(51.6 box / 45.9 mask AP). COCO must be on local disk (nothing is downloaded); the
MAE encoder is a segjax checkpoint, e.g. the official mae_pretrain_vit_base.pth
converted with `python -m segjax.convert mae mae_pretrain_vit_base.pth workdirs/mae_vit_b16`:

  python train.py --config configs/maskrcnn/vitdet_b_coco.py --workdir gs://.../vitdet_b \
      --config.data.data_dir=/data/tfds --config.data.root=/data/coco \
      --config.init_from.path=workdirs/mae_vit_b16
  python eval.py --config configs/maskrcnn/vitdet_b_coco.py --workdir ... \
      --config.eval.annotation_file=/data/coco/annotations/instances_val2017.json

Recipe: 1024 x 1024 large-scale jitter (scale 0.1-2.0, flip) for training, longest
side 1024 for evaluation; AdamW (0.9, 0.999), weight decay 0.1, lr 1e-4 x batch / 64,
layer-wise lr decay 0.7 over the ViT (detectron2 get_vit_lr_decay_rate: pyramid and
heads at x1), drop path 0.1, 250 warmup iterations then x0.1 at 163889 and 177546 of
184375 (100 epochs at batch 64); bf16 compute, float32 master weights; parameters and
optimizer state sharded over `mesh.fsdp` devices (FSDP; 8 here, e.g. one 8-chip host:
set it to the devices you have); `model.kwargs.vit_remat` recomputes each ViT block in
the backward pass (memory for compute).
The MAE encoder lands on the backbone through the `mae_to_vitdet` mapping
(segjax/convert/init_maps.py): the 14 x 14 position table of the 224 px pretraining
is kept as the backbone's pretraining grid and resized bicubically to 64 x 64 on every
forward (detectron2's get_abs_pos, no antialias); `init_from.pos_embed` (timm's
antialiased bicubic) applies only when the grids differ (e.g. with
--config.model.kwargs.vit_pretrain_img_size=1024, which resizes once at init).
NOTE deviations from detectron2: warmup starts from 0 (detectron2: factor 0.001);
biases are not weight-decayed (every <= 1-d param is exempt; detectron2 decays them);
the heads keep torchvision's semantics (models/maskrcnn/__init__.py).
`:runlocal` is a tiny smoke run of the pipeline (batch 2, 10 steps, no FSDP).
"""

from configs.common import parse_arg
from configs.maskrcnn.base import coco2017_data, maskrcnn_config
from configs.maskrcnn.vitdet_shapes import mae_init, vitdet_finetune

COCO_TRAIN_IMAGES = 117_266  # train2017 images with annotations
PAPER_ITERS, PAPER_BATCH = 184_375, 64


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = maskrcnn_config("maskrcnn_vitdet_b", min_size=1024, max_size=1024, pad_size=(1024, 1024),
                        max_instances=100)
    c.model.kwargs = {"num_classes": 81, "vit_drop_path_rate": 0.1, "vit_remat": True}
    c.batch_size = PAPER_BATCH
    c.eval_batch_size = 8
    c.total_steps = PAPER_ITERS
    coco2017_data(c)
    c.data.lsj = {"size": 1024, "min_scale": 0.1, "max_scale": 2.0}
    vitdet_finetune(c, c.total_steps)
    c.optim.lr = 1e-4 * c.batch_size / 64
    c.optim.warmup_steps = 250
    c.compute_dtype = "bfloat16"
    c.mesh = {"data": -1, "fsdp": 8, "model": 1}
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint.save_every = 5_000
    mae_init(c, "workdirs/mae_vit_b16")
    if arg.runlocal:
        c.batch_size = 2
        c.eval_batch_size = 2
        c.total_steps = 10
        vitdet_finetune(c, c.total_steps)
        c.optim.warmup_steps = 2
        c.mesh = {"data": -1, "fsdp": 1, "model": 1}
        c.eval.max_images = 8
        c.eval_every = 10
    return c
