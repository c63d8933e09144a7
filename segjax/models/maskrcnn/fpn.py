"""Feature pyramid network (Lin et al. 2017) as torchvision's `FeaturePyramidNetwork`.

Legend: B batch, H/W spatial size, C channels.

Lateral 1x1 convs (`inner_blocks_{i}`), output 3x3 convs (`layer_blocks_{i}`), top-down
nearest-neighbour upsampling to the lateral's size (torch `F.interpolate(mode='nearest')`
index rule from `segjax.ops.resample`, so odd sizes match too), and `LastLevelMaxPool` ('pool' level: max-pool
k=1, s=2, i.e. every other pixel of P5). With `norm=True` (the v2 model) each conv is
bias-free and followed by a frozen BatchNorm (`inner_blocks_{i}_bn`, `layer_blocks_{i}_bn`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.maskrcnn.backbone import FrozenBatchNorm, conv
from segjax.ops.resample import nearest_indices


def upsample_nearest(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, H, W, C) as torch `F.interpolate(x, size=(H, W), mode='nearest')`."""
    _, h, w, _ = x.shape
    if (hw[0], hw[1]) == (2 * h, 2 * w):  # the common exact-2x case: a broadcast, no gather
        b, c = x.shape[0], x.shape[-1]
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    x = jnp.take(x, nearest_indices(h, hw[0]), axis=1)
    return jnp.take(x, nearest_indices(w, hw[1]), axis=2)


class FPN(nn.Module):
    """Returns [P2, P3, P4, P5, pool], each (B, H_l, W_l, out_channels)."""

    out_channels: int = 256
    norm: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    def _block(self, x, kernel, name):
        # torchvision FPN init: kaiming_uniform(a=1) == variance_scaling(1, fan_in, uniform)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        x = conv(self.out_channels, kernel, bias=not self.norm, name=name, dtype=self.dtype,
                 kernel_init=init)(x)
        if self.norm:
            x = FrozenBatchNorm(self.bn_eps, name=f"{name}_bn")(x)
        return x

    @nn.compact
    def __call__(self, feats: list[jax.Array]) -> list[jax.Array]:
        """feats: [C2, ..., C5] (B, H_l, W_l, C_l), finest first."""
        n = len(feats)
        last = self._block(feats[-1], 1, f"inner_blocks_{n - 1}")
        results = [self._block(last, 3, f"layer_blocks_{n - 1}")]
        for i in range(n - 2, -1, -1):
            lateral = self._block(feats[i], 1, f"inner_blocks_{i}")
            last = lateral + upsample_nearest(last, lateral.shape[1:3])
            results.insert(0, self._block(last, 3, f"layer_blocks_{i}"))
        results.append(results[-1][:, ::2, ::2])  # LastLevelMaxPool: max_pool2d(k=1, s=2)
        return results
