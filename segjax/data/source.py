"""Random-access sources of raw records from ArrayRecord tfds datasets, without TensorFlow.

tfds reads ArrayRecord files through `tfds.data_source` with numpy only (`tfds.load`
needs TensorFlow). Datasets that segjax builds itself (`digits`) are prepared on first
use; any other tfds dataset must already be prepared as ArrayRecord in `data_dir`
(e.g. `tfds build NAME --file_format=array_record` on a machine with TensorFlow).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import tensorflow_datasets as tfds

from segjax.data import digits

DEFAULT_DATA_DIR = "~/tensorflow_datasets"

# Datasets segjax writes itself: name -> prepare(data_dir), idempotent and process-safe.
_PREPARERS: dict[str, Callable[[str], object]] = {"digits": digits.prepare_digits}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """Returns `data_dir` with `~` expanded; None means `~/tensorflow_datasets`.

    NOTE: unlike tfds, the TFDS_DATA_DIR environment variable is not read: library
    code takes its paths from the config.
    """
    return os.path.expanduser(os.fspath(DEFAULT_DATA_DIR if data_dir is None else data_dir))


def make_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    decode_images: bool = False,
) -> Sequence[dict]:
    """Opens split `split` of tfds dataset `name` in `data_dir` for random access.

    Args:
      name: tfds name, optionally with config/version ("digits", "imagenet2012:5.1.0").
      split: tfds split string ("train", "test", "train[:90%]").
      data_dir: root holding `name/version/` (default `~/tensorflow_datasets`).
      decode_images: False (default) leaves top-level `Image` features as encoded
        bytes, so decoding happens in `DecodedSource`, which survives corrupt files;
        True lets tfds decode them to (H, W, C) uint8 arrays (a corrupt file then
        raises inside tfds).

    Returns:
      A sequence (len, [i]) of record dicts.

    Raises:
      FileNotFoundError: the dataset is not prepared in `data_dir`.
      ValueError: it is prepared, but not as ArrayRecord.
    """
    data_dir = resolve_data_dir(data_dir)
    base_name = name.split(":")[0].split("/")[0]
    if base_name in _PREPARERS:
        _PREPARERS[base_name](data_dir)
    how_to = (f"prepare it as ArrayRecord there first, e.g. `tfds build {base_name} "
              f"--data_dir={data_dir} --file_format=array_record` (needs TensorFlow).")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # `from None`: tfds's own message lists every dataset in its catalogue.
        raise FileNotFoundError(
            f"tfds dataset {name!r} was not found in data_dir {data_dir!r}; {how_to}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir {data_dir!r}; {how_to}")
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"tfds dataset {name!r} in data_dir {data_dir!r} is stored as {file_format}, which needs "
            f"TensorFlow to read; {how_to}")
    decoders = None
    if not decode_images:
        decoders = {key: tfds.decode.SkipDecoding() for key, feature in builder.info.features.items()
                    if isinstance(feature, tfds.features.Image)}
    return builder.as_data_source(split=split, decoders=decoders or None)
