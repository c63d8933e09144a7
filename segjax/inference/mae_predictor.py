"""MAE reconstruction on the host: load a checkpoint, run masked autoencoding, draw grids.

Legend: B batch, H/W image size, L patches, P patch size.

Images go in as (B, H, W, 3) float32 normalised with the model's mean/std (ImageNet
for every released MAE), as the model itself takes them. Outputs are numpy.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import models
from segjax.checkpoint import flatten_paths, load_params
from segjax.evaluators import reconstruction
from segjax.models.mae import MAE, denormalise_patches, unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MAEPredictor:
    """Masked-autoencoder inference for one MAE checkpoint (jit-compiled once per shape).

    `__call__` gives the model's outputs; `reconstruct` the images of the MAE
    visualisation (reconstruction, masked input, paste of visible + reconstructed).
    """

    def __init__(self, model: MAE, params: Any, meta: dict | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if not isinstance(model, MAE):
            raise TypeError(f"MAEPredictor needs an MAE model, got {type(model).__name__}")
        self.model = model
        self.meta = meta or {}
        self.params = jax.device_put(params)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._forward = jax.jit(self._forward_impl, static_argnums=(3,))

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **kwargs) -> MAEPredictor:
        """Builds the model from the checkpoint's meta and loads its params."""
        params, meta = load_params(directory)
        if not meta.get("has_decoder", meta.get("params", "mae") == "mae"):
            raise ValueError(f"{directory} holds {meta.get('params')!r} params without the MAE "
                             "decoder; reconstruction needs a full (`*_full`, `mae_visualize_*`, "
                             "Hugging Face ViTMAEForPreTraining) checkpoint")
        model = models.build(meta["model"], **meta.get("model_kwargs", {}))
        if set(params) == {"params"}:
            params = params["params"]
        expected = nn.meta.unbox(jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, model.img_size, model.img_size, model.in_chans)),
                               noise=jnp.zeros((1, model.num_patches)))))["params"]
        _check_params(expected, params, directory)
        return cls(model, params, meta, **kwargs)

    def _forward_impl(self, params, images, noise, mask_ratio):
        out = self.model.apply({"params": params}, images, noise=noise, mask_ratio=mask_ratio)
        p = self.model.patch_size
        _, h, w, c = images.shape
        pred = out["pred"]  # (B, L, P*P*C)
        pixels = denormalise_patches(pred, images, p) if self.model.norm_pix_loss else pred
        recon = unpatchify(pixels, p, h // p, w // p, c)  # (B, H, W, C)
        mask_px = unpatchify(jnp.broadcast_to(out["mask"][..., None], pred.shape), p, h // p, w // p, c)
        images = images.astype(jnp.float32)
        return {**out, "reconstruction": recon, "masked": images * (1.0 - mask_px),
                "paste": images * (1.0 - mask_px) + recon * mask_px, "mask_pixels": mask_px}

    def _run(self, images, noise, mask_ratio, rng) -> dict[str, np.ndarray]:
        images, noise, ratio = self.check_inputs(images, noise, mask_ratio)
        if noise is None:
            rng = jax.random.key(0) if rng is None else rng
            noise = jax.random.uniform(rng, (images.shape[0], self.model.num_patches))
        out = self._forward(self.params, jnp.asarray(images), jnp.asarray(noise, jnp.float32), ratio)
        return {k: np.asarray(v) for k, v in out.items()}

    def check_inputs(self, images, noise=None, mask_ratio: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None, float]:
        """Validates a call's inputs; returns (images float32, noise float32 or None, ratio).

        The model is built for one image size (its fixed position embeddings cover
        img_size / patch_size patches a side), so images of another size are refused
        with that size named rather than resized. Raises ValueError naming what is wrong:
        not (B, H, W, C) with B >= 1, C the model's channels and H = W = img_size;
        non-numeric or non-finite values; noise not (B, L) finite; mask_ratio outside
        [0, 1) or keeping no patch visible (V = int(L * (1 - mask_ratio)) = 0).
        mask_ratio 0 removes nothing: the outputs are defined but 'loss', a mean over
        removed patches, is NaN there, as the reference's.
        """
        m = self.model
        images = np.asarray(images)
        if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_) or np.iscomplexobj(images):
            raise ValueError(f"images must be real numbers, got dtype {images.dtype}")
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, {m.in_chans}), got shape {images.shape}")
        b, h, w, c = images.shape
        if b == 0:
            raise ValueError(f"images is an empty batch: shape {images.shape}")
        if c != m.in_chans:
            raise ValueError(f"images must have {m.in_chans} channels (B, H, W, {m.in_chans}), got shape "
                             f"{images.shape}")
        if (h, w) != (m.img_size, m.img_size):
            raise ValueError(f"images must be {m.img_size}x{m.img_size} (the model's img_size), got {h}x{w}: "
                             "resize or crop them first")
        images = images.astype(np.float32)
        if not np.isfinite(images).all():
            raise ValueError("images hold non-finite values (NaN or inf)")
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            if noise.shape != (b, m.num_patches):
                raise ValueError(f"noise must be (B, L) = {(b, m.num_patches)}, got {noise.shape}")
            if not np.isfinite(noise).all():
                raise ValueError("noise holds non-finite values (NaN or inf)")
        ratio = m.mask_ratio if mask_ratio is None else mask_ratio
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ValueError(f"mask_ratio must be a number in [0, 1), got {ratio!r}") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        if int(m.num_patches * (1 - ratio)) < 1:
            raise ValueError(f"mask_ratio {ratio} keeps no patch visible (int({m.num_patches} * (1 - {ratio})) = 0 "
                             f"of {m.num_patches})")
        return images, noise, ratio

    def __call__(self, images, noise=None, mask_ratio: float | None = None,
                 rng: jax.Array | None = None) -> dict[str, np.ndarray]:
        """Runs the MAE.

        Args:
          images: (B, H, W, 3) float32, normalised with mean/std.
          noise: (B, L) masking noise (the V smallest are kept); drawn from `rng`
            (default key 0) when None.
          mask_ratio: fraction of patches removed, in [0, 1); the model's by default (0.75).
        Returns:
          {'loss': () , 'pred': (B, L, P*P*3), 'mask': (B, L) with 1 = removed}, numpy,
          as the reference's `forward` returns them.
        Raises:
          ValueError: bad input (see `check_inputs`), e.g. images of another size than
            the model's img_size, an empty batch, mask_ratio outside [0, 1).
        """
        out = self._run(images, noise, mask_ratio, rng)
        return {k: out[k] for k in ("loss", "pred", "mask")}

    def reconstruct(self, images, noise=None, mask_ratio: float | None = None,
                    rng: jax.Array | None = None) -> dict[str, np.ndarray]:
        """The MAE visualisation: everything `__call__` returns plus

        'reconstruction' (B, H, W, 3): the un-patchified prediction in the normalised
          input space (a norm_pix_loss model's output de-normalised with each patch's
          mean/var from the input, see `denormalise_patches`);
        'masked' (B, H, W, 3): the input with removed patches zeroed;
        'paste' (B, H, W, 3): visible patches from the input, removed ones reconstructed;
        'mask_pixels' (B, H, W, 3): the mask at pixel resolution (1 = removed).
        """
        return self._run(images, noise, mask_ratio, rng)

    def to_uint8(self, images: np.ndarray) -> np.ndarray:
        """Normalised (..., 3) float images -> uint8 RGB for display."""
        return reconstruction.to_uint8(np.asarray(images), self.mean, self.std)

    def save_png(self, path: str | os.PathLike, images: np.ndarray, outputs: dict[str, np.ndarray]) -> str:
        """Draws one row per image: original | masked | reconstruction | paste.

        images: (B, H, W, 3) the normalised inputs; outputs: `reconstruct`'s result.
        Removed patches of the 'masked' panel are drawn at the mean colour. Returns the path.
        """
        views = {"original": np.asarray(images), **outputs}
        grid = reconstruction.grid_image(views, max_rows=len(images), mean=self.mean, std=self.std,
                                         columns=("original", "masked", "reconstruction", "paste"))
        return reconstruction.save_png(os.fspath(path), grid)


def _check_params(expected: Any, params: Any, directory) -> None:
    want = {k: tuple(v.shape) for k, v in flatten_paths(expected).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten_paths(params).items()}
    bad = sorted(set(want) ^ set(got)) + [f"{k}: {got[k]} vs model {want[k]}"
                                          for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if bad:
        raise ValueError(f"{directory}: params do not fit the model built from its meta "
                         f"(missing, extra or mis-shaped): {bad[:20]}")
