"""ResNet (v1.5) body with frozen BatchNorm, in torchvision's layout, for detection.

Legend: B batch, H/W spatial size, C channels.

Matches `torchvision.models.resnet.ResNet` with `Bottleneck` blocks and
`torchvision.ops.misc.FrozenBatchNorm2d` as the norm layer: the stride sits in the 3x3
conv (v1.5), every conv and pool pads symmetrically like torch (Flax's 'SAME' pads
stride-2 convs asymmetrically), and the four BatchNorm tensors are fixed (torchvision
registers all four as buffers, so none of them is ever trained).

Parameter names follow the torch state dict: `conv1`, `bn1`, `layer{i}_{j}/conv{k}`,
`layer{i}_{j}/bn{k}`, `layer{i}_{j}/downsample_0` (1x1 conv), `.../downsample_1` (BN).
A BatchNorm holds `scale`, `bias`, `mean`, `var` (torch weight, bias, running_mean,
running_var) as params; `FROZEN_BN` and `frozen_patterns` name them for the optimizer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax import sharding

# Regex (of '/'-joined param paths) matching every frozen-BatchNorm tensor of the model.
FROZEN_BN = r"(^|/)(bn\d*|downsample_1|\w+_bn)/(scale|bias|mean|var)$"


def frozen_patterns(trainable_layers: int = 3) -> tuple[str, ...]:
    """Regexes of the params torchvision does not train (for `optim.frozen`).

    trainable_layers: 0..5 ResNet stages trained counting from the last, as
      torchvision's `trainable_backbone_layers` (default 3: conv1 and layer1 frozen;
      5: everything). BatchNorm tensors are always frozen.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"]
    frozen = stages[trainable_layers:]
    return (FROZEN_BN, *(rf"^backbone/body/{s}(_\d+)?/" for s in frozen))


class FrozenBatchNorm(nn.Module):
    """`x * scale / sqrt(var + eps) + (bias - mean * scale / sqrt(var + eps))`.

    eps: 0 for the legacy torchvision COCO weights, 1e-5 for v2 / detectron2 / fresh
    models. The four tensors are params behind `stop_gradient` (never trained).
    """

    eps: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        sg = jax.lax.stop_gradient
        w = sg(self.param("scale", nn.initializers.ones, (c,), jnp.float32))
        b = sg(self.param("bias", nn.initializers.zeros, (c,), jnp.float32))
        mean = sg(self.param("mean", nn.initializers.zeros, (c,), jnp.float32))
        var = sg(self.param("var", nn.initializers.ones, (c,), jnp.float32))
        # same association as FrozenBatchNorm2d.forward (fold into scale and bias)
        scale = w * jax.lax.rsqrt(var + self.eps)
        shift = b - mean * scale
        return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


_DN = ("NHWC", "HWIO", "NHWC")


def _conv_fwd_impl(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding), (padding, padding)),
                                        dimension_numbers=_DN)


def _weight_grad_matmul(x, g, w_shape, stride, padding):
    """dW (kh, kw, C, O) of a conv as matmuls: sum over (n, y, x) of input patch x dy.

    One (O, N*Ho*Wo) @ (N*Ho*Wo, C) matmul per kernel tap, on a strided slice of the
    padded input, with dy^T materialised once and shared by the taps: XLA:CPU's dot
    wants the contracted axis minor in its left operand, and its transposing copies
    are slow, so the one transposed operand is dy (1 copy, not one per tap as with
    x-slice^T @ dy, and no (C*kh*kw)-channel patch tensor; both alternatives were
    slower on RoI batches, figures in benchmarks/README.md). Written as 2-D matmuls
    with the transpose on the stacked result: an einsum or a transposed dot lets XLA
    fold the transpose back into the dot's operands.

    The taps run in a loop (`fori_loop`, one dynamic slice of the input per tap), so
    that one slice, as large as x, is alive at a time: as unrolled static slices, XLA
    computed all kh*kw of them as soon as x existed (in the forward pass) and kept them
    until the backward one, kh*kw copies of every conv input of the network. Strided
    taps read one phase of the input laid out as (N, H/s, s, W/s, s, C).
    """
    kh, kw, c, o = w_shape
    n, ho, wo, _ = g.shape
    if kh == kw == 1 and padding == 0:  # one tap: transpose the operand with fewer channels
        xs = x[:, ::stride, ::stride].reshape(-1, c)
        if c < o:
            return jnp.stack([xs.T @ g.reshape(-1, o)]).reshape(1, 1, c, o)
        return jnp.stack([g.reshape(-1, o).T @ xs]).reshape(1, 1, o, c).transpose(0, 1, 3, 2)
    s = stride
    hp, wp = s * ((kh - 1) // s + ho), s * ((kw - 1) // s + wo)  # rows / cols the taps read, phase-aligned
    # zero padding as the conv's, then extended or cropped (negative) to (hp, wp)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (padding, hp - x.shape[1] - padding, 0),
                                                 (padding, wp - x.shape[2] - padding, 0), (0, 0, 0)))
    xr = xp.reshape(n, hp // s, s, wp // s, s, c)  # (N, H/s, s, W/s, s, C)
    g_t = g.reshape(-1, o).T  # (O, N*Ho*Wo)

    def tap(t, acc):  # tap t = (ky, kx): rows ky + s*i = phase ky % s, offset ky // s
        ky, kx = t // kw, t % kw
        xs = jax.lax.dynamic_slice(xr, (0, ky // s, ky % s, kx // s, kx % s, 0), (n, ho, 1, wo, 1, c))
        return jax.lax.dynamic_update_index_in_dim(acc, g_t @ xs.reshape(-1, c), t, 0)

    taps = jax.lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, o, c), jnp.result_type(g_t, xr)))
    return taps.reshape(kh, kw, o, c).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """NHWC x HWIO convolution, symmetric padding; the weight gradient as a matmul.

    NOTE: XLA:CPU's kernel-gradient convolution is several times slower than the
    forward on RoI batches (figures in benchmarks/README.md), so on CPU the backward
    pass computes dW = patches(x)^T @ dy with matmuls (`_weight_grad_matmul`); dx of
    a stride-1 conv is a forward conv with the flipped kernel, of a strided one XLA's
    transposed convolution. Other platforms use XLA's own gradients. Values are those
    of `lax.conv_general_dilated`.
    """
    return _conv_fwd_impl(x, w, stride, padding)


def _conv2d_fwd(x, w, stride, padding):
    return _conv_fwd_impl(x, w, stride, padding), (x, w)


def _conv2d_bwd(stride, padding, res, g):
    x, w = res
    _, vjp = jax.vjp(lambda x, w: _conv_fwd_impl(x, w, stride, padding), x, w)

    def dx_dw_xla(x, w, g):  # XLA's own transposed / kernel-gradient convolutions
        return vjp(g)

    def dx_dw_cpu(x, w, g):
        kh, kw = w.shape[:2]
        if stride == 1 and kh == kw and padding <= kh - 1:
            # dx of a stride-1 conv is the forward conv of dy with the flipped, transposed
            # kernel: XLA:CPU runs that with its fast (YNNPACK) forward kernels, while its
            # transposed convolution is not always routed there (slower on RoI batches)
            dx = _conv_fwd_impl(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2), 1, kh - 1 - padding)
        else:
            _, vjp_x = jax.vjp(lambda x: _conv_fwd_impl(x, w, stride, padding), x)
            (dx,) = vjp_x(g)
        return dx, _weight_grad_matmul(x, g, w.shape, stride, padding).astype(w.dtype)

    # NOTE: the per-tap matmuls are an XLA:CPU workaround; they copy kh*kw slices of
    # the input, which GPUs and TPUs don't need (their kernel-gradient convolutions are
    # fast), so it is chosen per platform at lowering time (also under jax.export).
    return jax.lax.platform_dependent(x, w, g, cpu=dx_dw_cpu, default=dx_dw_xla)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """torch-style Conv2d (params `kernel` (kh, kw, in, out), `bias`), via `conv2d`."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.param("kernel", self.kernel_init, (self.kernel, self.kernel, x.shape[-1], self.features),
                       jnp.float32)
        y = conv2d(x.astype(self.dtype), k.astype(self.dtype), self.stride, self.padding)
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None, bias: bool = False,
         name: str | None = None, dtype=jnp.float32, kernel_init=None) -> Conv:
    """A torch-style Conv2d: symmetric explicit padding (default kernel // 2)."""
    p = kernel // 2 if padding is None else padding
    kw = {} if kernel_init is None else {"kernel_init": kernel_init}
    return Conv(features, kernel, stride, p, bias, dtype, name=name, **kw)


class Bottleneck(nn.Module):
    """torchvision `Bottleneck`: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut."""

    planes: int
    stride: int = 1
    width: int = 64  # bottleneck width = planes * width_per_group / 64
    downsample: bool = False
    bn_eps: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.planes * 4
        y = nn.relu(FrozenBatchNorm(self.bn_eps, name="bn1")(conv(self.width, 1, name="conv1", dtype=self.dtype)(x)))
        y = conv(self.width, 3, self.stride, name="conv2", dtype=self.dtype)(y)
        y = nn.relu(FrozenBatchNorm(self.bn_eps, name="bn2")(y))
        y = FrozenBatchNorm(self.bn_eps, name="bn3")(conv(out_ch, 1, name="conv3", dtype=self.dtype)(y))
        if self.downsample:
            x = conv(out_ch, 1, self.stride, name="downsample_0", dtype=self.dtype)(x)
            x = FrozenBatchNorm(self.bn_eps, name="downsample_1")(x)
        return nn.relu(y + x)


def _stem(x: jax.Array, stem_width: int, bn_eps: float, dtype) -> jax.Array:
    """conv1 (7x7, s2) + bn1 + ReLU, created in the calling module. (B, H, W, 3) -> (B, H/2, W/2, stem)."""
    x = conv(stem_width, 7, 2, 3, name="conv1", dtype=dtype)(x.astype(dtype))
    return nn.relu(FrozenBatchNorm(bn_eps, name="bn1")(x))


def _max_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))  # pads with -inf like torch


def _stage(x: jax.Array, i: int, depth: int, width_per_group: int, bn_eps: float, dtype,
           block=Bottleneck) -> jax.Array:
    """Stage i (0-based: torchvision's layer{i+1}) of `depth` blocks, created in the calling module."""
    planes = (64, 128, 256, 512)[i]
    for j in range(depth):
        x = block(planes, stride=(1 if i == 0 else 2) if j == 0 else 1, width=planes * width_per_group // 64,
                  downsample=j == 0, bn_eps=bn_eps, dtype=dtype, name=f"layer{i + 1}_{j}")(x)
    return x


class _FrozenPrefix(nn.Module):
    """The stem, max pool and the first `stages` stages of `ResNetBody` (the same param
    names), for one image at a time: returns the pooled stem output and each stage's."""

    stages: int
    depths: Sequence[int]
    stem_width: int
    width_per_group: int
    bn_eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = [_max_pool(_stem(x, self.stem_width, self.bn_eps, self.dtype))]
        for i in range(self.stages):
            outs.append(_stage(outs[-1], i, self.depths[i], self.width_per_group, self.bn_eps, self.dtype))
        return outs


class _TrainedStages(nn.Module):
    """Stages `first`..3 of `ResNetBody` (the same param names): x -> their outputs."""

    first: int
    depths: Sequence[int]
    width_per_group: int
    bn_eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outs = []
        for i in range(self.first, 4):
            x = _stage(x, i, self.depths[i], self.width_per_group, self.bn_eps, self.dtype)
            outs.append(x)
        return outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def recompute_per_image(fn, params, x, need_dx=True):
    """`fn(params, x)`, its backward pass recomputing the forward one image at a time.

    fn: (params, (B, ...) batch) -> pytree of (B, ...) arrays, each image's outputs a
    function of that image alone. The forward pass keeps only `params` and `x` for the
    backward one, which runs a loop (`lax.scan`) over the images: each recomputes its
    forward and takes its vjp; parameter gradients are summed over the images. Values
    are `fn`'s; gradients equal up to float rounding (the sum over images is ordered).
    need_dx: False when x needs no gradient (zeros are returned for it).

    NOTE: on XLA:CPU `jax.checkpoint` recomputes nothing: the optimization barriers
    are dropped before common-subexpression elimination, which merges the recompute
    back into the forward pass, so every intermediate stays alive until the backward
    pass. A recompute inside a loop body is a different computation, which CSE
    cannot merge (figures in benchmarks/README.md).
    """
    return _map_images(fn, params, x)


def _map_images(fn, params, x):
    """`fn(params, x)` one image at a time (`lax.map`): XLA then writes the outputs to
    memory instead of fusing their elementwise tails into every consumer. With the
    batch split over devices (`sharding.batch_shards`), one image per device at a time:
    each step of the loop takes the j-th image of every shard (`shard_major`)."""
    n = sharding.current_batch_shards(x.shape[0])
    out = jax.lax.map(lambda xi: fn(params, xi), sharding.shard_major(x, n))
    return jax.tree_util.tree_map(sharding.shard_major_inverse, out)


def _recompute_fwd(fn, params, x, need_dx):
    return _map_images(fn, params, x), (params, x)


def _recompute_bwd(fn, need_dx, res, g):
    params, x = res

    n = sharding.current_batch_shards(x.shape[0])  # as in the forward pass (`_map_images`)

    def one(acc, xs):
        xi, gi = xs
        if need_dx:
            _, vjp = jax.vjp(fn, params, xi)
            dp, dx = vjp(gi)
        else:
            _, vjp = jax.vjp(lambda p: fn(p, xi), params)
            (dp,), dx = vjp(gi), None
        return jax.tree_util.tree_map(jnp.add, acc, dp), dx

    acc = jax.tree_util.tree_map(jnp.zeros_like, params)
    dp, dx = jax.lax.scan(one, acc, jax.tree_util.tree_map(lambda a: sharding.shard_major(a, n), (x, g)))
    return dp, sharding.shard_major_inverse(dx) if need_dx else jnp.zeros_like(x)


recompute_per_image.defvjp(_recompute_fwd, _recompute_bwd)


class ResNetBody(nn.Module):
    """ResNet stem + 4 stages; returns the stage outputs C2..C5.

    depths: blocks per stage ((3, 4, 6, 3) = ResNet-50).
    stem_width: conv1 channels (64). width_per_group: 64 for ResNet-50 (bottleneck
      widths 64/128/256/512; smaller values give a thinner tiny model).
    trainable_layers: stages trained counting from the last (torchvision default 3);
      the frozen prefix runs under `stop_gradient` so no backward is spent on it
      (its params must also be frozen in the optimizer: `frozen_patterns`).
    remat: recompute the trained stages in the backward pass, at the cost of a second
      forward of them. With several images (and params already created) the trained
      stages run one image at a time, and their backward pass recomputes each image's
      forward in a loop (`recompute_per_image`): only the first trained stage's input
      and the stage outputs are kept, which works on XLA:CPU too; with one image
      each trained block is an `nn.remat` (kept only where XLA keeps the recompute).

    NOTE: with a batch of several images (and params already created), the frozen
    prefix (stem + frozen stages) runs one image at a time in a loop (`lax.map`), the
    same convolutions on the same values. The loop makes XLA write the frozen stages'
    outputs to memory: inline, XLA:CPU fuses each block's elementwise tail (frozen
    BatchNorm, residual add, ReLU) into every later consumer of the stage output,
    including the backward pass's weight gradients, and so keeps all the blocks'
    conv outputs alive instead of the stage output (4 buffers of C2's size for
    ResNet-50's layer1, figures in benchmarks/README.md).
    """

    depths: Sequence[int] = (3, 4, 6, 3)
    stem_width: int = 64
    width_per_group: int = 64
    bn_eps: float = 0.0
    trainable_layers: int = 3
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x: (B, H, W, 3) normalised image -> [C2 (B, H/4, W/4, 256), ..., C5 (B, H/32, W/32, 2048)]
        (channel counts for ResNet-50)."""
        frozen = 4 - self.trainable_layers  # frozen stages; the stem is frozen too unless all 5 train
        sg = jax.lax.stop_gradient
        if frozen >= 0 and x.shape[0] > 1 and not self.is_initializing():
            prefix = _FrozenPrefix(frozen, tuple(self.depths), self.stem_width, self.width_per_group,
                                   self.bn_eps, self.dtype)
            names = {"conv1", "bn1"} | {f"layer{i + 1}_{j}" for i in range(frozen) for j in range(self.depths[i])}
            params = sg({k: v for k, v in self.variables["params"].items() if k in names})
            outs = _map_images(lambda p, xb: prefix.apply({"params": p}, xb), params, sg(x))
            x, outs = outs[-1], outs[1:]
        else:
            x = _stem(x, self.stem_width, self.bn_eps, self.dtype)
            if frozen >= 0:  # bn1 and conv1 are trained only with all 5 layers
                x = sg(x)
            x = _max_pool(x)
            outs = []
            for i in range(max(frozen, 0)):
                x = sg(_stage(x, i, self.depths[i], self.width_per_group, self.bn_eps, self.dtype))
                outs.append(x)
        if self.remat and x.shape[0] > 1 and not self.is_initializing() and len(outs) < 4:
            first = len(outs)
            trained = _TrainedStages(first, tuple(self.depths), self.width_per_group, self.bn_eps, self.dtype)
            names = {f"layer{i + 1}_{j}" for i in range(first, 4) for j in range(self.depths[i])}
            params = {k: v for k, v in self.variables["params"].items() if k in names}
            fn = lambda p, xb: trained.apply({"params": p}, xb)  # noqa: E731
            return outs + recompute_per_image(fn, params, x, frozen < 0)
        for i in range(len(outs), 4):
            block = nn.remat(Bottleneck) if self.remat else Bottleneck
            x = _stage(x, i, self.depths[i], self.width_per_group, self.bn_eps, self.dtype, block)
            outs.append(x)
        return outs
