"""A PyTorch ViTDet Mask R-CNN for the parity tests, assembled from reference blocks:
segment_anything's rel-pos `Attention` and window (un)partition, timm's `Mlp`,
`DropPath` and `LayerNorm2d`, torchvision's `MaskRCNN` with `RPNHead(conv_depth=2)`,
`FastRCNNConvFCHead` and `MaskRCNNHeads` given a LayerNorm `norm_layer`.

Only the glue ViTDet adds is written here, following detectron2's `projects/ViTDet`
(`ViT`, `SimpleFeaturePyramid`, `LastLevelMaxPool`, `get_abs_pos`), with detectron2's
state-dict names for the backbone: `backbone.net.{patch_embed.proj, pos_embed (1, 1+G*G, D)
with a class-token row, blocks.{i}.{norm1, attn.{qkv, proj, rel_pos_h, rel_pos_w}, norm2,
mlp.{fc1, fc2}}}`, `backbone.simfp_{s}.{k}[.norm]`; the heads have torchvision's names.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, window_partition, window_unpartition
from timm.layers import DropPath, LayerNorm2d, Mlp
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead


def layer_norm(c: int) -> nn.Module:
    return LayerNorm2d(c, eps=1e-6)  # detectron2 get_norm("LN", c)


class Block(nn.Module):
    """detectron2 ViTDet `Block`: windowed (window > 0) or global rel-pos attention + MLP."""

    def __init__(self, dim, heads, window, input_size, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        size = (window, window) if window else input_size
        self.attn = Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU)
        self.window = window

    def forward(self, x):  # (B, H, W, D)
        shortcut = x
        x = self.norm1(x)
        if self.window:
            h, w = x.shape[1:3]
            x, pad_hw = window_partition(x, self.window)
        x = self.attn(x)
        if self.window:
            x = window_unpartition(x, self.window, pad_hw, (h, w))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """detectron2 ViTDet `ViT` (abs pos with a class-token row from the pretraining grid)."""

    def __init__(self, img_size, pretrain_img_size, patch, dim, depth, heads, window, global_idx,
                 drop_path_rate=0.0):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        g = pretrain_img_size // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + 1, dim))
        grid = (img_size // patch, img_size // patch)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(dim, heads, 0 if i in global_idx else window, grid, dpr[i]) for i in range(depth))

    def forward(self, x):  # (B, 3, S, S) -> (B, D, H, W)
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        h, w = x.shape[1:3]
        pos = self.pos_embed[:, 1:]  # get_abs_pos: drop the class token, bicubic resize
        g = int(math.sqrt(pos.shape[1]))
        pos = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        if (g, g) != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        x = x + pos.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)


class ConvNorm(nn.Conv2d):
    """detectron2 `Conv2d(..., norm=...)`: a conv with its norm as the `norm` child."""

    def __init__(self, cin, cout, k, norm):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)
        self.norm = norm

    def forward(self, x):
        return self.norm(super().forward(x))


class SimpleFeaturePyramid(nn.Module):
    """`net` + `simfp_{s}` levels + LastLevelMaxPool; outputs OrderedDict '0'..'3', 'pool'."""

    def __init__(self, net, dim, out_channels, patch=16, scales=(4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.net, self.out_channels, self.stages = net, out_channels, []
        for scale in scales:
            if scale == 4.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), layer_norm(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
            elif scale == 2.0:
                layers, c = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
            elif scale == 1.0:
                layers, c = [], dim
            else:
                layers, c = [nn.MaxPool2d(2, 2)], dim
            layers += [ConvNorm(c, out_channels, 1, layer_norm(out_channels)),
                       ConvNorm(out_channels, out_channels, 3, layer_norm(out_channels))]
            stage = int(math.log2(patch / scale))
            self.add_module(f"simfp_{stage}", nn.Sequential(*layers))
            self.stages.append(f"simfp_{stage}")

    def forward(self, x):
        f = self.net(x)
        outs = [getattr(self, s)(f) for s in self.stages]
        outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(["0", "1", "2", "3", "pool"], outs))


def vitdet_torch(model, seed: int = 0) -> MaskRCNN:
    """torchvision MaskRCNN shaped like the segjax `MaskRCNN` `model` (a vitdet variant, an
    unbound module: only its fields are read), seeded, eval mode, with non-degenerate
    LayerNorms, biases and position tables."""
    torch.manual_seed(seed)
    m = model
    net = ViT(m.vit_img_size, m.vit_pretrain_img_size, m.vit_patch_size, m.vit_embed_dim, m.vit_depth,
              m.vit_num_heads, m.vit_window_size, tuple(m.vit_global_attn_indexes), m.vit_drop_path_rate)
    f = m.fpn_channels
    backbone = SimpleFeaturePyramid(net, m.vit_embed_dim, f, m.vit_patch_size)
    na = len(m.anchor_sizes[0]) * len(m.aspect_ratios)
    c = m.num_classes
    tv = MaskRCNN(
        backbone, num_classes=None, min_size=m.min_size, max_size=m.max_size,
        rpn_anchor_generator=AnchorGenerator(tuple(map(tuple, m.anchor_sizes)), (tuple(m.aspect_ratios),) * 5),
        rpn_head=RPNHead(f, na, conv_depth=m.rpn_conv_depth),
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train, rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_head=FastRCNNConvFCHead((f, 7, 7), list(m.box_convs), [m.representation_size], layer_norm),
        box_predictor=FastRCNNPredictor(m.representation_size, c),
        box_batch_size_per_image=m.box_batch_size_per_image, box_detections_per_img=m.box_detections_per_img,
        mask_head=MaskRCNNHeads(f, list(m.mask_layers), 1, norm_layer=layer_norm),
        mask_predictor=MaskRCNNPredictor(m.mask_layers[-1], m.mask_dim_reduced, c))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tv.named_parameters():
            if name.endswith("rel_pos_h") or name.endswith("rel_pos_w") or name.endswith("pos_embed"):
                p.normal_(0, 0.2, generator=g)  # zero-initialised in the reference
            elif p.ndim == 1 and ("norm" in name or ".1." in name):
                p.add_(0.2 * torch.randn(p.shape, generator=g))  # LayerNorm affine (ones / zeros)
            elif p.ndim == 1 and not p.abs().sum():
                p.normal_(0, 0.02, generator=g)
        head = tv.rpn.head
        head.cls_logits.weight.normal_(0, 0.05, generator=g)
        head.cls_logits.bias.normal_(0, 0.5, generator=g)
        head.bbox_pred.weight.normal_(0, 0.01, generator=g)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(4.0)
        tv.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
    return tv.eval()
