"""SetCriterion: every loss term against a value computed by hand (plain Python ``math``).

The case: 2 images, 3 queries, 2 classes. Boxes are placed so that the assignment is obvious
(each target has one query right on it, the other queries are far away), and the test checks
that the matcher finds exactly that assignment before comparing the losses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from detr_lineage.criterion import SetCriterion, num_boxes_across_processes
from detr_lineage.matcher import HungarianMatcher

NUM_CLASSES = 2
EOS_COEF = 0.1
WEIGHTS = {"class": 2.0, "bbox": 5.0, "giou": 2.0}  # class weight 2 so the weighting shows
ALPHA_GAMMA = {"ce": (0.25, 2.0), "focal": (0.25, 2.0), "vfl": (0.75, 2.0)}

TARGETS = [
    {"labels": [1, 0], "boxes": [[0.30, 0.30, 0.20, 0.20], [0.70, 0.60, 0.30, 0.20]]},
    {"labels": [0], "boxes": [[0.50, 0.50, 0.40, 0.40]]},
]
# Last decoder layer. Image 0: q0 sits on target 1, q2 on target 0, q1 is far away.
# Image 1: q1 sits on target 0.
BOXES = [
    [[0.68, 0.62, 0.28, 0.22], [0.20, 0.80, 0.10, 0.10], [0.32, 0.28, 0.18, 0.24]],
    [[0.15, 0.15, 0.10, 0.10], [0.52, 0.47, 0.36, 0.44], [0.85, 0.20, 0.12, 0.12]],
]
LOGITS = [  # 2 classes + no-object for "ce"; "focal"/"vfl" use the first two columns
    [[0.2, 1.5, -0.3], [-0.5, 0.1, 1.2], [1.0, 0.4, -1.0]],
    [[0.3, -0.2, 0.9], [1.1, -0.7, 0.2], [-1.2, 0.5, 0.6]],
]
PAIRS = [[(0, 1), (2, 0)], [(1, 0)]]  # per image (query, target)

# One earlier decoder layer: the queries near the targets are different ones.
AUX_BOXES = [[BOXES[0][2], BOXES[0][1], BOXES[0][0]], [BOXES[1][0], BOXES[1][2], BOXES[1][1]]]
AUX_LOGITS = [
    [[-0.4, 0.8, 0.5], [0.9, -1.1, 0.3], [0.6, 0.2, -0.2]],
    [[1.3, 0.1, -0.6], [-0.3, 0.7, 0.4], [0.5, -0.9, 1.4]],
]
AUX_PAIRS = [[(0, 0), (2, 1)], [(2, 0)]]
# RT-DETR's encoder proposals.
ENC_BOXES = [[BOXES[0][1], BOXES[0][0], BOXES[0][2]], [BOXES[1][1], BOXES[1][0], BOXES[1][2]]]
ENC_LOGITS = [
    [[0.7, -0.2, 0.1], [0.0, 0.6, -0.8], [-1.0, 1.2, 0.3]],
    [[0.4, 0.4, -0.4], [-0.6, 1.0, 0.9], [0.2, -0.3, 0.0]],
]
ENC_PAIRS = [[(1, 1), (2, 0)], [(0, 0)]]


# -- hand formulas ------------------------------------------------------------------------------
def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def to_xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def iou_giou(box_a, box_b) -> tuple[float, float]:
    """IoU and GIoU of two cxcywh boxes."""
    a, b = to_xyxy(box_a), to_xyxy(box_b)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (enclosing - union) / enclosing


def hand_losses(logits, boxes, targets, pairs, mode, num_boxes, class_mask=None) -> dict:
    """Unweighted class / bbox / giou by the DETR, DN-DETR and RT-DETR definitions."""
    alpha, gamma = ALPHA_GAMMA[mode]
    matched = {}  # (image, query) -> (label, iou)
    bbox = giou = 0.0
    for i, image_pairs in enumerate(pairs):
        for q, t in image_pairs:
            pred, gt = boxes[i][q], targets[i]["boxes"][t]
            bbox += sum(abs(p - g) for p, g in zip(pred, gt))
            iou, g = iou_giou(pred, gt)
            giou += 1 - g
            matched[i, q] = (targets[i]["labels"][t], iou)

    num, den, cls = 0.0, 0.0, 0.0
    for i in range(len(logits)):
        for q in range(len(logits[i])):
            if class_mask is not None and not class_mask[i][q]:
                continue
            label, iou = matched.get((i, q), (None, 0.0))
            if mode == "ce":  # weighted mean of -log softmax, no-object weighted EOS_COEF
                row = logits[i][q]
                y = NUM_CLASSES if label is None else label
                w = EOS_COEF if y == NUM_CLASSES else 1.0
                log_z = math.log(sum(math.exp(v) for v in row))
                num += w * (log_z - row[y])
                den += w
                continue
            for k in range(NUM_CLASSES):
                p = sigmoid(logits[i][q][k])
                t = 1.0 if k == label else 0.0
                if mode == "focal":  # Lin et al.: alpha_t (1 - p_t)^gamma CE
                    p_t = p if t else 1 - p
                    alpha_t = alpha if t else 1 - alpha
                    cls += alpha_t * (1 - p_t) ** gamma * -math.log(p_t)
                else:  # varifocal: target = IoU at the matched class
                    s = iou * t
                    w = alpha * p**gamma * (1 - t) + s
                    cls += -w * (s * math.log(p) + (1 - s) * math.log(1 - p))
    loss_class = num / den if mode == "ce" else cls / num_boxes
    return {"class": loss_class, "bbox": bbox / num_boxes, "giou": giou / num_boxes}


# -- building the inputs ------------------------------------------------------------------------
def num_logits(mode: str) -> int:
    return NUM_CLASSES + 1 if mode == "ce" else NUM_CLASSES


def make_output(logits, boxes, mode) -> dict:
    return {
        "pred_logits": torch.tensor(logits)[..., : num_logits(mode)].clone().requires_grad_(),
        "pred_boxes": torch.tensor(boxes).requires_grad_(),
    }


def make_targets(targets) -> list[dict]:
    return [
        {
            "labels": torch.tensor(t["labels"], dtype=torch.int64),
            "boxes": torch.tensor(t["boxes"], dtype=torch.float32).view(-1, 4),
            "image_id": i,
        }
        for i, t in enumerate(targets)
    ]


def make_criterion(mode: str) -> SetCriterion:
    if mode == "ce":
        matcher = HungarianMatcher(1.0, 5.0, 2.0, class_cost="softmax")
    else:
        matcher = HungarianMatcher(2.0, 5.0, 2.0, class_cost="focal")
    alpha, gamma = ALPHA_GAMMA[mode]
    return SetCriterion(
        NUM_CLASSES,
        matcher,
        class_loss=mode,
        weight_class=WEIGHTS["class"],
        weight_bbox=WEIGHTS["bbox"],
        weight_giou=WEIGHTS["giou"],
        eos_coef=EOS_COEF,
        alpha=alpha,
        gamma=gamma,
    )


def as_pairs(indices) -> list[list[tuple[int, int]]]:
    return [sorted(zip(r.tolist(), c.tolist())) for r, c in indices]


def sliced(logits, mode):
    return [[row[: num_logits(mode)] for row in image] for image in logits]


MODES = ["ce", "focal", "vfl"]


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_the_hand_case_matches_as_designed(mode):
    matcher = make_criterion(mode).matcher
    targets = make_targets(TARGETS)
    for logits, boxes, pairs in (
        (LOGITS, BOXES, PAIRS),
        (AUX_LOGITS, AUX_BOXES, AUX_PAIRS),
        (ENC_LOGITS, ENC_BOXES, ENC_PAIRS),
    ):
        out = make_output(logits, boxes, mode)
        indices = matcher(out["pred_logits"], out["pred_boxes"], targets)
        assert as_pairs(indices) == pairs


@pytest.mark.parametrize("mode", MODES)
def test_each_term_equals_hand_value(mode):
    criterion = make_criterion(mode)
    outputs = make_output(LOGITS, BOXES, mode)
    outputs["aux_outputs"] = [make_output(AUX_LOGITS, AUX_BOXES, mode)]
    outputs["enc_outputs"] = make_output(ENC_LOGITS, ENC_BOXES, mode)
    losses = criterion(outputs, make_targets(TARGETS))

    num_boxes = 3
    expected = {}
    for name, logits, boxes, pairs in (
        ("{}", LOGITS, BOXES, PAIRS),
        ("{}_aux0", AUX_LOGITS, AUX_BOXES, AUX_PAIRS),
        ("enc_{}", ENC_LOGITS, ENC_BOXES, ENC_PAIRS),
    ):
        raw = hand_losses(sliced(logits, mode), boxes, TARGETS, pairs, mode, num_boxes)
        for term, value in raw.items():
            expected["loss_" + name.format(term)] = WEIGHTS[term] * value
    assert set(losses) == {*expected, "loss"}
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert losses["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-5)
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))

    # Aux layers are matched on their own: with the last layer's assignment they would differ.
    wrong = hand_losses(sliced(AUX_LOGITS, mode), AUX_BOXES, TARGETS, PAIRS, mode, num_boxes)
    assert abs(WEIGHTS["bbox"] * wrong["bbox"] - expected["loss_bbox_aux0"]) > 0.1


@pytest.mark.parametrize("mode", MODES)
def test_image_without_targets_in_the_batch(mode):
    targets = [TARGETS[0], {"labels": [], "boxes": []}]
    pairs = [PAIRS[0], []]
    losses = make_criterion(mode)(make_output(LOGITS, BOXES, mode), make_targets(targets))
    raw = hand_losses(sliced(LOGITS, mode), BOXES, targets, pairs, mode, num_boxes=2)
    for term, value in raw.items():
        assert losses[f"loss_{term}"].item() == pytest.approx(WEIGHTS[term] * value, rel=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_all_empty_batch_is_finite_with_gradients(mode):
    targets = make_targets([{"labels": [], "boxes": []}] * 2)
    outputs = make_output(LOGITS, BOXES, mode)
    outputs["aux_outputs"] = [make_output(AUX_LOGITS, AUX_BOXES, mode)]
    losses = make_criterion(mode)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    raw = hand_losses(sliced(LOGITS, mode), BOXES, targets, [[], []], mode, num_boxes=1)
    assert raw["bbox"] == raw["giou"] == 0
    assert losses["loss_class"].item() == pytest.approx(WEIGHTS["class"] * raw["class"], rel=1e-5)
    for key in ("loss_bbox", "loss_giou", "loss_bbox_aux0", "loss_giou_aux0"):
        assert losses[key].item() == 0

    losses["loss"].backward()
    for out in (outputs, outputs["aux_outputs"][0]):
        assert out["pred_boxes"].grad is not None  # in the graph (DDP needs every rank alike)
        assert torch.equal(out["pred_boxes"].grad, torch.zeros_like(out["pred_boxes"]))
        assert out["pred_logits"].grad is not None
        assert out["pred_logits"].grad.abs().sum() > 0  # every query pushed to background


@pytest.mark.parametrize("mode", MODES)
def test_class_mask_restricts_the_class_loss(mode):
    criterion = make_criterion(mode)
    out = make_output(LOGITS, BOXES, mode)
    targets = make_targets(TARGETS)
    indices = [(torch.tensor([q for q, _ in p]), torch.tensor([t for _, t in p])) for p in PAIRS]
    mask = [[True, False, True], [False, True, True]]
    num_boxes = 3.0
    terms = criterion.loss_terms(
        out["pred_logits"], out["pred_boxes"], targets, indices, num_boxes, torch.tensor(mask)
    )
    unmasked = criterion.loss_terms(
        out["pred_logits"], out["pred_boxes"], targets, indices, num_boxes
    )
    logits = sliced(LOGITS, mode)
    raw = hand_losses(logits, BOXES, TARGETS, PAIRS, mode, num_boxes, class_mask=mask)
    full = hand_losses(logits, BOXES, TARGETS, PAIRS, mode, num_boxes)
    assert terms["class"].item() == pytest.approx(WEIGHTS["class"] * raw["class"], rel=1e-5)
    assert unmasked["class"].item() == pytest.approx(WEIGHTS["class"] * full["class"], rel=1e-5)
    assert abs(raw["class"] - full["class"]) > 1e-3  # the mask changes the value
    for term in ("bbox", "giou"):  # box terms are on the assigned pairs either way
        torch.testing.assert_close(terms[term], unmasked[term])
        assert terms[term].item() == pytest.approx(WEIGHTS[term] * raw[term], rel=1e-5)


def test_num_boxes_across_processes_clamps_to_one():
    assert not (dist.is_available() and dist.is_initialized())
    device = torch.device("cpu")
    empty = make_targets([{"labels": [], "boxes": []}] * 3)
    assert num_boxes_across_processes(empty, device) == 1.0
    assert num_boxes_across_processes([], device) == 1.0
    n = num_boxes_across_processes(make_targets(TARGETS), device)
    assert n == 3.0 and isinstance(n, float)


def test_invalid_class_loss():
    with pytest.raises(ValueError, match="class_loss"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), class_loss="bce")


def test_vfl_target_iou_is_detached():
    # RT-DETR detaches the IoU target: the class loss must not move the boxes.
    criterion = make_criterion("vfl")
    out = make_output(LOGITS, BOXES, "vfl")
    losses = criterion(out, make_targets(TARGETS))
    losses["loss_class"].backward()
    assert out["pred_boxes"].grad is None or not out["pred_boxes"].grad.any()
    assert out["pred_logits"].grad.abs().sum() > 0
