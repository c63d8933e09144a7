"""Fields every segjax training config has; task configs start from `base_config()`."""

import ml_collections

from segjax.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0
    c.batch_size = 128          # global batch, across all hosts and devices
    c.eval_batch_size = 128
    c.total_steps = 1000
    c.log_every = 25
    c.eval_every = 500
    c.compute_dtype = "float32"  # 'bfloat16': bf16 compute, float32 master weights

    c.model = ml_collections.ConfigDict({"name": "", "kwargs": {}})
    c.data = ml_collections.ConfigDict({
        # data_dir "" = ~/tensorflow_datasets
        # tfds split strings, e.g. train_split="train[:10%]" for a low-label run
        "name": "digits", "data_dir": "", "train_split": "train", "eval_split": "test",
        "random_resized_crop_scale": ml_collections.FieldReference(None, field_type=tuple),
        "hflip": False})

    c.optim = ml_collections.ConfigDict({
        "name": "adamw", "lr": ml_collections.FieldReference(None, field_type=float),
        "base_lr": 1.5e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.05,
        "momentum": 0.9, "warmup_steps": 100, "schedule": "cosine", "min_lr": 0.0,
        "layer_decay": ml_collections.FieldReference(None, field_type=float),
        "frozen": (), "no_decay": (), "grad_clip_norm": ml_collections.FieldReference(None, field_type=float)})

    # Mesh: data parallel over all devices by default; set e.g. {'data': 2, 'fsdp': 4}
    # to shard parameters and optimizer state (FSDP) over 4 devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    c.axis_rules = tuple(DEFAULT_RULES)

    c.checkpoint = ml_collections.ConfigDict({"save_every": 500, "keep": 3, "async_save": True})
    # Fine-tuning: params-only initialisation from a segjax checkpoint (a training
    # workdir or a converted checkpoint directory). Regexes over '/'-joined param
    # paths say what may be missing from it and what in it may go unused.
    c.init_from = ml_collections.ConfigDict({"path": "", "allow_missing": (), "allow_unexpected": ()})
    return c
