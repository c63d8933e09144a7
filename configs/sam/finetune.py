r"""Fine-tune a converted official SAM on your own masks (COCO-format or SA-1B-format).

Convert the official checkpoint once, point the config at your data, pick a variant:

  python -m segjax.convert sam sam_vit_b_01ec64.pth workdirs/sam_vit_b
  # whole model (image encoder with layer-wise lr decay and drop path)
  python train.py --config configs/sam/finetune.py:full --workdir workdirs/sam_ft \
      --config.init_from.path=workdirs/sam_vit_b --config.data.root=/data/my_coco \
      --config.data.dataset=my_coco
  # decoder only: the image encoder frozen; its embeddings are computed once per image
  # (cached in config.sam.embedding_cache_dir) and the step never runs it
  python train.py --config configs/sam/finetune.py:decoder --workdir workdirs/sam_dec \
      --config.init_from.path=workdirs/sam_vit_b --config.data.root=/data/my_coco ...
  # image encoder from an MAE checkpoint (e.g. a converted mae_pretrain_vit_base.pth),
  # prompt encoder and mask decoder from scratch
  python train.py --config configs/sam/finetune.py:mae_init --workdir workdirs/sam_mae \
      --config.init_from.path=workdirs/mae_vit_b16 --config.data.root=/data/my_coco ...

Data: `data.kind='coco'` (default) reads {root}/train2017 + annotations/
instances_train2017.json (and val), every instance a class-agnostic mask; set
`data.kind=sa1b` and `data.splits` for SA-1B-format folders (sa_*.jpg + sa_*.json).
`:runlocal` swaps in the tiny model and the generated shapes data (a smoke run).
"""

from configs.common import parse_arg
from configs.sam import shapes
from configs.sam.base import sam_config, set_schedule


def get_config(arg=None):
    arg = parse_arg(arg, variants=("full", "decoder", "mae_init"), runlocal=False)
    # decoder_remat: the 11 rounds x 16 masks of decoder activations would dominate memory
    c = sam_config("sam_vit_b", img_size=1024, max_masks=16, decoder_remat=True)
    c.data.kind = "coco"
    c.data.dataset = "my_coco"
    c.data.splits = {"train": ("{root}/train2017", "{root}/annotations/instances_train2017.json"),
                     "val": ("{root}/val2017", "{root}/annotations/instances_val2017.json")}
    c.batch_size = 8
    c.eval_batch_size = 1
    c.eval.max_images = 200
    set_schedule(c, total_steps=3000, warmup_steps=250, eval_every=1000, save_every=500, log_every=20)
    c.init_from.path = "workdirs/sam_vit_b"  # a converted official SAM (see above)
    if arg.variant == "full":
        c.model.kwargs["encoder_drop_path_rate"] = 0.1
        c.model.kwargs["encoder_remat"] = True
        c.optim.lr = 1e-5
        c.optim.layer_decay = 0.8
    elif arg.variant == "decoder":
        c.optim.lr = 1e-4
        c.optim.frozen = (*c.optim.frozen, r"^image_encoder/")
        c.sam.cached_embeddings = True
        c.sam.embedding_cache_dir = "~/.cache/segjax/sam_embeddings"
        c.batch_size = 32
    else:  # mae_init: the paper's recipe (ViT-B numbers) on your data
        shapes.mae_init(c)
        c.init_from.path = "workdirs/mae_vit_b16"
        c.model.kwargs["encoder_drop_path_rate"] = 0.1
        c.model.kwargs["encoder_remat"] = True
        c.optim.lr = 8e-4
        c.optim.layer_decay = 0.6  # the paper's ViT-B value
        set_schedule(c, total_steps=20000, warmup_steps=250, eval_every=2000, save_every=1000, log_every=20)
    if arg.runlocal:
        shapes.run_locally(c)
    return c
