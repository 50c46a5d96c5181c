"""Box conversions, paired IoU/GIoU and inverse_sigmoid against torchvision and hand values."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from detr_lineage.boxes import (
    cxcywh_to_xyxy,
    inverse_sigmoid,
    paired_giou,
    paired_iou,
    xyxy_to_cxcywh,
)


def random_cxcywh(n: int, seed: int, min_size: float = 0.1) -> torch.Tensor:
    """``[n,4]`` float64 cxcywh boxes; centres in [0.1, 0.9], sides in [min_size, 0.5].

    Spread wide enough that many pairs do not overlap (negative GIoU) and some are nested.
    """
    g = torch.Generator().manual_seed(seed)
    centres = 0.1 + 0.8 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    sides = min_size + (0.5 - min_size) * torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([centres, sides], -1)


def test_conversions_match_formula_and_torchvision():
    boxes = random_cxcywh(64, seed=0)
    cx, cy, w, h = boxes.unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    xyxy = cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(xyxy, box_convert(boxes, "cxcywh", "xyxy"), rtol=0, atol=0)
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), box_convert(xyxy, "xyxy", "cxcywh"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conversions_round_trip(dtype):
    boxes = random_cxcywh(256, seed=1).to(dtype)
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes, rtol=0, atol=tol)
    xyxy = cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, rtol=0, atol=tol)


def test_conversions_keep_leading_dims():
    boxes = random_cxcywh(24, seed=2).view(2, 3, 4, 4)  # [B,Q,...,4]
    xyxy = cxcywh_to_xyxy(boxes)
    assert xyxy.shape == boxes.shape
    torch.testing.assert_close(xyxy.view(-1, 4), cxcywh_to_xyxy(boxes.view(-1, 4)))


def test_paired_iou_is_diagonal_of_torchvision_box_iou():
    a = cxcywh_to_xyxy(random_cxcywh(200, seed=3))
    b = cxcywh_to_xyxy(random_cxcywh(200, seed=4))
    expected = box_iou(a, b).diagonal()
    assert (expected == 0).any() and (expected > 0).any()  # both overlapping and disjoint pairs
    # Same formula, float64: equal to rounding.
    torch.testing.assert_close(paired_iou(a, b), expected, rtol=0, atol=1e-12)


def test_paired_giou_is_diagonal_of_torchvision_generalized_box_iou():
    a = cxcywh_to_xyxy(random_cxcywh(200, seed=5))
    b = cxcywh_to_xyxy(random_cxcywh(200, seed=6))
    b[:10] = a[:10]  # identical pairs: GIoU 1
    expected = generalized_box_iou(a, b).diagonal()
    assert (expected < 0).any() and (expected > 0).any()
    # paired_giou goes through torchvision's GIoU *loss*, which adds eps = 1e-7 to the union and
    # the enclosing area; that shifts the value by at most eps/union + eps/enclosing
    # <= 2e-7 / min_area = 2e-5 for sides >= 0.1 (identical pairs come out 1 - eps/area).
    torch.testing.assert_close(paired_giou(a, b), expected, rtol=0, atol=2e-5)
    ones = torch.ones(10, dtype=a.dtype)
    torch.testing.assert_close(paired_giou(a[:10], b[:10]), ones, rtol=0, atol=2e-5)


def test_giou_and_iou_hand_values():
    # Overlapping 2x2 squares offset by (1, 1): inter 1, union 7, enclosing 3x3 = 9.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    # Disjoint unit squares one apart: inter 0, union 2, enclosing 3.
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    iou = torch.tensor([1 / 7, 0.0], dtype=torch.float64)
    giou = torch.tensor([1 / 7 - 2 / 9, -1 / 3], dtype=torch.float64)
    torch.testing.assert_close(paired_iou(a, b), iou, rtol=0, atol=1e-15)
    torch.testing.assert_close(paired_giou(a, b), giou, rtol=0, atol=1e-7)


def test_paired_giou_empty():
    empty = torch.zeros(0, 4)
    assert paired_giou(empty, empty).shape == (0,)
    assert paired_iou(empty, empty).shape == (0,)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_inverse_sigmoid_inverts_sigmoid_away_from_clamp(dtype, atol):
    # eps = 1e-5 clamps logits to +-log(1 / 1e-5) = +-11.5; stay well inside.
    z = torch.linspace(-8, 8, 161, dtype=dtype)
    torch.testing.assert_close(inverse_sigmoid(z.sigmoid()), z, rtol=0, atol=atol)
    x = torch.linspace(0.01, 0.99, 99, dtype=dtype)
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x, rtol=0, atol=1e-6)


def test_inverse_sigmoid_clamps_to_finite():
    # the official formula: log(max(x, eps) / max(1 - x, eps)) on x clamped to [0, 1]
    edge = math.log(1 / 1e-5)
    near = math.log((1 - 1e-6) / 1e-5)  # only the denominator is clamped
    x = torch.tensor([0.0, 1.0, -0.5, 2.0, 1 - 1e-6], dtype=torch.float64)
    out = inverse_sigmoid(x)
    expected = torch.tensor([-edge, edge, -edge, edge, near], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
