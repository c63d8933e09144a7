r"""MAE pretraining of a tiny ViT on the generated shapes images (no labels used).

The pretraining half of the CPU ViTDet proof: the encoder matches the backbone of
`maskrcnn_vitdet_tiny` (patch 16, 64 wide, 4 blocks, 4 heads) at the detection
images' 128 px, so `configs/maskrcnn/vitdet_shapes.py:mae` fine-tunes Mask R-CNN from
it through the `mae_to_vitdet` mapping. The images are the train split of the same
shapes dataset (segjax.data.shapes, generated and prepared on first use); the
annotations are never read.

  python train.py --config configs/mae/shapes.py --workdir workdirs/mae_shapes

`:runlocal` is a one-minute smoke run; `:steps=400` shortens the schedule. The recorded run is in benchmarks/README.md.
"""

from configs.base import base_config
from configs.common import parse_arg

SHAPES = {"image_size": 128, "num_train": 2000, "num_val": 200, "max_objects": 4, "seed": 0}


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False, steps=2000)
    c = base_config()
    c.task = "mae"
    c.model.name = "mae_vit_tiny"
    # the ViTDet tiny trunk's shape; decoder: the tiny variant's (32 wide, 2 blocks)
    c.model.kwargs = {"img_size": 128, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 4,
                      "norm_pix_loss": True, "mask_ratio": 0.75}
    c.data.kind = "shapes"
    c.data.shapes = dict(SHAPES)
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.random_resized_crop_scale = (0.2, 1.0)  # MAE's augmentation
    c.data.hflip = True
    c.batch_size = 64
    c.eval_batch_size = 100
    c.total_steps = arg.steps
    c.optim.base_lr = 1.5e-4 * 4   # small model, short schedule (as configs/mae/digits.py)
    c.optim.warmup_steps = min(200, arg.steps // 10)
    c.optim.frozen = (r"pos_embed$",)  # fixed sin-cos tables, as the reference
    c.eval_every = max(arg.steps // 2, 1)
    c.checkpoint.save_every = max(arg.steps // 4, 1)
    if arg.runlocal:
        c.data.shapes = dict(SHAPES, num_train=200, num_val=40)
        c.total_steps = 60
        c.eval_every = 60
        c.checkpoint.save_every = 30
        c.log_every = 10
    return c
