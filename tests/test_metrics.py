"""Near-miss and duplicate counts on hand-made detections with known answers."""

from __future__ import annotations

import pytest
import torch

from detr_lineage.metrics import NearMissCounter, near_miss_counts


def dets(rows: list[tuple[list[float], float, int]]) -> dict:
    """(xyxy box, score, label) rows -> a detections dict."""
    return {
        "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([r[1] for r in rows], dtype=torch.float32),
        "labels": torch.tensor([r[2] for r in rows], dtype=torch.int64),
    }


def gts(rows: list[tuple[list[float], int]]) -> dict:
    return {
        "boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
    }


# two objects: a 10x10 class-0 square at the origin, a 10x10 class-1 square at (20, 20)
GT = gts([([0, 0, 10, 10], 0), ([20, 20, 30, 30], 1)])


def test_hand_made_image():
    d = dets(
        [
            ([0, 0, 10, 10], 0.9, 0),  # exact hit on object 0
            ([0, 0, 10, 9], 0.8, 0),  # IoU 0.9 with object 0: a duplicate
            ([1, 0, 10, 10], 0.7, 0),  # IoU 0.9: a second duplicate
            ([0, 0, 10, 3], 0.9, 0),  # IoU 0.3 with object 0: near miss
            ([0, 0, 10, 1], 0.9, 0),  # IoU 0.1 exactly: near miss (the lower bound counts)
            ([0, 0, 10, 0.5], 0.9, 0),  # IoU 0.05: neither
            ([0, 0, 10, 3], 0.4, 0),  # near-miss box below the score threshold: not counted
            ([20, 20, 30, 25], 0.6, 1),  # IoU 0.5 exactly with object 1: a hit, not a near miss
            ([20, 20, 30, 24], 0.6, 1),  # IoU 0.4: near miss
            ([20, 20, 30, 30], 0.9, 0),  # exact box but the wrong class: neither
            ([20, 20, 30, 30], 0.3, 1),  # exact hit below the threshold: no duplicate
        ]
    )
    assert near_miss_counts(d, GT) == (3, 2)
    assert near_miss_counts(d, GT, score_threshold=0.2) == (4, 3)
    assert near_miss_counts(d, GT, score_threshold=0.95) == (0, 0)


def test_empty_sides():
    none = dets([])
    assert near_miss_counts(none, GT) == (0, 0)
    assert near_miss_counts(dets([([0, 0, 10, 3], 0.9, 0)]), gts([])) == (0, 0)


def test_a_detection_between_two_objects_counts_for_its_best():
    two = gts([([0, 0, 10, 10], 0), ([5, 0, 15, 10], 0)])  # IoU 1/3 between the objects
    d = dets([([0, 0, 10, 10], 0.9, 0), ([5, 0, 15, 10], 0.9, 0), ([5, 0, 15, 10], 0.8, 0)])
    assert near_miss_counts(d, two) == (0, 1)  # one duplicate on object 1, none on object 0


def test_counter_means_per_image_and_resets():
    counter = NearMissCounter()
    near = dets([([0, 0, 10, 3], 0.9, 0), ([20, 20, 30, 24], 0.9, 1)])
    dup = dets([([0, 0, 10, 10], 0.9, 0), ([0, 0, 10, 10], 0.8, 0), ([0, 0, 10, 10], 0.7, 0)])
    counter.update([near, dup], [GT, GT])
    counter.update([dets([])], [GT])
    assert counter.compute() == pytest.approx({"near_miss": 2 / 3, "duplicates": 2 / 3})
    assert counter.compute() == {"near_miss": 0.0, "duplicates": 0.0}  # reset, no division by 0
