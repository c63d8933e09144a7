"""Segment Anything on the host: predictor, automatic mask generator, CLI and helpers."""

from segjax.inference.sam.amg import SamAutomaticMaskGenerator
from segjax.inference.sam.predictor import SamImage, SamInputError, SamPredictor

__all__ = ["SamAutomaticMaskGenerator", "SamImage", "SamInputError", "SamPredictor"]
