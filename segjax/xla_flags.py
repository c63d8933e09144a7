"""Process setup for XLA:CPU: `XLA_FLAGS` presets and host-memory reuse.

Both must happen before JAX starts its backend (the first computation or device
query; importing jax is fine), so only an entry point can call `setup_cpu()`, first
thing; library code never does. The CPU benchmarks (`benchmarks/mae_train_step.py`,
`mask_rcnn.py`, `sam.py`) do. `train.py` and `eval.py` do not: the malloc settings
are process-wide and trade memory for speed (one arena serialises the input
pipeline's threads' allocations, and RSS never shrinks after a peak), they only pay
off for XLA:CPU's large temporary buffers (on GPU/TPU hosts they buy nothing), and the
default XLA preset is empty. A CPU training run that wants them calls `setup_cpu()`
before `train_loop.train` in its own launcher.

Host memory: XLA:CPU allocates each executable's temporary buffer (about 1.2 GB for
an MAE ViT-B/16 train step at batch 8) with `posix_memalign` on a worker thread, and
glibc serves blocks that large with a fresh `mmap` and returns them with `munmap`,
so every step page-faults the whole buffer in again: 1.2 GB of faults and ~1 s of
kernel time per step on 2 cores. `reuse_host_memory()` makes glibc keep freed memory
(one arena, no mmap for large blocks, no trimming), which takes the faults to zero
after the first step. Peak RSS is unchanged; RSS no longer shrinks after a peak.

XLA flag presets (jaxlib 0.10.x names; a jaxlib that does not know a flag aborts at
backend start with "Unknown flag", which is why they live in one place). Measured
with `benchmarks/mae_train_step.py --xla-preset a,b,...` on a 2-core AVX2 EPYC:
  default  = none: YNNPACK dots/convolutions/reductions were the fastest choice on
           2 threads; the alternatives are kept for re-measuring on other machines.
  eigen    YNNPACK off, every dot in Eigen: 5-10% slower.
  onednn   YNNPACK off, dots as oneDNN matmuls: faster on 1 thread (~5%), slower
           on 2 (~8%).
  ynn_noreduce  YNNPACK dots but XLA's own reductions: cheaper LayerNorms, but
           slower overall in our runs.
  noreduce the default YNNPACK fusions less `reduce` (dots and their epilogues
           stay in YNNPACK): avoids the reduce-fusion miscompile of jaxlib 0.10.2
           recorded in benchmarks/README.md (`vitdet.py`, fault 1: a broadcast
           product summed over its last axis), but the ViT backbone's softmax
           reductions then run as XLA loops: much slower there.
"""

from __future__ import annotations

import ctypes
import os
import sys

PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "eigen": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "onednn": ("--xla_cpu_experimental_ynn_fusion_type=", "--xla_cpu_use_onednn=true",
               "--xla_cpu_experimental_onednn_fusion_type=dot"),
    "ynn_noreduce": ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution",),
    "noreduce": ("--xla_cpu_experimental_ynn_fusion_type=-reduce",),
}
PRESETS["default"] = PRESETS["none"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


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


def reuse_host_memory() -> bool:
    """Makes glibc malloc keep and reuse freed memory instead of unmapping it.

    One arena for all threads (a thread arena would still `mmap` blocks beyond its
    64 MB heap), no `mmap` for large blocks, and no trimming of the heap top below
    2 GiB. Must run before JAX starts its threads. Returns False (and does nothing)
    where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if _backend_started():
        raise RuntimeError("reuse_host_memory must run before the first JAX computation")
    return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_host_memory() -> bool:
    """Hands the heap's free pages back to the OS (glibc `malloc_trim(0)`), e.g. what
    compiling freed, so that later peaks do not come on top of it. Safe at any time.
    Returns False (and does nothing) where the C library is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def setup_cpu(preset: str = "default", host_memory: bool = True) -> str:
    """`set_xla_flags(preset)` and, if `host_memory`, `reuse_host_memory()`.

    For CPU runs only (on GPU hosts the malloc settings are harmless but pointless).
    Returns the resulting `XLA_FLAGS`.
    """
    flags = set_xla_flags(preset)
    if host_memory:
        reuse_host_memory()
    return flags
