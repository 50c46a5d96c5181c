"""HungarianMatcher: optimal against brute force, cost matrix against a float64 hand formula."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from detr_lineage.matcher import HungarianMatcher, _giou_grid

ALPHA, GAMMA = 0.25, 2.0


# -- an independent float64 cost (numpy), the formulas of DETR / Deformable-DETR ----------------
def hand_cost(logits, boxes, labels, tgt_boxes, mode, w_class, w_bbox, w_giou) -> np.ndarray:
    """``[Q,C]``, ``[Q,4]``, ``[T]``, ``[T,4]`` (cxcywh) -> cost ``[Q,T]`` in float64."""
    logits = np.asarray(logits, np.float64)
    boxes, tgt = np.asarray(boxes, np.float64), np.asarray(tgt_boxes, np.float64)
    labels = np.asarray(labels, np.int64)
    if mode == "softmax":
        e = np.exp(logits - logits.max(1, keepdims=True))
        c_class = -(e / e.sum(1, keepdims=True))[:, labels]
    else:
        p = 1 / (1 + np.exp(-logits[:, labels]))
        pos = ALPHA * (1 - p) ** GAMMA * -np.log(p + 1e-8)
        neg = (1 - ALPHA) * p**GAMMA * -np.log(1 - p + 1e-8)
        c_class = pos - neg
    c_l1 = np.abs(boxes[:, None, :] - tgt[None, :, :]).sum(-1)

    def xyxy(b):
        return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)

    a, b = xyxy(boxes)[:, None, :], xyxy(tgt)[None, :, :]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0)
    ih = (np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])).clip(0)
    inter = iw * ih
    union = area_a + area_b - inter
    enclosing = (np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])) * (
        np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
    )
    giou = inter / union - (enclosing - union) / enclosing
    return w_class * c_class + w_bbox * c_l1 - w_giou * giou


def brute_force_min(cost: np.ndarray) -> float:
    """Minimum total cost over every one-to-one assignment of min(Q, T) pairs."""
    q, t = cost.shape
    if t <= q:  # every target gets a distinct query
        perms = np.array(list(itertools.permutations(range(q), t)))  # [P,T]
        return float(cost[perms, np.arange(t)].sum(1).min())
    perms = np.array(list(itertools.permutations(range(t), q)))  # every query gets a target
    return float(cost[np.arange(q), perms].sum(1).min())


def random_case(seed, counts, num_queries, num_logits, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = len(counts)
    logits = 2 * torch.randn(b, num_queries, num_logits, generator=g, dtype=dtype)
    boxes = torch.cat(
        [
            0.2 + 0.6 * torch.rand(b, num_queries, 2, generator=g, dtype=dtype),
            0.05 + 0.4 * torch.rand(b, num_queries, 2, generator=g, dtype=dtype),
        ],
        -1,
    )
    num_real = num_logits - 1 if num_logits > 2 else num_logits
    targets = []
    for i, n in enumerate(counts):
        tgt = torch.cat(
            [0.2 + 0.6 * torch.rand(n, 2, generator=g), 0.05 + 0.4 * torch.rand(n, 2, generator=g)],
            -1,
        )
        labels = torch.randint(0, num_real, (n,), generator=g)
        targets.append({"labels": labels, "boxes": tgt, "image_id": 100 + i})
    return logits, boxes, targets


WEIGHTS = {"softmax": (1.0, 5.0, 2.0), "focal": (2.0, 5.0, 2.0)}  # DETR; DN-DETR / RT-DETR


@pytest.mark.parametrize("mode", ["softmax", "focal"])
@pytest.mark.parametrize("seed", range(4))
def test_assignment_is_optimal_against_brute_force(mode, seed):
    # Several images per batch with different target counts: rectangular (T < Q), square
    # (T == Q), a single target and an image without targets.
    counts, num_queries = [3, 6, 0, 1, 5], 6
    num_logits = 5 if mode == "softmax" else 4  # softmax: 4 classes + no-object
    logits, boxes, targets = random_case(seed, counts, num_queries, num_logits)
    matcher = HungarianMatcher(*WEIGHTS[mode], class_cost=mode)
    indices = matcher(logits, boxes, targets)
    assert len(indices) == len(targets)
    for i, ((rows, cols), t) in enumerate(zip(indices, targets)):
        n = len(t["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == min(n, num_queries)
        assert len(set(rows.tolist())) == len(rows)  # one-to-one
        assert sorted(cols.tolist()) == list(range(n))  # every target matched once
        if n == 0:
            continue
        cost = hand_cost(
            logits[i], boxes[i], t["labels"], t["boxes"], mode, *WEIGHTS[mode]
        )  # [Q,T]
        matched = float(cost[rows.numpy(), cols.numpy()].sum())
        # The matcher works in float32: its optimum can differ from the float64 one only by
        # near-ties, i.e. by float32 rounding of the costs (|cost| < 20 here).
        assert matched == pytest.approx(brute_force_min(cost), abs=1e-5)


@pytest.mark.parametrize("mode", ["softmax", "focal"])
def test_cost_matrix_matches_float64_hand_formula(mode):
    counts, num_queries = [2, 0, 3], 4
    num_logits = 4 if mode == "softmax" else 3
    logits, boxes, targets = random_case(7, counts, num_queries, num_logits)
    matcher = HungarianMatcher(*WEIGHTS[mode], class_cost=mode)
    cost = matcher.cost_matrix(logits, boxes, targets)
    assert cost.shape == (3, num_queries, max(counts))
    for i, t in enumerate(targets):
        n = len(t["labels"])
        expected = hand_cost(logits[i], boxes[i], t["labels"], t["boxes"], mode, *WEIGHTS[mode])
        np.testing.assert_allclose(cost[i, :, :n].double().numpy(), expected, rtol=0, atol=1e-5)
        assert torch.isinf(cost[i, :, n:]).all()  # padding columns


def test_giou_grid_equals_torchvision_generalized_box_iou():
    # The matcher's batched GIoU ([B,N,4] x [B,M,4] cxcywh) against torchvision's, per image.
    _, boxes, _ = random_case(11, [0, 0, 0], 50, 3, dtype=torch.float64)
    _, others, _ = random_case(12, [0, 0, 0], 7, 3, dtype=torch.float64)
    grid = _giou_grid(boxes, others)
    assert grid.shape == (3, 50, 7)
    for b in range(3):
        xyxy1 = box_convert(boxes[b], "cxcywh", "xyxy")
        expected = generalized_box_iou(xyxy1, box_convert(others[b], "cxcywh", "xyxy"))
        torch.testing.assert_close(grid[b], expected, rtol=0, atol=1e-12)


def test_cost_matrix_tiny_case_by_hand():
    # One query, one target, focal cost, every number written out.
    # logit 0 -> p = 0.5: pos = 0.25 * 0.25 * ln 2, neg = 0.75 * 0.25 * ln 2 (1e-8 negligible).
    # Boxes: pred (0.5,0.5,0.2,0.2) = xyxy [0.4,0.4,0.6,0.6];
    # target (0.6,0.5,0.2,0.2) = xyxy [0.5,0.4,0.7,0.6].
    # L1 = 0.1; inter 0.1*0.2 = 0.02, union 0.06, enclosing 0.3*0.2 = 0.06 -> GIoU = 1/3.
    logits = torch.zeros(1, 1, 2)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    ln2 = np.log(2)
    expected = 2 * (0.0625 * ln2 - 0.1875 * ln2) + 5 * 0.1 - 2 * (1 / 3)
    cost = HungarianMatcher(2, 5, 2, "focal").cost_matrix(logits, boxes, targets)
    assert cost.item() == pytest.approx(expected, abs=1e-6)


def test_zero_target_images_give_empty_int64_indices():
    logits, boxes, targets = random_case(0, [0, 0], 5, 4)
    for mode in ("softmax", "focal"):
        indices = HungarianMatcher(class_cost=mode)(logits, boxes, targets)
        assert len(indices) == 2
        for rows, cols in indices:
            assert rows.shape == cols.shape == (0,)
            assert rows.dtype == cols.dtype == torch.int64


def test_more_targets_than_queries_warns_with_image_id():
    logits, boxes, targets = random_case(3, [5, 2], 3, 4)
    targets[0]["image_id"] = torch.tensor(42)  # as the datasets give it
    matcher = HungarianMatcher(class_cost="softmax")
    with pytest.warns(UserWarning, match="image 42 has 5 targets but only 3 queries: 2 targets"):
        indices = matcher(logits, boxes, targets)
    rows, cols = indices[0]
    assert sorted(rows.tolist()) == [0, 1, 2]  # every query used, 3 distinct targets
    assert len(set(cols.tolist())) == 3
    cost = hand_cost(
        logits[0], boxes[0], targets[0]["labels"], targets[0]["boxes"], "softmax", 1, 5, 2
    )
    matched = float(cost[rows.numpy(), cols.numpy()].sum())
    assert matched == pytest.approx(brute_force_min(cost), abs=1e-5)


@pytest.mark.parametrize("mode", ["softmax", "focal"])
@pytest.mark.parametrize(
    "where,value", [("logits", float("nan")), ("boxes", float("nan")), ("boxes", float("inf"))]
)
def test_non_finite_predictions_raise(mode, where, value):
    logits, boxes, targets = random_case(1, [2, 3, 0], 4, 4)
    targets[1]["image_id"] = 7
    # A class no target of the image has: the focal cost never reads it, still an error.
    targets[1]["labels"] = torch.tensor([1, 2, 1])
    (logits if where == "logits" else boxes)[1, 2, 0] = value
    with pytest.raises(FloatingPointError, match="image 7 have NaN/inf"):
        HungarianMatcher(class_cost=mode)(logits, boxes, targets)


def test_degenerate_target_boxes_raise():
    logits, boxes, targets = random_case(1, [2, 3], 4, 4)
    targets[0]["boxes"][1] = torch.tensor([0.5, 0.5, float("nan"), 0.1])
    with pytest.raises(FloatingPointError, match="image 100 has NaN/inf: check its target"):
        HungarianMatcher(class_cost="focal")(logits, boxes, targets)


@pytest.mark.parametrize("mode,bad_label", [("softmax", 3), ("softmax", -1), ("focal", 4)])
def test_out_of_range_labels_raise(mode, bad_label):
    # 4 logits: softmax = 3 classes + no-object (label 3 would silently be "no-object").
    logits, boxes, targets = random_case(2, [2, 1], 4, 4)
    targets[1]["labels"] = torch.tensor([bad_label])
    with pytest.raises(ValueError, match=r"image 101 has labels \[-?\d\] outside"):
        HungarianMatcher(class_cost=mode)(logits, boxes, targets)


def test_low_precision_predictions_match_float32():
    logits, boxes, targets = random_case(5, [3, 4], 8, 5)
    matcher = HungarianMatcher(class_cost="softmax")
    ref = matcher(logits, boxes, targets)
    out = matcher(logits.double(), boxes.double(), targets)
    for (r0, c0), (r1, c1) in zip(ref, out):
        assert torch.equal(r0, r1) and torch.equal(c0, c1)
    assert matcher(logits.bfloat16(), boxes.bfloat16(), targets)[0][0].dtype == torch.int64


def test_invalid_configuration():
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")
    with pytest.raises(ValueError, match="zero"):
        HungarianMatcher(0, 0, 0)
