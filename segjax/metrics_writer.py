"""TensorBoard metrics (event files any TensorBoard reads), written by process 0 only."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np


class MetricWriter:
    """Scalars, images and text to TensorBoard event files under `logdir`.

    Uses tensorboardX (no TensorFlow needed). A disabled writer (non-main hosts)
    accepts every call and writes nothing.
    """

    def __init__(self, logdir: str, enabled: bool = True):
        self.enabled = enabled
        self._w = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._w = SummaryWriter(logdir, flush_secs=10)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._w:
            self._w.add_scalar(tag, float(value), step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.scalar(k, v, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: (H, W, 3) uint8."""
        if self._w:
            self._w.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._w:
            self._w.add_text(tag, text, step)

    def close(self) -> None:
        if self._w:
            self._w.flush()
            self._w.close()
