r"""Fine-tune a tiny ViT classifier on digits, from MAE pretraining or from scratch.

  # from the MAE checkpoint of configs/mae/digits.py (or a converted one)
  python train.py --config configs/classification/digits_finetune.py \
      --workdir workdirs/digits_ft --config.init_from.path=workdirs/mae_digits
  # the same run from random init (the baseline the README compares against)
  python train.py --config configs/classification/digits_finetune.py:scratch \
      --workdir workdirs/digits_scratch
  # linear probe: only the head (and its norm) is trained
  python train.py --config configs/classification/digits_finetune.py:linear_probe \
      --workdir workdirs/digits_probe --config.init_from.path=workdirs/mae_digits

MAE fine-tuning recipe (scaled down): AdamW, layer decay 0.75, drop path 0.1,
warmup + cosine, global-pool head, label smoothing 0.1.
"""

from configs.base import base_config
from configs.common import parse_arg


def get_config(arg=None):
    mode = parse_arg(arg, variants=("finetune", "scratch", "linear_probe")).variant
    c = base_config()
    c.task = "classification"
    c.model.name = "vit_tiny"
    c.model.kwargs = {"num_classes": 10, "img_size": 32, "patch_size": 4, "global_pool": True,
                      "drop_path_rate": 0.1}
    c.label_smoothing = 0.1
    c.batch_size = 128
    c.eval_batch_size = 100
    c.total_steps = 600
    c.optim.base_lr = 1e-3
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = 0.75
    c.optim.warmup_steps = 60
    c.optim.no_decay = (r"pos_embed$", r"cls_token$")
    c.data.random_resized_crop_scale = (0.8, 1.0)
    c.eval_every = 200
    c.checkpoint.save_every = 200
    # What an MAE checkpoint lacks (the new head) and has but the classifier does
    # not use (decoder, mask token, the encoder's final norm replaced by fc_norm).
    c.init_from.allow_missing = (r"^head/", r"^fc_norm/")
    c.init_from.allow_unexpected = (r"^decoder_", r"^mask_token$", r"^norm/")
    c.init_from.path = "workdirs/mae_digits"
    if mode == "scratch":
        c.init_from.path = ""
        c.optim.layer_decay = None
    if mode == "linear_probe":
        c.model.kwargs["drop_path_rate"] = 0.0
        c.optim.layer_decay = None
        c.optim.weight_decay = 0.0
        # NOTE: the paper probes with LARS at batch 16384 after a BatchNorm; at this
        # scale plain AdamW on the frozen features is the stable choice.
        c.optim.base_lr = 1e-2
        c.optim.frozen = (r"^(?!head/|fc_norm/).*",)
    return c
