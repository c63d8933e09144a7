"""Segment Anything in linen: `Sam` and its parts, named after the official state dict."""

from segjax.models.sam.image_encoder import ImageEncoderViT
from segjax.models.sam.mask_decoder import MaskDecoder
from segjax.models.sam.prompt_encoder import ABSENT, PromptEncoder
from segjax.models.sam.sam import Sam
from segjax.models.sam.transformer import TwoWayTransformer

__all__ = ["ABSENT", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam", "TwoWayTransformer"]
