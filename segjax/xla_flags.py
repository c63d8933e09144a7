"""XLA:CPU flag presets, applied through `XLA_FLAGS` before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend is created, so `set_xla_flags` must
run before the first JAX computation (importing jax is fine). Entry points
(`train.py`, `benchmarks/`) call it first; library code never does.

Presets (jaxlib 0.10.x flag names; a jaxlib that does not know a flag aborts at
backend start with "Unknown flag", which is why the names are kept in one place):
  none     jaxlib defaults (dots and some reductions as YNNPACK fusions).
  default  the preset `benchmarks/mae_train_step.py` measured fastest for the
           MAE/ViT train step on a 2-core AVX2 CPU; see the benchmark's docstring.
  eigen    YNNPACK off: every dot goes to Eigen's contraction.
  onednn   YNNPACK off, dots as oneDNN matmul fusions (the kernels torch's
           `nn.Linear` uses on x86).
"""

from __future__ import annotations

import os
import sys

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "eigen": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "onednn": ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_onednn=true",
               "--xla_cpu_experimental_onednn_fusion_type=dot"),
    "onednn_eltwise": ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_onednn=true",
                       "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise"),
    "ynn_all": ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce,eltwise",),
}
PRESETS["default"] = PRESETS["none"]


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def set_xla_flags(preset: str = "default") -> str:
    """Appends the preset's flags to `XLA_FLAGS` (a flag already set there wins).

    Returns the resulting `XLA_FLAGS`. Raises if a JAX backend already started, since
    the flags would then be silently ignored.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown XLA flag preset {preset!r}; choose from {sorted(PRESETS)}")
    if _backend_started():
        raise RuntimeError("set_xla_flags must run before the first JAX computation")
    current = os.environ.get("XLA_FLAGS", "").split()
    names = {f.split("=", 1)[0] for f in current}
    extra = [f for f in PRESETS[preset] if f.split("=", 1)[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join(current + extra)
    return os.environ["XLA_FLAGS"]
