r"""SAM ViT-B trained as the paper does, on SA-1B-format data, at scale (TPU pod / GPU node).

  python train.py --config configs/sam/sa1b_vit_b.py --workdir gs://bucket/sam_vit_b \
      --config.data.root=/data/sa1b --config.init_from.path=workdirs/mae_vit_b16

The recipe (Kirillov et al. 2023, appendix "Training algorithm"): AdamW (0.9, 0.999),
weight decay 0.1, linear warmup 250 steps then step decay x0.1 twice (at 2/3 and
26/27 of the run), layer-wise lr decay and drop path in the image encoder, at most 64
masks per image per step (masks over 90% of the image dropped), no augmentation, 11
prompt rounds per mask, the image encoder initialised from MAE (`init_from` through
the `mae_to_sam_encoder` mapping; leave the path empty to start from scratch). The
ViT-B numbers (lr 8e-4, layer decay 0.6, drop path 0.6, weight decay 0.1, 180k steps
at batch 128) are the paper's, appendix A: "To train ViT-B and ViT-L, we use 180k
iterations with batch size 128 ... lr = 8e-4/4e-4, ld = 0.6/0.8, wd = 0.1, and dp =
0.6/0.4 for ViT-B/L"; the decay steps are those of its 90k ViT-H schedule (60k,
86,666) scaled to 180k, which the paper does not state for ViT-B.

Scale switches: `mesh` (data x fsdp: parameters and optimizer state sharded over
`fsdp` devices), `compute_dtype='bfloat16'` (float32 master weights),
`model.kwargs.encoder_remat` (recompute encoder blocks in the backward pass),
`model.kwargs.decoder_remat` (recompute each mask-decoder call: the 11 rounds' decoder
activations grow with masks x rounds and dominate the step's memory at 64 masks).
Data: `data.splits` maps each split to a folder of sa_*.jpg + sa_*.json (or a list of
folders), "{root}" standing for `data.root`. `:runlocal` is a tiny smoke run on the
generated shapes data.
"""

from configs.common import parse_arg
from configs.sam import shapes
from configs.sam.base import sam_config, set_schedule


def get_config(arg=None):
    arg = parse_arg(arg, runlocal=False)
    c = sam_config("sam_vit_b", img_size=1024, max_masks=64, encoder_drop_path_rate=0.6, encoder_remat=True,
                   decoder_remat=True)
    c.data.kind = "sa1b"
    c.data.dataset = "sa1b"
    c.data.splits = {"train": "{root}/train", "val": "{root}/val"}
    c.data.eval_max_masks = 16
    c.compute_dtype = "bfloat16"
    c.mesh = {"data": -1, "fsdp": 8, "model": 1}
    c.batch_size = 128
    c.eval_batch_size = 8
    c.optim.lr = 8e-4
    c.eval.max_images = 500
    set_schedule(c, total_steps=180_000, warmup_steps=250, eval_every=10_000, save_every=2_000, log_every=100)
    shapes.mae_init(c)
    c.optim.layer_decay = 0.6  # the paper's ViT-B value
    c.init_from.path = ""  # a converted MAE ViT-B/16 (mae_pretrain_vit_base.pth)
    if arg.runlocal:
        shapes.run_locally(c)
        c.model.kwargs = dict(c.model.kwargs, encoder_drop_path_rate=0.1, encoder_remat=True)
        c.mesh = {"data": -1, "fsdp": 1, "model": 1}
    return c
