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
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C), got {images.shape}")
        if noise is None:
            rng = jax.random.key(0) if rng is None else rng
            noise = jax.random.uniform(rng, (images.shape[0], self.model.num_patches))
        ratio = float(self.model.mask_ratio if mask_ratio is None else mask_ratio)
        out = self._forward(self.params, images, jnp.asarray(noise, jnp.float32), ratio)
        return {k: np.asarray(v) for k, v in out.items()}

    def __call__(self, images, noise=None, mask_ratio: float | None = None,
                 rng: jax.Array | None = None) -> dict[str, np.ndarray]:
        """Runs the MAE.

        Args:
          images: (B, H, W, 3) float32, normalised with mean/std.
          noise: (B, L) masking noise (the V smallest are kept); drawn from `rng`
            (default key 0) when None.
          mask_ratio: fraction of patches removed; the model's by default (0.75).
        Returns:
          {'loss': () , 'pred': (B, L, P*P*3), 'mask': (B, L) with 1 = removed}, numpy,
          as the reference's `forward` returns them.
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
