r"""MAE ViT-B/16 pretraining on ImageNet-1k, the paper's recipe (He et al. 2022).

ImageNet must already be prepared as ArrayRecord for tensorflow-datasets in
`--config.data.data_dir` (tfds `imagenet2012`).

  python train.py --config configs/mae/vit_b16_imagenet.py --workdir gs://.../mae_b16 \
      --config.data.data_dir=/data/tfds

800 epochs at batch 4096 = 250k steps; 40 warmup epochs; blr 1.5e-4; wd 0.05;
AdamW (0.9, 0.95); normalised-pixel targets; random-resized-crop (0.2, 1) + flip.
"""

from configs.base import base_config
from configs.common import parse_arg

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
    # the architecture: configs/mae/vit_b16_imagenet.py:l16 trains MAE ViT-L/16
    arg = parse_arg(arg, variants=("b16", "l16", "h14"))
    c = base_config()
    c.task = "mae"
    c.model.name = f"mae_vit_{arg.variant}"
    c.model.kwargs = {"norm_pix_loss": True, "mask_ratio": 0.75}
    c.batch_size = 4096
    c.eval_batch_size = 1024
    epochs = 800
    steps_per_epoch = IMAGENET_TRAIN // c.batch_size
    c.total_steps = epochs * steps_per_epoch
    c.optim.base_lr = 1.5e-4
    c.optim.warmup_steps = 40 * steps_per_epoch
    c.optim.frozen = (r"pos_embed$",)
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.random_resized_crop_scale = (0.2, 1.0)
    c.data.hflip = True
    c.compute_dtype = "bfloat16"
    c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    c.log_every = 100
    c.eval_every = 10 * steps_per_epoch
    c.checkpoint.save_every = 1000
    return c
