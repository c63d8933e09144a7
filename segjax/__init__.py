"""segjax: ViT-MAE, Segment Anything and Mask R-CNN in JAX/Flax."""

__version__ = "0.1.0"
