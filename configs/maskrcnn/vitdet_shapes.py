r"""Tiny ViTDet Mask R-CNN on the generated shapes data, on CPU: from MAE or from scratch.

The CPU proof of `pretrain MAE -> fine-tune Mask R-CNN` (two config files):

  # 1. MAE on the same shapes images, labels unused
  python train.py --config configs/mae/shapes.py --workdir workdirs/mae_shapes
  # 2. Mask R-CNN with the tiny ViTDet backbone initialised from it (mae_to_vitdet)
  python train.py --config configs/maskrcnn/vitdet_shapes.py:mae --workdir workdirs/vitdet_shapes_mae \
      --config.init_from.path=workdirs/mae_shapes
  # the same from random init (the baseline of the README table)
  python train.py --config configs/maskrcnn/vitdet_shapes.py:scratch --workdir workdirs/vitdet_shapes_scratch
  python eval.py --config configs/maskrcnn/vitdet_shapes.py:mae --workdir workdirs/vitdet_shapes_mae

Same data, steps, batch and input pipeline as configs/maskrcnn/shapes.py (the tiny
R50-FPN), so the three runs compare backbones and initialisation. Recipe: ViTDet's
(AdamW (0.9, 0.999), weight decay 0.1, layer-wise lr decay 0.7 over the ViT, drop
path 0.1, warmup then x0.1 steps at 88.9% and 96.3% of the run), at this scale's lr;
the scratch run has no layer decay (as the classifier's scratch baseline).
NOTE: no large-scale jitter here (the R50 baseline has none); data.lsj =
{"size": 128, "min_scale": 0.1, "max_scale": 2.0} would add it (vitdet_b_coco.py).
`:runlocal` (with either variant, e.g. `:mae,runlocal`) is a few-minute smoke run;
`:mae,steps=300` shortens the schedule (warmup, decay points and evals follow).
"""

from configs.common import parse_arg
from configs.maskrcnn.base import maskrcnn_config

SHAPES = {"image_size": 128, "num_train": 2000, "num_val": 200, "max_objects": 4, "seed": 0}
# What an MAE encoder does not have (relative position tables, pyramid, heads) and has
# but ViTDet does not use (decoder, mask token, final norm, class token; the pos_embed
# class row is dropped by the mapping's pos_embed transform).
MAE_ALLOW_MISSING = (r"^backbone/net/blocks_\d+/attn/rel_pos_[hw]$", r"^backbone/simfp_", r"^rpn/",
                     r"^roi_heads/")
MAE_ALLOW_UNEXPECTED = (r"^decoder_", r"^mask_token$", r"^norm/", r"^cls_token$", r"^head/", r"^fc_norm/")


def vitdet_finetune(c, total_steps: int) -> None:
    """ViTDet's optimiser (detectron2 projects/ViTDet common/coco_loader_lsj + the
    mask_rcnn_vitdet_b_100ep schedule) over `total_steps`; lr set by the caller."""
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.1
    c.optim.no_decay = (r"pos_embed$",)  # and every <= 1-d param (norms, biases)
    c.optim.layer_decay = 0.7
    c.optim.layer_decay_scope = "backbone/net/"
    c.optim.schedule = "step"
    c.optim.decay_steps = (round(total_steps * 163889 / 184375), round(total_steps * 177546 / 184375))
    c.optim.decay_factor = 0.1


def mae_init(c, path: str) -> None:
    """init_from an MAE encoder (segjax-trained or converted) through `mae_to_vitdet`."""
    c.init_from.path = path
    c.init_from.mapping = "mae_to_vitdet"
    # timm's resample_abs_pos_embed (bicubic, antialiased) when the grids differ
    c.init_from.pos_embed = ("bicubic", True)
    c.init_from.allow_missing = MAE_ALLOW_MISSING
    c.init_from.allow_unexpected = MAE_ALLOW_UNEXPECTED


def get_config(arg=None):
    arg = parse_arg(arg, variants=("mae", "scratch"), runlocal=False, steps=1200)
    c = maskrcnn_config("maskrcnn_vitdet_tiny", min_size=128, max_size=128, pad_size=(128, 128),
                        max_instances=8)
    # the tiny trunk: patch 16, 64 wide, 4 blocks (global 1 and 3), window 4, drop path 0.1
    c.model.kwargs = {"num_classes": 4, "min_size": 128, "max_size": 128}
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = arg.steps
    c.data.kind = "shapes"
    c.data.name = "shapes"
    c.data.shapes = dict(SHAPES)
    c.data.lsj = {}
    vitdet_finetune(c, c.total_steps)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = min(100, arg.steps // 6)
    c.optim.grad_clip_norm = 10.0  # as configs/maskrcnn/shapes.py
    c.log_every = 20
    c.eval_every = max(arg.steps // 2, 1)
    c.checkpoint.save_every = max(arg.steps // 4, 1)
    if arg.variant == "mae":
        mae_init(c, "workdirs/mae_shapes")
    else:
        c.optim.layer_decay = None
    if arg.runlocal:
        c.data.shapes = dict(SHAPES, num_train=200, num_val=40)
        c.total_steps = 100
        vitdet_finetune(c, c.total_steps)
        if arg.variant == "scratch":
            c.optim.layer_decay = None
        c.optim.warmup_steps = 20
        c.eval_every = 100
        c.checkpoint.save_every = 50
        c.log_every = 10
    return c
