"""Denoising queries: mask, noise bounds, flip rate, bookkeeping, no leakage, empty batches."""

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
from detr_lineage.models.dn_detr import DNDETRNet
from detr_lineage.nn.backbone import BackboneConfig


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


def tiny_net(denoising: DenoisingConfig | None, num_classes: int = 4) -> DNDETRNet:
    torch.manual_seed(0)
    return DNDETRNet(
        num_classes,
        BackboneConfig(name="conv", channels=[8, 16], return_strides=[4], frozen_bn=False),
        d_model=32,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        num_queries=5,
        denoising=denoising,
    )


def test_no_leakage_between_groups_and_into_matching(monkeypatch):
    net = tiny_net(DenoisingConfig(groups=2)).train()
    images, masks = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    base = make_denoising_queries(ONE_AND_THREE, net.denoising, 4, 5)
    changed = copy.deepcopy(base)
    group1 = slice(3, 6)
    changed.labels[:, group1] = (changed.labels[:, group1] + 1) % 4
    changed.boxes[:, group1] = torch.rand_like(changed.boxes[:, group1]) * 0.5 + 0.25
    outs = []
    for q in (base, changed):
        monkeypatch.setattr(
            "detr_lineage.models.dn_detr.make_denoising_queries", lambda *a, q=q, **k: q
        )
        outs.append(net(images, masks, ONE_AND_THREE))
    a, b = outs
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-6)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(
            a["dn_outputs"][key][:, :3], b["dn_outputs"][key][:, :3], rtol=0, atol=1e-6
        )
        assert not torch.allclose(a["dn_outputs"][key][:, 3:], b["dn_outputs"][key][:, 3:])


def test_matching_outputs_do_not_depend_on_denoising_targets():
    net = tiny_net(DenoisingConfig(groups=3)).train()
    images, masks = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    other = [target([2], [[0.2, 0.7, 0.3, 0.2]]), target([1, 1], [[0.5, 0.5, 0.4, 0.4]] * 2)]
    a = net(images, masks, ONE_AND_THREE)
    b = net(images, masks, other)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-6)


def test_inference_has_no_denoising_and_ignores_targets():
    net = tiny_net(DenoisingConfig()).eval()
    images, masks = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        a = net(images, masks)
        b = net(images, masks, ONE_AND_THREE)
    assert "dn_outputs" not in a and "dn_outputs" not in b
    assert a["pred_logits"].shape == (2, 5, 4)
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_dn_loss_equals_set_loss_with_known_assignment():
    """Recompute the DN terms slot by slot from the clean targets, without the meta indices."""
    torch.manual_seed(1)
    groups, num_classes = 2, 4
    net = tiny_net(DenoisingConfig(groups=groups)).train()
    images, masks = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    out = net(images, masks, ONE_AND_THREE)
    matcher = HungarianMatcher(2, 5, 2, "focal")
    crit = SetCriterion(num_classes, matcher, "focal", 1, 5, 2, alpha=0.25, gamma=2)
    losses = crit(out, ONE_AND_THREE)
    dn = out["dn_outputs"]
    logits, boxes = dn["pred_logits"].detach(), dn["pred_boxes"].detach()
    slots = 3  # largest image has 3 objects
    num = groups * 4  # groups x total objects in the batch
    cls = l1 = giou = 0.0
    for i, t in enumerate(ONE_AND_THREE):
        for g in range(groups):
            for k in range(len(t["labels"])):
                s = g * slots + k
                onehot = torch.zeros(num_classes)
                onehot[t["labels"][k]] = 1
                cls += sigmoid_focal_loss(logits[i, s], onehot, 0.25, 2, "sum").item()
                l1 += (boxes[i, s] - t["boxes"][k]).abs().sum().item()
                pair = cxcywh_to_xyxy(torch.stack([boxes[i, s], t["boxes"][k]]))
                giou += 1 - generalized_box_iou(pair[:1], pair[1:]).item()
    assert losses["loss_dn_class"].item() == pytest.approx(cls / num, rel=1e-5)
    assert losses["loss_dn_bbox"].item() == pytest.approx(5 * l1 / num, rel=1e-5)
    assert losses["loss_dn_giou"].item() == pytest.approx(2 * giou / num, rel=1e-5)
    assert "loss_dn_class_aux0" in losses


def test_empty_batch_trains_and_keeps_the_same_parameters_in_the_graph():
    """An all-empty batch must touch the same parameters as a normal one (DDP stays in step)."""
    net = tiny_net(DenoisingConfig(groups=2)).train()
    crit = SetCriterion(4, HungarianMatcher(2, 5, 2, "focal"), "focal")
    images, masks = torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool)
    empty = [target([], []), target([], [], 1)]

    def params_with_grad(targets: list[dict]) -> set[str]:
        net.zero_grad(set_to_none=True)
        losses = crit(net(images, masks, targets), targets)
        assert all(torch.isfinite(v) for v in losses.values())
        losses["loss"].backward()
        return {n for n, p in net.named_parameters() if p.grad is not None}

    assert params_with_grad(empty) == params_with_grad(ONE_AND_THREE)


def test_config_validation():
    with pytest.raises(ValueError, match="label_noise"):
        DenoisingConfig(label_noise=1.5)
    with pytest.raises(ValueError, match="groups"):
        DenoisingConfig(groups=0)
    assert denoising.DenoisingConfig().groups == 5
