"""torchvision Mask R-CNN references for the parity tests: seeded random models whose
outputs are not degenerate (non-identity frozen BN, spread objectness and class scores)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import FrozenBatchNorm2d

from segjax import models
from segjax.testing.images import chelsea  # noqa: F401 - re-exported for the Mask R-CNN tests

# The torch twin's numbers, read from the registry's `mask_rcnn_tiny` (an unbound
# module: no init runs).
_T = models.build("mask_rcnn_tiny")
TINY = dict(num_classes=_T.num_classes, fpn=_T.fpn_channels, rep=_T.representation_size,
            mask_layers=list(_T.mask_layers), mask_dim=_T.mask_dim_reduced, sizes=_T.anchor_sizes,
            min_size=_T.min_size, max_size=_T.max_size, depths=list(_T.depths),
            width_per_group=_T.width_per_group,
            rpn=dict(rpn_pre_nms_top_n_train=_T.rpn_pre_nms_top_n_train,
                     rpn_pre_nms_top_n_test=_T.rpn_pre_nms_top_n_test,
                     rpn_post_nms_top_n_train=_T.rpn_post_nms_top_n_train,
                     rpn_post_nms_top_n_test=_T.rpn_post_nms_top_n_test,
                     rpn_batch_size_per_image=_T.rpn_batch_size_per_image),
            box=dict(box_batch_size_per_image=_T.box_batch_size_per_image,
                     box_detections_per_img=_T.box_detections_per_img))


def randomize_(model: torch.nn.Module, seed: int = 0, cls_scale: float = 1.0) -> torch.nn.Module:
    """Non-trivial frozen-BN statistics and spread head outputs, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                c = m.weight.shape[0]
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        head = model.rpn.head
        head.cls_logits.weight.normal_(0, 0.05, generator=g)
        head.cls_logits.bias.normal_(0, 0.5, generator=g)
        head.bbox_pred.weight.normal_(0, 0.01, generator=g)
        pred = model.roi_heads.box_predictor
        pred.cls_score.weight.mul_(cls_scale)
        pred.bbox_pred.weight.normal_(0, 0.01, generator=g)
        for m in model.modules():  # torch zero-inits conv biases: give them values too
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None and not m.bias.abs().sum():
                m.bias.normal_(0, 0.01, generator=g)
    return model


def tiny_torch(seed: int = 0, v2: bool = False, **kw) -> MaskRCNN:
    """torchvision MaskRCNN shaped like `mask_rcnn_tiny` (FrozenBatchNorm2d eps 1e-5), or
    with `v2` like maskrcnn_resnet50_fpn_v2 (nn.BatchNorm2d everywhere, BN in FPN and
    heads, 2-conv RPN head, conv+fc box head), narrow."""
    torch.manual_seed(seed)
    t = TINY
    norm = torch.nn.BatchNorm2d if v2 else FrozenBatchNorm2d
    body = resnet.ResNet(resnet.Bottleneck, t["depths"], width_per_group=t["width_per_group"], norm_layer=norm)
    backbone = BackboneWithFPN(body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [256, 512, 1024, 2048], t["fpn"], norm_layer=torch.nn.BatchNorm2d if v2 else None)
    if v2:
        heads = dict(rpn_head=RPNHead(t["fpn"], 3, conv_depth=2),
                     box_head=FastRCNNConvFCHead((t["fpn"], 7, 7), [t["fpn"]] * 2, [t["rep"]], norm),
                     mask_head=MaskRCNNHeads(t["fpn"], t["mask_layers"], 1, norm_layer=norm))
    else:
        heads = dict(rpn_head=RPNHead(t["fpn"], 3), box_head=TwoMLPHead(t["fpn"] * 49, t["rep"]),
                     mask_head=MaskRCNNHeads(t["fpn"], t["mask_layers"], 1))
    anchors = AnchorGenerator(t["sizes"], ((0.5, 1.0, 2.0),) * 5)
    c = t["num_classes"]
    model = MaskRCNN(
        backbone, num_classes=None, min_size=t["min_size"], max_size=t["max_size"],
        rpn_anchor_generator=anchors, rpn_head=heads["rpn_head"], **t["rpn"],
        box_head=heads["box_head"], box_predictor=FastRCNNPredictor(t["rep"], c), **t["box"],
        mask_head=heads["mask_head"],
        mask_predictor=MaskRCNNPredictor(t["mask_layers"][-1], t["mask_dim"], c), **kw)
    return randomize_(model.eval(), seed, cls_scale=4.0)


def r50_torch(seed: int = 0, kind: str = "coco", eps: float = 0.0, cls_scale: float = 10.0, **kw) -> MaskRCNN:
    """A randomly initialised ResNet-50-FPN Mask R-CNN.

    kind: "coco": as the COCO weights build it (FrozenBatchNorm2d with `eps`, 0 like the
      legacy weights; trainable_layers 3); "builder": `maskrcnn_resnet50_fpn(weights=None,
      weights_backbone=None)` (nn.BatchNorm2d, eps 1e-5); "v2": `maskrcnn_resnet50_fpn_v2(
      weights=None, weights_backbone=None)`.
    """
    from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

    torch.manual_seed(seed)
    if kind == "coco":
        body = resnet.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        model = MaskRCNN(_resnet_fpn_extractor(body, 3), num_classes=91, **kw)
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = eps
    else:
        build = maskrcnn_resnet50_fpn if kind == "builder" else maskrcnn_resnet50_fpn_v2
        model = build(weights=None, weights_backbone=None, **kw)
    model = randomize_(model.eval(), seed, cls_scale=cls_scale)
    # A random ResNet-50 body gives FPN maps of magnitude ~300 (a trained one ~1): scale
    # the FPN output layers so that RPN deltas and head logits are in a realistic range.
    with torch.no_grad():
        il, _ = model.transform([to_tensor(chelsea())])
        feats = model.backbone(il.tensors)
        for blk, f in zip(model.backbone.fpn.layer_blocks, list(feats.values())[:4]):
            s = float(f.abs().mean())
            last = blk[1] if len(blk) > 1 else blk[0]  # the BN (v2) or the conv
            last.weight.div_(s)
            last.bias.div_(s)
    return model


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float CHW in [0, 1] (what torchvision's detection models take)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def det_sampler_torch(batch_size: int, fraction: float):
    """Deterministic BalancedPositiveNegativeSampler: the first candidates by index."""
    def call(matched_idxs):
        pos_out, neg_out = [], []
        for m in matched_idxs:
            pos = torch.where(m >= 1)[0]
            neg = torch.where(m == 0)[0]
            npos = min(int(batch_size * fraction), pos.numel())
            nneg = min(batch_size - npos, neg.numel())
            p = torch.zeros_like(m, dtype=torch.uint8)
            n = torch.zeros_like(m, dtype=torch.uint8)
            p[pos[:npos]] = 1
            n[neg[:nneg]] = 1
            pos_out.append(p)
            neg_out.append(n)
        return pos_out, neg_out
    return call


def det_sampler_jax(labels, num_samples: int, positive_fraction: float, rng):
    """`matcher.sample_balanced` made deterministic like `det_sampler_torch` (the first
    candidates by index; `rng` unused): labels (N,) int (1 fg, 0 bg, -1 ignore) ->
    (pos (N,) bool, neg (N,) bool)."""
    import jax.numpy as jnp

    pos, neg = labels >= 1, labels == 0
    npos = jnp.minimum(pos.sum(), int(num_samples * positive_fraction))
    nneg = jnp.minimum(neg.sum(), num_samples - npos)
    return pos & (jnp.cumsum(pos) <= npos), neg & (jnp.cumsum(neg) <= nneg)


def train_forward(model: MaskRCNN, images: list[torch.Tensor], targets: list[dict]) -> tuple[dict, list, object, list]:
    """torchvision's train-mode forward with both balanced samplers replaced by
    `det_sampler_torch` (the model's batch sizes and fractions); autograd stays on.

    images: (3, H, W) floats in [0, 1]; targets: torchvision's dicts (boxes, labels, masks).
    Returns (losses {name: 0-d tensor}, RPN proposals [(P_i, 4)] (detached), the
    transformed ImageList, the transformed targets).
    """
    model.train()
    model.rpn.fg_bg_sampler = det_sampler_torch(model.rpn.fg_bg_sampler.batch_size_per_image,
                                                model.rpn.fg_bg_sampler.positive_fraction)
    model.roi_heads.fg_bg_sampler = det_sampler_torch(model.roi_heads.fg_bg_sampler.batch_size_per_image,
                                                      model.roi_heads.fg_bg_sampler.positive_fraction)
    captured = {}

    def keep_proposals(mod, args, out):
        captured["props"] = [p.detach() for p in out[0]]  # returns None: the output is unchanged

    hook = model.rpn.register_forward_hook(keep_proposals)
    try:
        with torch.no_grad():
            il, tt = model.transform(list(images), [{k: v.clone() for k, v in t.items()} for t in targets])
        losses = model(list(images), targets)
    finally:
        hook.remove()
    return losses, captured["props"], il, tt


def batch_from_torch(il, tt, segjax_model, max_instances: int) -> dict[str, np.ndarray]:
    """The segjax training batch of torchvision's transformed images and targets: the
    padded frame, RGB 0-255 (the normalisation undone; `MaskRCNN.normalize` zeroes the
    padding again), instances padded to `max_instances` with `valid`."""
    x = il.tensors.numpy()  # (B, 3, Hp, Wp) normalised, padded with zeros
    b, _, hp, wp = x.shape
    mean, std = np.array(segjax_model.image_mean), np.array(segjax_model.image_std)
    image = (x.transpose(0, 2, 3, 1) * std + mean) * 255.0
    boxes = np.zeros((b, max_instances, 4), np.float32)
    labels = np.zeros((b, max_instances), np.int32)
    masks = np.zeros((b, max_instances, hp, wp), np.uint8)
    valid = np.zeros((b, max_instances), bool)
    for i, ((rh, rw), t) in enumerate(zip(il.image_sizes, tt)):
        n = len(t["boxes"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = t["boxes"].numpy(), t["labels"].numpy(), True
        masks[i, :n, :rh, :rw] = t["masks"].numpy()
    return {"image": image.astype(np.float32), "image_hw": np.asarray(il.image_sizes, np.int32),
            "boxes": boxes, "labels": labels, "masks": masks, "valid": valid}


def padded_proposals(props: list[torch.Tensor], n: int) -> dict[str, np.ndarray]:
    """Per-image proposals [(P_i, 4)] -> dict(boxes (B, n, 4), valid (B, n))."""
    boxes = np.zeros((len(props), n, 4), np.float32)
    valid = np.zeros((len(props), n), bool)
    for i, p in enumerate(props):
        boxes[i, :len(p)], valid[i, :len(p)] = p.numpy(), True
    return {"boxes": boxes, "valid": valid}


def losses_given_proposals(segjax_model, params, batch: dict, proposals: dict, rng):
    """segjax's train losses with the RoI stage on given proposals (torchvision's):
    (total, metrics) like `MaskRCNN.losses`, differentiable in `params`."""
    def run(m, batch, proposals, rng):
        feats = m.features(batch["image"], batch["image_hw"])
        l_rpn, metrics, _ = m.rpn_losses(feats, batch, rng)
        l_roi, m_roi = m.roi_losses(feats, proposals, batch, rng)
        return l_rpn + l_roi, {**metrics, **m_roi}
    return segjax_model.apply({"params": params}, batch, proposals, rng, method=run)
