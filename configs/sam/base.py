"""Fields every SAM training config has: the task, SAM's batch, the prompt simulation,
the interactive evaluation.

Variants (`shapes.py`, `finetune.py`, `sa1b_vit_b.py`) start from `sam_config(...)` and
set their data and recipe. The task reads:
  config.sam   the recipe of the paper's appendix: num_rounds (11 prompt rounds per
               mask), num_no_point_rounds (2 of them add no point), box_prob (first
               prompt a box with this probability, else one point), box_noise_std
               (x side length), box_noise_max (px), focal_weight : dice_weight (20 : 1),
               iou_weight (1); cached_embeddings (decoder-only training on image
               embeddings computed once per image, see segjax/data/embedding_cache.py)
               and embedding_cache_dir ('' = host memory only).
  config.data  see segjax/data/sam.py (kind, img_size, mask_size, max_masks, ...).
  config.eval  max_images (0 = all), max_clicks (NoC cap, 20), num_draw pictures.
"""

import ml_collections

from configs.base import base_config


def sam_config(model: str, img_size: int, max_masks: int, **model_kwargs) -> ml_collections.ConfigDict:
    """base_config() + the SAM task: registry `model` at input side `img_size` (the data
    is resized and padded to it), at most `max_masks` masks per image per step."""
    c = base_config()
    c.task = "sam"
    c.model.name = model
    c.model.kwargs = {"img_size": img_size, **model_kwargs}
    c.sam = ml_collections.ConfigDict({
        "num_rounds": 11, "num_no_point_rounds": 2, "box_prob": 0.5, "box_noise_std": 0.1,
        "box_noise_max": 20.0, "focal_weight": 20.0, "dice_weight": 1.0, "iou_weight": 1.0,
        "cached_embeddings": False, "embedding_cache_dir": ""})
    c.data.kind = "shapes"
    c.data.name = "sam"
    c.data.dataset = ""
    c.data.root = ""
    c.data.splits = {}
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.img_size = img_size
    c.data.mask_size = 0            # 0: img_size / 4, the decoder's low-res logits
    c.data.max_masks = max_masks
    c.data.eval_max_masks = 0       # 0: max_masks
    c.data.max_area_fraction = 0.9  # the paper drops masks covering more of the image
    c.data.hflip = False            # the paper uses no data augmentation
    c.eval = {"max_images": 0, "max_clicks": 20, "num_draw": 4}
    # SAM's recipe: AdamW (0.9, 0.999), wd 0.1, warmup 250 then step decay x0.1 twice
    c.optim.name = "adamw"
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.1
    c.optim.schedule = "step"
    c.optim.warmup_steps = 250
    c.optim.decay_steps = ()        # each config sets them: `decay_at(total_steps)`
    c.optim.decay_factor = 0.1
    c.optim.layer_decay_scope = "image_encoder/"
    # position tables and rel-pos tables are not decayed (as the norms and biases)
    c.optim.no_decay = (r"pos_embed$", r"rel_pos_[hw]$")
    # the prompt encoder's random-Fourier matrix is a fixed buffer in the reference
    # (segment_anything and sam2 `register_buffer`: never trained, never decayed)
    c.optim.frozen = FROZEN
    return c


FROZEN = (r"positional_encoding_gaussian_matrix$",)


def decay_at(total_steps: int) -> tuple[int, int]:
    """The paper's step-decay boundaries (60k and 86,666 of 90k) scaled to a run."""
    return (round(total_steps * 2 / 3), round(total_steps * 26 / 27))


def set_schedule(c, total_steps: int, warmup_steps: int, eval_every: int, save_every: int,
                 log_every: int) -> None:
    """A run's length: the step decay at `decay_at(total_steps)` after the warmup, and
    how often it evaluates, saves and logs."""
    c.total_steps = total_steps
    c.optim.warmup_steps = warmup_steps
    c.optim.decay_steps = decay_at(total_steps)
    c.eval_every = eval_every
    c.checkpoint.save_every = save_every
    c.log_every = log_every
