r"""MAE pretraining of a tiny ViT on scikit-learn's handwritten digits (no download).

The README's first command. Digits (8x8, 1497 train images) are upscaled to 32x32
RGB, patch 4 (64 patches, 16 visible at 75% masking), 1500 steps; a recorded run's
time is in benchmarks/README.md.

  python train.py --config configs/mae/digits.py --workdir workdirs/mae_digits

`--config configs/mae/digits.py:runlocal` shrinks it to a one-minute smoke run.
"""

from configs.base import base_config
from configs.common import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = base_config()
    c.task = "mae"
    c.model.name = "mae_vit_tiny"
    c.model.kwargs = {"img_size": 32, "patch_size": 4, "norm_pix_loss": True, "mask_ratio": 0.75}
    c.batch_size = 128
    c.eval_batch_size = 128
    c.total_steps = 1500
    c.optim.base_lr = 1.5e-4 * 4   # small model, short schedule
    c.optim.warmup_steps = 200
    # the sin-cos tables are fixed (requires_grad=False in the reference)
    c.optim.frozen = (r"pos_embed$",)
    c.data.random_resized_crop_scale = (0.6, 1.0)
    c.eval_every = 1000
    c.checkpoint.save_every = 500
    if arg.runlocal:
        c.total_steps = 60
        c.eval_every = 30
        c.checkpoint.save_every = 30
        c.log_every = 10
    return c
