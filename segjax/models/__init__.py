"""Model registry: one plain dict `name -> builder(**overrides) -> nn.Module`.

Each builder's keyword arguments are the module's fields; checkpoints record the
builder name and the overrides, so `build(name, **kwargs)` rebuilds the same model.
"""

from __future__ import annotations

import flax.linen as nn

from segjax.models.classifier import VisionTransformer
from segjax.models.mae import MAE
from segjax.models.maskrcnn import VARIANTS as _MASK_RCNN
from segjax.models.maskrcnn import MaskRCNN
from segjax.models.sam import Sam

_VIT = {
    # name: (patch, width, depth, heads)
    "tiny": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "b16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "l16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "h14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
_MAE_DECODER = {
    "tiny": dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, img_size=32),
    # He et al.: 512 wide, 8 blocks, 16 heads for B, L and H
    "b16": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "l16": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "h14": dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def _tuples(x):
    """Nested lists -> tuples: checkpoint meta is JSON (tuples come back as lists), and
    module fields must stay hashable."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _builder(cls, **defaults):
    def build(**overrides) -> nn.Module:
        return cls(**{k: _tuples(v) for k, v in {**defaults, **overrides}.items()})

    build.defaults = defaults
    return build


MODELS = {}
for _name, _vit in _VIT.items():
    _img = {"img_size": 32} if _name == "tiny" else {}
    MODELS[f"mae_vit_{_name}"] = _builder(MAE, **_vit, **_MAE_DECODER[_name])
    MODELS[f"vit_{_name}"] = _builder(VisionTransformer, **_vit, **_img)

# Segment Anything (segment_anything.build_sam); tiny: a seconds-fast test variant that
# segment_anything's classes can build too.
_SAM = {
    "b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
              encoder_global_attn_indexes=(2, 5, 8, 11)),
    "l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
              encoder_global_attn_indexes=(5, 11, 17, 23)),
    "h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
              encoder_global_attn_indexes=(7, 15, 23, 31)),
    "tiny": dict(img_size=256, pretrain_img_size=256, encoder_embed_dim=64, encoder_depth=4,
                 encoder_num_heads=2, encoder_global_attn_indexes=(1, 3), window_size=4,
                 prompt_embed_dim=32, decoder_mlp_dim=64, iou_head_hidden_dim=32),
}
for _name, _sam in _SAM.items():
    MODELS[f"sam_vit_{_name}"] = _builder(Sam, **_sam)

# Mask R-CNN (torchvision maskrcnn_resnet50_fpn / _v2) and a tiny CPU variant.
for _name, _kw in _MASK_RCNN.items():
    MODELS[_name] = _builder(MaskRCNN, **_kw)


def build(name: str, **overrides) -> nn.Module:
    """Builds a registered model; unknown names and fields fail with the valid choices."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    builder = MODELS[name]
    fields = set(builder(**{}).__dataclass_fields__) - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"model {name!r} has no field(s) {sorted(unknown)}; fields: {sorted(fields)}")
    return builder(**overrides)


__all__ = ["MODELS", "build", "MAE", "MaskRCNN", "Sam", "VisionTransformer"]
