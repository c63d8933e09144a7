"""The official MAE forward pass (He et al. 2022) in PyTorch, for parity tests.

Built from timm's `PatchEmbed` and `Block` with the attribute names of the official
`models_mae.MaskedAutoencoderViT`, so its `state_dict()` has the official keys. The
forward follows the paper / official semantics: sin-cos tables with the first half of
the channels encoding the column (w), argsort-of-noise masking (mask 1 = removed),
decoder on the un-shuffled full sequence, MSE on removed patches, optional per-patch
normalised target with the unbiased variance. Written for these tests.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """(1 + grid*grid, dim): zero class row, then raster order; first half encodes w."""
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")

    def encode(d: int, pos: np.ndarray) -> np.ndarray:
        freq = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        ang = pos.reshape(-1)[:, None] * freq[None]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    table = np.concatenate([encode(dim // 2, cols), encode(dim // 2, rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def mae_forward_encoder(m: nn.Module, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float):
    """MAE's encoder on any module with patch_embed, pos_embed, cls_token, blocks, norm
    (the official MAE and timm's VisionTransformer alike). imgs (B, C, H, W)."""
    x = m.patch_embed(imgs) + m.pos_embed[:, 1:, :]
    b, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in m.blocks:
        x = blk(x)
    return m.norm(x), mask, ids_restore


class OfficialMAE(nn.Module):
    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                 norm_pix_loss=False):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        grid = math.isqrt(n)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(embed_dim, grid))[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_table(decoder_embed_dim, grid))[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), each patch flattened as (p, q, c)."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, v1, e = x.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, ids_restore.shape[1] + 1 - v1, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, e))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float = 0.75):
        latent, mask, ids_restore = mae_forward_encoder(self, imgs, noise, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, keep: tuple[str, ...] = ("pos_embed", "position_embeddings")):
    """Seeded random values for every parameter except fixed position tables.

    LayerNorm scales around 1, everything else N(0, 1/fan_in)-ish, so activations stay
    O(1) and every tensor matters for the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if any(k in name for k in keep):
            continue
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and (name.endswith("weight") or "norm" in name):
            p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
        elif p.ndim >= 2 and not name.endswith(("token",)):
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(noise / fan_in**0.5)
        else:
            p.copy_(0.1 * noise if p.ndim == 1 else 0.5 * noise)
