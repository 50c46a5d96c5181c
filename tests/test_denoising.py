"""Denoising queries: mask, noise bounds, flip rate, bookkeeping, no leakage, empty batches.

The network-level tests run for every variant with denoising: DETR, DN-DETR, RT-DETRv2, DINO.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from detr_lineage import denoising
from detr_lineage.boxes import cxcywh_to_xyxy
from detr_lineage.criterion import SetCriterion
from detr_lineage.denoising import (
    DenoisingConfig,
    attention_mask,
    make_denoising_queries,
    noise_boxes,
)
from detr_lineage.matcher import HungarianMatcher
from detr_lineage.models.detr import DenoisingQueryPosition, DETRConfig, DETRNet
from detr_lineage.models.dino import DINOConfig, DINONet
from detr_lineage.models.dn_detr import DNDETRConfig, DNDETRNet
from detr_lineage.models.rtdetr_v2 import RTDETRv2Config, RTDETRv2Net
from detr_lineage.nn.backbone import BackboneConfig
from detr_lineage.nn.position import sine_encoding_of_boxes


def target(labels: list[int], boxes: list[list[float]], image_id: int = 0) -> dict:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "image_id": image_id,
        "orig_size": torch.tensor([64, 64]),
    }


ONE_AND_THREE = [
    target([1], [[0.5, 0.5, 0.2, 0.2]], 0),
    target([0, 2, 3], [[0.3, 0.3, 0.2, 0.1], [0.6, 0.6, 0.1, 0.3], [0.7, 0.2, 0.2, 0.2]], 1),
]


def test_attention_mask_hand_made_case():
    """Two images with 1 and 3 objects, 2 groups: M = 3 slots per group, 2 matching queries."""
    q = make_denoising_queries(ONE_AND_THREE, DenoisingConfig(groups=2), 4, num_matching=2)
    x, o = True, False  # x = blocked
    expected = torch.tensor(
        [
            # group 0 (3)  group 1 (3)   matching (2)
            [o, o, o, x, x, x, o, o],
            [o, o, o, x, x, x, o, o],
            [o, o, o, x, x, x, o, o],
            [x, x, x, o, o, o, o, o],
            [x, x, x, o, o, o, o, o],
            [x, x, x, o, o, o, o, o],
            [x, x, x, x, x, x, o, o],
            [x, x, x, x, x, x, o, o],
        ]
    )
    assert torch.equal(q.attn_mask, expected)
    assert q.labels.shape == (2, 6) and q.boxes.shape == (2, 6, 4)
    # image 0 has one object: slots 1, 2 of each group are padding
    assert q.labels[0].tolist()[1:3] == [4, 4] and q.labels[0].tolist()[4:6] == [4, 4]
    assert torch.all(q.boxes[0, [1, 2, 4, 5]] == 0.5)
    meta = q.meta
    assert (meta.num_groups, meta.slots_per_group, meta.num_queries) == (2, 3, 6)
    assert meta.indices[0][0].tolist() == [0, 3] and meta.indices[0][1].tolist() == [0, 0]
    assert meta.indices[1][0].tolist() == [0, 1, 2, 3, 4, 5]
    assert meta.indices[1][1].tolist() == [0, 1, 2, 0, 1, 2]
    # the class loss counts the valid positive slots only (DN-DETR)
    assert meta.class_mask.tolist() == [[x, o, o, x, o, o], [x] * 6]


def test_contrastive_layout_and_mask():
    cfg = DenoisingConfig(query_budget=6, contrastive=True, label_noise=0.0, box_noise=0.0)
    q = make_denoising_queries(ONE_AND_THREE, cfg, 4, num_matching=2)
    # M = 3 -> 6 // 3 = 2 groups of 3 positives + 3 negatives
    assert (q.meta.num_groups, q.meta.slots_per_group, q.meta.num_queries) == (2, 6, 12)
    assert q.meta.class_mask is None  # negatives and padding are trained toward no-object
    assert torch.equal(q.attn_mask, attention_mask(2, 6, 2))
    assert q.meta.indices[1][0].tolist() == [0, 1, 2, 6, 7, 8]  # positives only
    assert q.labels[1].tolist() == [0, 2, 3, 0, 2, 3] * 2  # no noise: clean copies


def test_box_noise_bounds_dn_detr():
    torch.manual_seed(0)
    lam = 0.4
    boxes = torch.rand(20000, 4) * torch.tensor([0.2, 0.2, 0.2, 0.2]) + torch.tensor(
        [0.4, 0.4, 0.05, 0.05]
    )  # central boxes: clamping to [0, 1] never acts
    noisy = noise_boxes(boxes, DenoisingConfig(box_noise=lam), torch.zeros(20000, dtype=bool), None)
    shift = (noisy[:, :2] - boxes[:, :2]).abs() / (boxes[:, 2:] / 2)
    scale = noisy[:, 2:] / boxes[:, 2:]
    assert shift.max() <= lam + 1e-5 and shift.max() > 0.95 * lam
    assert scale.min() >= 1 - lam - 1e-5 and scale.max() <= 1 + lam + 1e-5
    assert scale.min() < 1 - 0.95 * lam and scale.max() > 1 + 0.95 * lam


def test_box_noise_bounds_contrastive():
    torch.manual_seed(0)
    lam = 1.0
    n = 20000
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.1]]).repeat(n, 1)
    negative = torch.arange(n) % 2 == 1
    cfg = DenoisingConfig(box_noise=lam, contrastive=True)
    noisy = noise_boxes(boxes, cfg, negative, None)
    moved = (cxcywh_to_xyxy(noisy) - cxcywh_to_xyxy(boxes)).abs() / 0.05  # in units of wh/2
    # positives: |r| < 1; negatives: 1 <= |r| < 2 (corners of crossed boxes collapse: skip them)
    ok = noisy[:, 2:].gt(0).all(1)
    assert moved[~negative & ok].max() <= lam + 1e-4
    assert moved[negative & ok].min() >= lam - 1e-4 and moved[negative & ok].max() <= 2 * lam + 1e-4


def test_label_flip_rate_matches_config():
    num_classes, p, n = 10, 0.2, 400
    t = [target([3] * n, [[0.5, 0.5, 0.2, 0.2]] * n)]
    g = torch.Generator().manual_seed(0)
    q = make_denoising_queries(t, DenoisingConfig(groups=50, label_noise=p), num_classes, 1, g)
    changed = (q.labels != 3).float().mean().item()
    expected = p * (num_classes - 1) / num_classes  # a flip may redraw the same class
    draws = n * 50
    assert abs(changed - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)
    flipped_to = q.labels[q.labels != 3]
    counts = torch.bincount(flipped_to, minlength=num_classes).float()
    counts[3] = float("nan")
    assert counts.nanmean() > 0 and (counts[counts == counts] > 0).all()  # every other class


def tiny_net(denoising: DenoisingConfig | None, variant: str = "dn_detr", num_classes: int = 4):
    """A tiny network of ``variant`` (detr | dn_detr | rtdetr_v2 | dino), 5 matching queries."""
    torch.manual_seed(0)
    common = dict(num_classes=num_classes, nhead=4, num_decoder_layers=2, dim_feedforward=64)
    if variant == "dino":
        backbone = BackboneConfig("conv", channels=[8, 16, 32, 32], return_strides=[4, 8, 16])
        return DINONet(DINOConfig(
            backbone=backbone,
            d_model=32,
            num_encoder_layers=1,
            num_queries=5,
            denoising=denoising,
            **common,
        ))  # fmt: skip
    if variant == "rtdetr_v2":
        backbone = BackboneConfig("conv", channels=[8, 16, 32, 32], return_strides=[4, 8, 16])
        return RTDETRv2Net(RTDETRv2Config(
            backbone=backbone,
            hidden_dim=32,
            encoder_dim=32,
            encoder_dim_feedforward=64,
            expansion=0.5,
            depth_mult=0.34,
            num_queries=5,
            denoising=denoising,
            **common,
        ))  # fmt: skip
    cls, config = (DETRNet, DETRConfig) if variant == "detr" else (DNDETRNet, DNDETRConfig)
    return cls(config(
        backbone=BackboneConfig(name="conv", channels=[8, 16], return_strides=[4], frozen_bn=False),
        d_model=32,
        num_encoder_layers=1,
        dropout=0.0,
        num_queries=5,
        denoising=denoising,
        **common,
    ))  # fmt: skip


def criterion(variant: str, num_classes: int = 4) -> SetCriterion:
    """Each variant's class loss (DETR: CE + eos_coef, DN-DETR / DINO: focal, RT-DETRv2: VFL)."""
    if variant == "detr":
        return SetCriterion(num_classes, HungarianMatcher(1, 5, 2, "softmax"), "ce", 1, 5, 2, 0.1)
    if variant in ("dn_detr", "dino"):
        matcher = HungarianMatcher(2, 5, 2, "focal")
        return SetCriterion(num_classes, matcher, "focal", 1, 5, 2, alpha=0.25, gamma=2)
    matcher = HungarianMatcher(2, 5, 2, "focal")
    return SetCriterion(num_classes, matcher, "vfl", 1, 5, 2, alpha=0.75, gamma=2)


VARIANTS = ["detr", "dn_detr", "rtdetr_v2", "dino"]
IMAGES, MASKS = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("contrastive", [False, True])
def test_no_leakage_between_groups_and_into_matching(monkeypatch, variant, contrastive):
    cfg = DenoisingConfig(groups=2, contrastive=contrastive)
    net = tiny_net(cfg, variant).train()
    base = make_denoising_queries(ONE_AND_THREE, cfg, 4, 5)
    slots = base.meta.slots_per_group
    changed = copy.deepcopy(base)
    group1 = slice(slots, 2 * slots)
    changed.labels[:, group1] = (changed.labels[:, group1] + 1) % 4
    changed.boxes[:, group1] = torch.rand_like(changed.boxes[:, group1]) * 0.5 + 0.25
    outs = []
    for q in (base, changed):
        monkeypatch.setattr(
            f"detr_lineage.models.{variant}.make_denoising_queries", lambda *a, q=q, **k: q
        )
        outs.append(net(IMAGES, MASKS, ONE_AND_THREE))
    a, b = outs
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-6)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(
            a["dn_outputs"][key][:, :slots], b["dn_outputs"][key][:, :slots], rtol=0, atol=1e-6
        )
        assert not torch.allclose(a["dn_outputs"][key][:, slots:], b["dn_outputs"][key][:, slots:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_matching_outputs_do_not_depend_on_denoising_targets(variant):
    net = tiny_net(DenoisingConfig(groups=3), variant).train()
    other = [target([2], [[0.2, 0.7, 0.3, 0.2]]), target([1, 1], [[0.5, 0.5, 0.4, 0.4]] * 2)]
    a = net(IMAGES, MASKS, ONE_AND_THREE)
    b = net(IMAGES, MASKS, other)
    assert a["dn_outputs"]["pred_logits"].shape[1] == 3 * 3
    assert b["dn_outputs"]["pred_logits"].shape[1] == 3 * 2
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_has_no_denoising_and_ignores_targets(variant):
    net = tiny_net(DenoisingConfig(), variant).eval()
    with torch.no_grad():
        a = net(IMAGES, MASKS)
        b = net(IMAGES, MASKS, ONE_AND_THREE)
        torch.manual_seed(0)
        vanilla = tiny_net(None, variant).eval()
        vanilla.load_state_dict(net.state_dict(), strict=False)
        c = vanilla(IMAGES, MASKS)
    assert "dn_outputs" not in a and "dn_outputs" not in b
    assert a["pred_logits"].shape[:2] == (2, 5)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
        assert torch.equal(a[key], c[key])  # the same weights without denoising parts


def recompute_dn_losses(variant: str, out: dict, targets: list[dict], cfg: DenoisingConfig):
    """DN class / L1 / GIoU terms of the last layer, slot by slot from the clean targets."""
    dn = out["dn_outputs"]
    logits, boxes = dn["pred_logits"].detach(), dn["pred_boxes"].detach()
    num_classes = 4
    m = max(len(t["labels"]) for t in targets)
    parts = 2 if cfg.contrastive else 1
    slots = parts * m
    num = cfg.groups * sum(len(t["labels"]) for t in targets)
    cls = l1 = giou = 0.0
    ce_weight = 0.0
    for i, t in enumerate(targets):
        for g in range(cfg.groups):
            for s in range(g * slots, (g + 1) * slots):
                k = s - g * slots
                positive = k < len(t["labels"])
                if not positive and not cfg.contrastive:
                    continue  # negatives and padding only count in contrastive denoising
                label = int(t["labels"][k]) if positive else num_classes  # num_classes: none
                if variant == "detr":
                    w = 1.0 if label < num_classes else 0.1  # eos_coef
                    ce = -torch.log_softmax(logits[i, s], -1)[label].item()
                    cls += w * ce
                    ce_weight += w
                else:
                    onehot = torch.zeros(num_classes)
                    if label < num_classes:
                        onehot[label] = 1
                    cls += sigmoid_focal_loss(logits[i, s], onehot, 0.25, 2, "sum").item()
                if positive:
                    l1 += (boxes[i, s] - t["boxes"][k]).abs().sum().item()
                    pair = cxcywh_to_xyxy(torch.stack([boxes[i, s], t["boxes"][k]]))
                    giou += 1 - generalized_box_iou(pair[:1], pair[1:]).item()
    cls = cls / ce_weight if variant == "detr" else cls / num
    return cls, 5 * l1 / num, 2 * giou / num


@pytest.mark.parametrize(
    "variant,contrastive",
    [(v, c) for v in ("detr", "dn_detr", "dino") for c in (False, True)],
)
def test_dn_loss_equals_slot_by_slot_recomputation(variant, contrastive):
    """Recompute the DN terms slot by slot from the clean targets, without the meta indices."""
    torch.manual_seed(1)
    cfg = DenoisingConfig(groups=2, contrastive=contrastive)
    net = tiny_net(cfg, variant).train()
    out = net(IMAGES, MASKS, ONE_AND_THREE)
    losses = criterion(variant)(out, ONE_AND_THREE)
    cls, l1, giou = recompute_dn_losses(variant, out, ONE_AND_THREE, cfg)
    assert losses["loss_dn_class"].item() == pytest.approx(cls, rel=1e-5)
    assert losses["loss_dn_bbox"].item() == pytest.approx(l1, rel=1e-5)
    assert losses["loss_dn_giou"].item() == pytest.approx(giou, rel=1e-5)
    assert {"loss_dn_class_aux0", "loss_dn_bbox_aux0", "loss_dn_giou_aux0"} <= set(losses)
    assert losses["loss_dn_class_aux0"].item() != losses["loss_dn_class"].item()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("contrastive", [False, True])
def test_empty_batch_trains_and_keeps_the_same_parameters_in_the_graph(variant, contrastive):
    """An all-empty batch must touch the same parameters as a normal one (DDP stays in step)."""
    net = tiny_net(DenoisingConfig(groups=2, contrastive=contrastive), variant).train()
    crit = criterion(variant)
    empty = [target([], []), target([], [], 1)]

    def params_with_grad(targets: list[dict]) -> set[str]:
        net.zero_grad(set_to_none=True)
        losses = crit(net(IMAGES, MASKS, targets), targets)
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        assert all(torch.isfinite(g).all() for g in grads.values())
        return set(grads)

    with_objects = params_with_grad(ONE_AND_THREE)
    assert any("dn_query_pos" in n or "label_embed" in n or "denoising" in n for n in with_objects)
    assert params_with_grad(empty) == with_objects


def test_detr_denoising_query_position_combine_modes():
    """sum: label embedding + projected box sine; concat: one projection of both; bad: error."""
    torch.manual_seed(0)
    labels, boxes = torch.tensor([[0, 4]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 2])
    summed = DenoisingQueryPosition(4, 32, "sum")
    sine = sine_encoding_of_boxes(boxes, 16)
    expected = summed.label_embed.weight[[0, 4]][None] + sine @ summed.proj.weight.T
    torch.testing.assert_close(summed(labels, boxes), expected + summed.proj.bias)
    assert summed.label_embed.num_embeddings == 5  # num_classes + 1 (padding)
    concat = DenoisingQueryPosition(4, 32, "concat")
    assert concat.proj.in_features == 32 + 64
    both = torch.cat([concat.label_embed.weight[[0, 4]][None], sine], -1)
    torch.testing.assert_close(
        concat(labels, boxes), both @ concat.proj.weight.T + concat.proj.bias
    )
    with pytest.raises(ValueError, match="dn_combine"):
        DenoisingQueryPosition(4, 32, "product")


def test_config_validation():
    with pytest.raises(ValueError, match="label_noise"):
        DenoisingConfig(label_noise=1.5)
    with pytest.raises(ValueError, match="groups"):
        DenoisingConfig(groups=0)
    assert denoising.DenoisingConfig().groups == 5
