"""Detection models: Mask R-CNN with a ResNet-FPN backbone (torchvision layout).

Registry variants (`segjax.models.build(name, **overrides)`):
  mask_rcnn_r50_fpn     torchvision `maskrcnn_resnet50_fpn` (legacy COCO weights: bn_eps 0)
  mask_rcnn_r50_fpn_v2  torchvision `maskrcnn_resnet50_fpn_v2` (BatchNorm in FPN and heads,
                        4conv+1fc box head, 2-conv RPN head, bn eps 1e-5)
  mask_rcnn_tiny        ResNet-(1,1,1,1) with thin bottlenecks, narrow FPN and heads,
                        small anchors and images: CPU tests and CPU training
  maskrcnn_vitdet_b     ViTDet (detectron2 projects/ViTDet mask_rcnn_vitdet_b_100ep): ViT-B/16
                        at 1024, window 14, global blocks (2, 5, 8, 11), abs pos of the 224
                        pretraining grid, drop path 0.1; simple feature pyramid; 2-conv RPN;
                        4conv+1fc box head and 4-conv mask head with LayerNorm
  maskrcnn_vitdet_l/_h  ViT-L/16 (1024/24/16, global (5, 11, 17, 23), drop path 0.4),
                        ViT-H/16 (1280/32/16, global (7, 15, 23, 31), drop path 0.5)
  maskrcnn_vitdet_tiny  ViT 64 wide, 4 blocks, patch 16, window 4 at 128 px: CPU tests/training

NOTE: the ViTDet variants keep the torchvision semantics of the R50 models where
detectron2's ViTDet differs: anchors, matching, sampling, smooth-L1 box losses (detectron2:
L1 on the RoI boxes), RoIAlign aligned=False with 2 samples per bin (detectron2: ROIAlignV2,
aligned with adaptive sampling; `aligned` / `sampling_ratio` switch it), 2000 training
proposals per image (detectron2: 1000; `rpn_post_nms_top_n_train`), background class 0.
"""

from __future__ import annotations

from segjax.models.maskrcnn.mask_rcnn import MaskRCNN

_V2 = dict(bn_eps=1e-5, head_norm=True, rpn_conv_depth=2, box_convs=(256, 256, 256, 256))
_TINY = dict(
    num_classes=5, depths=(1, 1, 1, 1), width_per_group=16, bn_eps=1e-5, trainable_layers=5,
    fpn_channels=32, anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
    rpn_pre_nms_top_n_train=300, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_train=200,
    rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=64, representation_size=64,
    mask_layers=(32, 32), mask_dim_reduced=32, box_batch_size_per_image=64,
    box_detections_per_img=20, box_num_candidates=400, min_size=128, max_size=192)

# ViTDet heads: LayerNorm (head_norm_type "ln") after every head conv, 2-conv RPN head
_VITDET = dict(backbone_type="vitdet", head_norm=True, head_norm_type="ln", rpn_conv_depth=2,
               box_convs=(256, 256, 256, 256), min_size=1024, max_size=1024)
_VITDET_TINY = {
    **{k: v for k, v in _TINY.items() if k not in ("depths", "width_per_group", "bn_eps", "trainable_layers")},
    **_VITDET, "vit_img_size": 128, "vit_pretrain_img_size": 128, "vit_patch_size": 16, "vit_embed_dim": 64,
    "vit_depth": 4, "vit_num_heads": 4, "vit_window_size": 4, "vit_global_attn_indexes": (1, 3),
    "vit_drop_path_rate": 0.1, "box_convs": (32, 32, 32, 32), "mask_layers": (32, 32, 32, 32),
    "min_size": 128, "max_size": 128}

VARIANTS = {
    "mask_rcnn_r50_fpn": {},
    "mask_rcnn_r50_fpn_v2": _V2,
    "mask_rcnn_tiny": _TINY,
    "maskrcnn_vitdet_b": _VITDET,
    "maskrcnn_vitdet_l": dict(_VITDET, vit_embed_dim=1024, vit_depth=24, vit_num_heads=16,
                              vit_global_attn_indexes=(5, 11, 17, 23), vit_drop_path_rate=0.4),
    "maskrcnn_vitdet_h": dict(_VITDET, vit_embed_dim=1280, vit_depth=32, vit_num_heads=16,
                              vit_global_attn_indexes=(7, 15, 23, 31), vit_drop_path_rate=0.5),
    "maskrcnn_vitdet_tiny": _VITDET_TINY,
}


__all__ = ["MaskRCNN", "VARIANTS"]
