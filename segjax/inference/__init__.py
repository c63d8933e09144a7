"""Host-side inference APIs (numpy in, numpy out)."""

from segjax.inference.mae_predictor import IMAGENET_MEAN, IMAGENET_STD, MAEPredictor
from segjax.inference.maskrcnn_predictor import MaskRCNNPredictor
from segjax.inference.sam.amg import SamAutomaticMaskGenerator
from segjax.inference.sam.predictor import SamPredictor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAEPredictor", "MaskRCNNPredictor", "SamAutomaticMaskGenerator",
           "SamPredictor"]
