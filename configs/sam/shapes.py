r"""A tiny SAM trained from scratch on the generated `shapes` data, on CPU (the proof
that SAM learns here: minutes, not hours).

No download: 128 x 128 images of 1-4 circles, squares and triangles
(segjax.data.shapes), each object one mask. The model is `sam_vit_tiny` at 128 px (an
8 x 8 embedding grid, 32 x 32 low-res masks), all 11 prompt rounds per mask.

  python train.py --config configs/sam/shapes.py --workdir workdirs/sam_shapes
  python eval.py --config configs/sam/shapes.py --workdir workdirs/sam_shapes
  # the image encoder from an MAE pretrained on the same (unlabeled) images:
  python train.py --config configs/mae/shapes.py --workdir workdirs/mae_shapes
  python train.py --config configs/sam/shapes.py:mae_init --workdir workdirs/sam_shapes_mae \
      --config.init_from.path=workdirs/mae_shapes

eval.py reports mIoU after 1 / 3 / 5 clicks, NoC@85 / NoC@90 and box-prompt mIoU on
the val split and writes workdir/images/sam_step*.png. `:runlocal` is a one-minute
smoke run. The recorded numbers (random vs MAE init) are in the README.
"""

from configs.common import parse_arg
from configs.sam.base import sam_config, set_schedule

SHAPES = {"image_size": 128, "num_train": 2000, "num_val": 200, "max_objects": 4, "seed": 0}
# sam_vit_tiny at 128 px (the position table for an 8 x 8 grid, windows of 4) with the
# encoder of configs/mae/shapes.py (64 wide, 4 blocks, 4 heads, patch 16), so `:mae_init`
# starts from that MAE
MODEL = {"pretrain_img_size": 128, "window_size": 4, "encoder_num_heads": 4}


def get_config(arg=None):
    arg = parse_arg(arg, variants=("scratch", "mae_init"), runlocal=False)
    c = sam_config("sam_vit_tiny", img_size=128, max_masks=4, **MODEL)
    c.data.shapes = dict(SHAPES)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.optim.lr = 1e-3
    c.optim.grad_clip_norm = 1.0
    c.eval.max_images = 100
    # every run first sits on an all-background plateau (focal : dice 20 : 1, ~4%
    # foreground) for ~100-250 steps: 1000 steps (README: the numbers at steps 500, 1000)
    set_schedule(c, total_steps=1000, warmup_steps=50, eval_every=500, save_every=250, log_every=50)
    if arg.variant == "mae_init":
        mae_init(c)
        c.init_from.path = "workdirs/mae_shapes"
    if arg.runlocal:
        c.data.shapes = {**SHAPES, "num_train": 64, "num_val": 16}
        c.eval.max_images = 8
        set_schedule(c, total_steps=20, warmup_steps=5, eval_every=20, save_every=10, log_every=5)
    return c


def run_locally(c) -> None:
    """`:runlocal` of the big configs: this file's tiny model, data and short run."""
    local = get_config("runlocal")
    for key in ("model", "data", "batch_size", "eval_batch_size", "total_steps", "eval", "eval_every",
                "log_every", "checkpoint"):
        c[key] = local[key]
    c.optim.warmup_steps = local.optim.warmup_steps
    c.optim.decay_steps = local.optim.decay_steps


def mae_init(c) -> None:
    """The image encoder's ViT from an MAE checkpoint (`init_from.path`) through the
    declared `mae_to_sam_encoder` mapping (segjax/convert/init_maps.py: position table
    resized, class token dropped); the rest (relative position tables, neck, prompt
    encoder, mask decoder) from scratch. The recipe stays the one of random init (the
    comparison in the README changes only the initialisation); the ViT-B configs add
    layer-wise lr decay."""
    c.init_from.mapping = "mae_to_sam_encoder"
    c.init_from.allow_missing = (r"^image_encoder/neck_", r"/rel_pos_[hw]$", r"^prompt_encoder/",
                                 r"^mask_decoder/")
    c.init_from.allow_unexpected = (r"^decoder_", r"^mask_token$", r"^norm/", r"^cls_token$")
