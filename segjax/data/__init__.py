"""Datasets and the input pipeline: tfds ArrayRecord sources, decoding, preprocessing, loaders.

Importing this package registers the `digits` tfds builder.
"""

from segjax.data.decode import DecodedSource, decode_image
from segjax.data.digits import Digits, prepare_digits
from segjax.data.pipeline import EvalLoader, Loader
from segjax.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    normalize,
)
from segjax.data.source import DEFAULT_DATA_DIR, make_source, resolve_data_dir

__all__ = [
    "DEFAULT_DATA_DIR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DecodedSource",
    "Digits",
    "EvalLoader",
    "ImagePreprocess",
    "Loader",
    "decode_image",
    "make_source",
    "normalize",
    "prepare_digits",
    "resolve_data_dir",
]
