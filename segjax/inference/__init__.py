"""Host-side inference APIs (numpy in, numpy out)."""

from segjax.inference.mae_predictor import IMAGENET_MEAN, IMAGENET_STD, MAEPredictor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAEPredictor"]
