"""PostProcess: softmax top-1 per query (DETR) and sigmoid top-k over (query x class)."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lineage.boxes import cxcywh_to_xyxy
from detr_lineage.postprocess import PostProcess


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def test_softmax_argmax_over_real_classes_and_pixel_xyxy():
    # 3 classes + no-object. Query 0: no-object has the largest logit, so the detection is the
    # best *real* class (1) with its probability under the full softmax.
    logits = [
        [[1.0, 3.0, 0.0, 5.0], [2.0, -1.0, 0.5, 0.0]],
        [[0.0, 0.0, 4.0, 1.0], [0.3, 0.2, 0.1, 0.0]],
    ]
    boxes = [
        [[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]],
        [[0.1, 0.2, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]],
    ]
    sizes = torch.tensor([[100, 200], [50, 80]])  # (h, w)
    out = PostProcess("softmax")(torch.tensor(logits), torch.tensor(boxes), sizes)

    assert len(out) == 2
    expected_labels = [[1, 0], [2, 0]]
    for i, det in enumerate(out):
        h, w = sizes[i].tolist()
        assert det["labels"].tolist() == expected_labels[i]
        scores = [softmax(logits[i][q])[expected_labels[i][q]] for q in range(2)]
        torch.testing.assert_close(det["scores"], torch.tensor(scores))
        xyxy = [
            [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            for cx, cy, bw, bh in boxes[i]
        ]
        torch.testing.assert_close(det["boxes"], torch.tensor(xyxy))
    # Spelled out for the first box: (0.5, 0.5, 0.2, 0.4) in a 100 x 200 (h x w) image.
    torch.testing.assert_close(out[0]["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_sigmoid_top_k_over_queries_and_classes():
    # 3 queries x 2 classes; sigmoid is monotonic, so the ranking is that of the logits.
    logits = torch.tensor([[[0.1, 2.0], [3.0, -1.0], [1.5, 0.7]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.4], [0.7, 0.6, 0.4, 0.2]]])
    sizes = torch.tensor([[10, 20]])
    (det,) = PostProcess("sigmoid", num_select=4)(logits, boxes, sizes)
    # Ranked (query, class): (1,0) 3.0, (0,1) 2.0, (2,0) 1.5, (2,1) 0.7.
    ranked = [(1, 0, 3.0), (0, 1, 2.0), (2, 0, 1.5), (2, 1, 0.7)]
    assert det["labels"].tolist() == [c for _, c, _ in ranked]
    torch.testing.assert_close(
        det["scores"], torch.tensor([1 / (1 + math.exp(-x)) for *_, x in ranked])
    )
    xyxy = {
        0: [8.0, 4.0, 12.0, 6.0],
        1: [4.0, 2.0, 8.0, 6.0],
        2: [10.0, 5.0, 18.0, 7.0],
    }
    torch.testing.assert_close(det["boxes"], torch.tensor([xyxy[q] for q, _, _ in ranked]))


def test_sigmoid_one_query_can_give_several_detections_and_k_is_capped():
    logits = torch.tensor([[[5.0, 4.0], [-5.0, -4.0]], [[-5.0, -4.0], [5.0, 4.0]]])
    boxes = torch.rand(2, 2, 4) * 0.5 + 0.25
    sizes = torch.tensor([[1, 1], [1, 1]])
    out = PostProcess("sigmoid", num_select=300)(logits, boxes, sizes)
    assert [len(d["scores"]) for d in out] == [4, 4]  # min(num_select, Q * C)
    assert out[0]["labels"][:2].tolist() == [0, 1]
    assert out[1]["labels"][:2].tolist() == [0, 1]
    torch.testing.assert_close(out[0]["boxes"][:2], cxcywh_to_xyxy(boxes[0, [0, 0]]))
    torch.testing.assert_close(out[1]["boxes"][:2], cxcywh_to_xyxy(boxes[1, [1, 1]]))
    assert (out[0]["scores"][:-1] >= out[0]["scores"][1:]).all()  # sorted


def test_invalid_mode():
    with pytest.raises(ValueError, match="mode"):
        PostProcess("argmax")
