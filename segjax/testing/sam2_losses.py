"""The reference SAM training losses: `training/loss_fns.py` of the `sam2` 1.1.0 source
distribution (MultiStepMultiMasksAndIous, sigmoid_focal_loss, dice_loss, iou_loss),
for the loss parity tests and the training benchmark.

Install (CI does, see .ci/run; the flags keep it on the pinned torch and skip its CUDA
extension):
  SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps --no-binary sam2 sam2==1.1.0

`loss_fns` imports `training.trainer` for one string constant (CORE_LOSS_KEY), and the
trainer imports hydra, iopath, tensordict and tensorboard, none of which the losses
use; `load()` runs `loss_fns` with a stand-in `training.trainer` that holds only that
constant (the value of the real one), and leaves sys.modules as it found it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import ModuleType

CORE_LOSS_KEY = "core_loss"  # training/trainer.py of sam2 1.1.0


def load() -> ModuleType:
    """The reference `training.loss_fns` module (ImportError when sam2 is absent)."""
    from segjax.testing import importorskip

    importorskip("training.utils.distributed")  # sam2's `training` package (torch only)
    spec = importlib.util.find_spec("training.loss_fns")
    if spec is None:
        raise ImportError("training.loss_fns not found: install the sam2 1.1.0 sdist (see this module)")
    stub = types.ModuleType("training.trainer")
    stub.CORE_LOSS_KEY = CORE_LOSS_KEY
    saved = sys.modules.get("training.trainer")
    sys.modules["training.trainer"] = stub
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["training.trainer"]
        else:
            sys.modules["training.trainer"] = saved
    return module
