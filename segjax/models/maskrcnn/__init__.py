"""Detection models: Mask R-CNN with a ResNet-FPN backbone (torchvision layout).

Registry variants (`segjax.models.build(name, **overrides)`):
  mask_rcnn_r50_fpn     torchvision `maskrcnn_resnet50_fpn` (legacy COCO weights: bn_eps 0)
  mask_rcnn_r50_fpn_v2  torchvision `maskrcnn_resnet50_fpn_v2` (BatchNorm in FPN and heads,
                        4conv+1fc box head, 2-conv RPN head, bn eps 1e-5)
  mask_rcnn_tiny        ResNet-(1,1,1,1) with thin bottlenecks, narrow FPN and heads,
                        small anchors and images: CPU tests and CPU training
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

VARIANTS = {
    "mask_rcnn_r50_fpn": {},
    "mask_rcnn_r50_fpn_v2": _V2,
    "mask_rcnn_tiny": _TINY,
}


__all__ = ["MaskRCNN", "VARIANTS"]
