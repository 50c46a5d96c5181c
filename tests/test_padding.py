"""Padding invariance: an image alone and the same image padded inside a larger batch give the
same detections, for every variant that takes a padding mask (DETR with and without
denoising, DN-DETR / DAB-DETR, Conditional DETR, Deformable DETR (+ box refinement, two-stage),
DINO).

What holds exactly, and why:
- the whole model on the toy trunk, for images whose sides are multiples of its stride (16):
  a stride-2 3x3 conv with padding 1 reads input rows 2i-1..2i+1, so at even sizes it never
  reads past a bottom/right edge, and the padding (zero after normalisation) never reaches a
  valid feature; the rest (mask downsampling, sine positions counted over valid cells,
  key-padding masks in the encoder and the decoder's cross-attention; for the multi-scale
  variants valid ratios, masked values and proposals) must then remove the padded cells'
  influence entirely. Multi-scale variants add a stride-32 level (sides: multiples of 32) and
  a GroupNorm per level over the padded map, which the test removes (see below).
  Tolerance 1e-5: float32 sums over a different number of zero-weighted keys.
- the transformer given backbone features + mask, for any trunk (here ResNet-50): a ResNet's
  7x7 stem and 3x3 convs do read past the edge, so the whole ResNet model is not padding
  invariant (nor is the official DETR: its padded pixels enter the border features); the
  features are therefore fed in directly, padded with garbage.
RT-DETRv2 takes no mask: its recipe resizes every image to one square size, so its batches are
never padded (checked at the end).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lineage.data.collate import collate_detection
from detr_lineage.data.transforms import build_transform
from detr_lineage.lit import DETR, DNDETR
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

from .helpers import ROOT, build, parse

MASKED_VARIANTS = {
    "detr": ("experiments/toy/detr.yaml", ()),
    "detr_dn": ("experiments/toy/detr.yaml", ("--model.init_args.net.denoising={}",)),
    "dn_detr": ("experiments/toy/dn_detr.yaml", ()),
    "conditional_detr": ("experiments/toy/conditional_detr.yaml", ()),
    # multi-scale: the 4th level is a stride-2 conv on stride 16, so sides are multiples of 32
    "deformable_detr": ("experiments/toy/deformable_detr.yaml", ()),
    "deformable_detr_two_stage": (
        "experiments/toy/deformable_detr.yaml",
        ("--model.init_args.net.box_refine=true", "--model.init_args.net.two_stage=true"),
    ),
    "dino": ("experiments/toy/dino.yaml", ()),
}
CASES = [
    (name, size)
    for name in MASKED_VARIANTS
    for size in (
        [(64, 32), (32, 64)] if "deformable" in name or name == "dino" else [(48, 32), (32, 64)]
    )
]


def _without_group_norm(module: nn.Module) -> None:
    """Deformable DETR / DINO normalise each level's input projection with GroupNorm, whose
    statistics cover the padded cells: not padding invariant, in the official code as here.
    Everything after it must be, so the test removes it (it does not touch the mask)."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_group_norm(child)


def _toy_module(name: str):
    config, args = MASKED_VARIANTS[name]
    parser, cfg = parse(ROOT / config, args=args)
    torch.manual_seed(0)
    model, _, _ = build(parser, cfg)
    _without_group_norm(model.net)
    # a trained-looking network: no zero-initialised weights (box heads), so that the boxes
    # depend on the features
    with torch.no_grad():
        for p in model.net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model.eval()


def _alone_and_padded(size: tuple[int, int], batch_size: tuple[int, int]):
    torch.manual_seed(1)
    h, w = size
    image = torch.rand(3, h, w)
    other = torch.rand(3, *batch_size)
    alone = collate_detection([(image, {})])
    padded = collate_detection([(other, {}), (image, {})])
    assert padded["masks"][1].sum() == batch_size[0] * batch_size[1] - h * w
    return alone, padded


@pytest.mark.parametrize("name, size", CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in CASES])
def test_whole_model_is_padding_invariant_on_the_toy_trunk(name, size):
    model = _toy_module(name)
    alone, padded = _alone_and_padded(size, (96, 128))
    with torch.no_grad():
        a = model(alone["images"], alone["masks"])
        b = model(padded["images"], padded["masks"])
        dropped = model(padded["images"], torch.zeros_like(padded["masks"]))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key][1], a[key][0], rtol=0, atol=1e-5, msg=key)
        # the check has teeth: without the mask the padding changes the outputs
        assert (dropped[key][1] - a[key][0]).abs().max() > 1e-3, key
    # ... and so do the detections in the image's own pixels
    t = {"orig_size": torch.tensor(size)}
    da, db = (
        model.detections(a, [t]),
        model.detections({k: v[1:] for k, v in b.items() if k.startswith("pred")}, [t]),
    )
    torch.testing.assert_close(db[0]["boxes"], da[0]["boxes"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("cls", [DETR, DNDETR], ids=["detr", "dn_detr"])
def test_transformer_given_features_and_mask_ignores_the_padding(cls):
    """ResNet-50 trunk (the COCO configs'): features of the image alone vs the same features
    inside a larger map whose padded cells hold garbage."""
    torch.manual_seed(0)
    model = make_module(
        cls,
        5,
        backbone=BackboneConfig("resnet50", return_strides=[32]),
        d_model=64,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        num_queries=10,
    ).eval()
    with torch.no_grad():
        model.net.box_head.layers[-1].weight.normal_(0, 0.1)
    backbone = model.net.encoder.backbone
    image = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        feat = backbone(image)[-1]  # [1,2048,3,2]
    garbage = torch.randn(2, feat.shape[1], 5, 4) * 3
    garbage[1, :, :3, :2] = feat[0]
    masks = torch.ones(2, 160, 128, dtype=torch.bool)
    masks[0] = False
    masks[1, :96, :64] = False

    def run(features, masks):
        backbone.forward = lambda images, masks=None: [features]
        try:
            with torch.no_grad():
                return model(torch.zeros(len(features), 3, *masks.shape[1:]), masks)
        finally:
            del backbone.forward

    a = run(feat, torch.zeros(1, 96, 64, dtype=torch.bool))
    b = run(garbage, masks)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key][1], a[key][0], rtol=0, atol=1e-5, msg=key)


def test_rtdetr_recipe_never_pads():
    """RT-DETRv2 ignores masks: its recipes give every image the same square size."""
    shapes = set()
    for train in (True, False):
        transform = build_transform("rtdetr", train=train, rtdetr_size=64, seed=0)
        for h, w in [(30, 50), (70, 20), (64, 64)]:
            image = (torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()
            boxes = torch.tensor([[2.0, 3.0, 18.0, 19.0]]).numpy()
            shapes.add(transform(image, boxes, torch.tensor([0]).numpy())[0].shape)
    assert shapes == {(64, 64, 3)}
