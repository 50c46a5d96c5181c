"""RT-DETRv2: published sizes, anchors, query selection, denoising, deploy, overfitting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from detr_lineage.denoising import DenoisingConfig, make_denoising_queries
from detr_lineage.lit import RTDETRv2
from detr_lineage.models.rtdetr_v2 import RTDETRv2Config, RTDETRv2Net, make_anchors
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

STRIDES = [8, 16, 32]
# The README table of the official repository (params in M, GFLOPs at 640x640).
PUBLISHED = {
    "S": (
        20,
        60,
        dict(
            backbone=BackboneConfig("resnet18vd", return_strides=STRIDES, frozen_bn=False),
            expansion=0.5,
            num_decoder_layers=3,
        ),
    ),
    "M*": (
        31,
        92,
        dict(
            backbone=BackboneConfig("resnet34vd", return_strides=STRIDES, frozen_bn=False),
            expansion=0.5,
            num_decoder_layers=4,
        ),
    ),
    "L": (
        42,
        136,
        dict(backbone=BackboneConfig("resnet50vd", return_strides=STRIDES, freeze_at=0)),
    ),
    "X": (
        76,
        259,
        dict(
            backbone=BackboneConfig("resnet101vd", return_strides=STRIDES, freeze_at=0),
            encoder_dim=384,
            encoder_dim_feedforward=2048,
        ),
    ),
}


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_published_parameter_count_and_flops(size):
    """Params within 3% and forward GFLOPs (2 per multiply-add) within 5% of the README."""
    params_m, gflops, kwargs = PUBLISHED[size]
    with torch.device("meta"):
        net = RTDETRv2Net(RTDETRv2Config(80, **kwargs)).eval()
        n = sum(p.numel() for p in net.parameters()) / 1e6
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, 3, 640, 640), torch.zeros(1, 640, 640, dtype=torch.bool))
    flops = counter.get_total_flops() / 1e9
    assert abs(n - params_m) / params_m < 0.03, n
    assert abs(flops - gflops) / gflops < 0.05, flops


def test_anchors_at_640():
    shapes = [(80, 80), (40, 40), (20, 20)]
    anchors, valid = make_anchors(shapes, torch.device("cpu"))
    assert anchors.shape == (1, 8400, 4) and valid.shape == (1, 8400, 1)
    # a valid anchor decodes back to a cell centre and 0.05 * 2**level sides
    cell = anchors[0, 80 + 1].sigmoid()  # row 1, column 1 of the stride-8 level
    torch.testing.assert_close(cell, torch.tensor([1.5 / 80, 1.5 / 80, 0.05, 0.05]))
    assert valid[0, 81] and not valid[0, 0]  # the corner cell's centre is within 0.01 of 0
    # only the outer ring of the 80x80 level has a centre coordinate outside (0.01, 0.99)
    assert int(valid.sum()) == 8400 - (80 * 80 - 78 * 78)
    assert torch.isinf(anchors[~valid[..., 0]]).all()


def tiny_net(denoising: DenoisingConfig | None = None, **kw) -> RTDETRv2Net:
    torch.manual_seed(0)
    args = dict(
        backbone=BackboneConfig("conv", channels=[8, 16, 32, 32], return_strides=[4, 8, 16]),
        hidden_dim=32,
        encoder_dim=32,
        nhead=4,
        encoder_dim_feedforward=64,
        expansion=0.5,
        depth_mult=0.34,
        num_queries=12,
        num_decoder_layers=2,
        dim_feedforward=64,
        denoising=denoising,
    )
    return RTDETRv2Net(RTDETRv2Config(4, **{**args, **kw}))


def targets() -> list[dict]:
    def t(labels, boxes, i):
        return {
            "labels": torch.tensor(labels),
            "boxes": torch.tensor(boxes).reshape(-1, 4),
            "image_id": i,
            "orig_size": torch.tensor([64, 64]),
        }

    return [t([1], [[0.5, 0.5, 0.3, 0.3]], 0), t([0, 2, 3], [[0.3, 0.3, 0.2, 0.2]] * 3, 1)]


CDN = DenoisingConfig(query_budget=6, label_noise=0.25, box_noise=1.0, contrastive=True)


def test_output_shapes_with_and_without_denoising():
    images, masks = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    net = tiny_net(CDN).train()
    out = net(images, masks, targets())
    assert out["pred_logits"].shape == (2, 12, 4) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1
    assert out["enc_outputs"]["pred_boxes"].shape == (2, 12, 4)
    # max 3 objects -> 6 // 3 = 2 groups of 3 positive + 3 negative queries
    assert out["dn_outputs"]["pred_logits"].shape == (2, 12, 4)
    assert out["dn_meta"].num_groups == 2
    net.denoising = None
    out = net(images, masks, targets())
    assert "dn_outputs" not in out and out["pred_logits"].shape == (2, 12, 4)
    net.eval()
    with torch.no_grad():
        a, b = net(images, masks), net(images, masks, targets())
    assert "enc_outputs" not in a and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_300_queries_selected_at_640():
    with torch.device("meta"):
        net = RTDETRv2Net(RTDETRv2Config(80, **PUBLISHED["S"][2])).eval()
        memory = net.memory(torch.empty(1, 3, 640, 640))
        content, boxes, enc = net.select_queries(memory)
    assert memory.value.shape == (1, 8400, 256)
    assert content.shape == (1, 300, 256) and boxes.shape == (1, 300, 4)


def test_no_leakage_for_contrastive_groups(monkeypatch):
    net = tiny_net(CDN).train()
    images, masks = torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    base = make_denoising_queries(targets(), CDN, 4, 12)
    changed = copy.deepcopy(base)
    group1 = slice(6, 12)  # both the positives and the negatives of group 1
    changed.labels[:, group1] = (changed.labels[:, group1] + 1) % 4
    changed.boxes[:, group1] = torch.rand_like(changed.boxes[:, group1]) * 0.5 + 0.25
    outs = []
    for q in (base, changed):
        monkeypatch.setattr(
            "detr_lineage.models.rtdetr_v2.make_denoising_queries", lambda *a, q=q, **k: q
        )
        outs.append(net(images, masks, targets()))
    a, b = outs
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            a["dn_outputs"][key][:, :6], b["dn_outputs"][key][:, :6], rtol=0, atol=1e-6
        )
        assert not torch.allclose(a["dn_outputs"][key][:, 6:], b["dn_outputs"][key][:, 6:])


def test_deploy_fuses_and_keeps_outputs():
    net = tiny_net(CDN).double()
    images, masks = torch.rand(2, 3, 64, 64).double(), torch.zeros(2, 64, 64, dtype=torch.bool)
    net.train()
    net(images, masks)  # move BN statistics away from the identity
    net.eval()
    with torch.no_grad():
        before = net(images, masks)
        net.deploy()
        after = net(images, masks)
    assert net.denoising is None and net.denoising_class_embed is None
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(before[key], after[key], rtol=0, atol=1e-10)


def test_eval_idx_cuts_decoder_depth_at_inference():
    net = tiny_net(num_decoder_layers=3, eval_idx=1).eval()
    images, masks = torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        out = net(images, masks)
    assert len(out["aux_outputs"]) == 1  # two layers ran


@pytest.mark.slow
def test_tiny_rtdetr_overfits_one_batch():
    from tests.test_training import fixed_batch, overfit

    model = make_module(
        RTDETRv2,
        num_classes=6,
        backbone=BackboneConfig("conv", channels=[16, 32, 64, 64], return_strides=[4, 8, 16]),
        hidden_dim=64,
        encoder_dim=64,
        nhead=4,
        encoder_dim_feedforward=128,
        expansion=0.5,
        num_queries=10,
        num_decoder_layers=2,
        dim_feedforward=128,
        denoising=DenoisingConfig(
            query_budget=8, label_noise=0.25, box_noise=1.0, contrastive=True
        ),
    )
    first, last = overfit(model, fixed_batch(), steps=300)
    assert last < first / 5, (first, last)
