"""Host-side inference APIs (numpy in, numpy out)."""

from segjax.inference.mae_predictor import IMAGENET_MEAN, IMAGENET_STD, MAEPredictor
from segjax.inference.maskrcnn_predictor import MaskRCNNPredictor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAEPredictor", "MaskRCNNPredictor"]
