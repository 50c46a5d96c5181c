"""Conditional DETR, Deformable DETR and DINO: sizes against the papers, the official settings of
the COCO configs, the pieces they add to the shared decoder, and tiny models that overfit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DINO, ConditionalDETR, DeformableDETR
from detr_lineage.models.conditional_detr import ConditionalDETRConfig, ConditionalDETRNet
from detr_lineage.models.deformable_detr import DeformableDETRConfig, DeformableDETRNet
from detr_lineage.nn.backbone import BackboneConfig
from detr_lineage.nn.multiscale import encoder_proposals, encoder_reference_points, valid_ratios
from detr_lineage.nn.position import sine_encoding_of_boxes
from detr_lineage.nn.transformer import Memory, refine_boxes
from tests.helpers import make_module
from tests.test_configs import _coco
from tests.test_training import fixed_batch, map50, overfit

# Papers' R50 numbers: params (M), GFLOPs, and the input they were counted at. GFLOPs in these
# papers are multiply-adds (fvcore), averaged over COCO val at short side 800; a fixed 800x1066
# input stands in for that; DINO's benchmark (tools/benchmark.py) resizes every image to
# 800x1280, so DINO is counted there. Ours: params (M, to 0.01) and GMACs (to 0.1).
PAPER = {
    "conditional_detr_r50": (44, 90, (800, 1066), 44.60, 85.6),
    "deformable_detr_r50": (40, 173, (800, 1066), 40.07, 164.0),
    "dino_r50": (47, 279, (800, 1280), 46.88, 277.4),
}


def gmacs(net: torch.nn.Module, size: tuple[int, int]) -> float:
    """Forward multiply-adds (G) of ``net`` on one ``size`` image (meta device: no compute)."""
    net = net.eval()
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, *size), torch.zeros(1, *size, dtype=torch.bool))
    return counter.get_total_flops() / 2e9


@pytest.mark.parametrize("name", list(PAPER))
def test_coco_config_params_and_flops_match_the_paper(name):
    paper_m, paper_g, size, ours_m, ours_g = PAPER[name]
    (model, _, _), _ = _coco(name)
    n = sum(p.numel() for p in model.net.parameters()) / 1e6
    g = gmacs(model.net, size)
    assert round(n, 2) == ours_m and abs(g - ours_g) < 0.05, (n, g)
    assert abs(n - paper_m) / paper_m < 0.03, n
    assert abs(g - paper_g) / paper_g < 0.10, g


def test_deformable_switches_add_the_papers_parameters():
    """+box refinement: one head pair per layer; +two-stage: the proposal heads and pos_trans
    (paper: 40M / 40M / 41M, Table 1)."""
    with torch.device("meta"):
        sizes = [
            sum(p.numel() for p in DeformableDETRNet(DeformableDETRConfig(91, **kw)).parameters())
            for kw in ({}, {"box_refine": True}, {"box_refine": True, "two_stage": True})
        ]
    d = 256
    head_pair = (d * 91 + 91) + (2 * (d * d + d) + d * 4 + 4)
    assert sizes[1] - sizes[0] == 5 * head_pair
    proposal = (d * d + d + 2 * d) + head_pair + (2 * d * 2 * d + 2 * d + 4 * d)
    assert sizes[2] - sizes[1] == proposal - 300 * 2 * d - (d * 2 + 2)
    assert [round(s / 1e6) for s in sizes] == [40, 41, 41]


# Official settings (READMEs / main.py / DINO_4scale.py), declared here apart from the YAMLs:
# lr, backbone lr, lr drops, epochs, cost_class, weight_class, num_select, num_queries, FFN
OFFICIAL = {
    "conditional_detr_r50": (1e-4, 1e-5, [40], 50, 2.0, 2.0, 100, 300, 2048),
    "deformable_detr_r50": (2e-4, 2e-5, [40], 50, 2.0, 2.0, 100, 300, 1024),
    "dino_r50": (1e-4, 1e-5, [11], 12, 2.0, 1.0, 300, 900, 2048),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_coco_configs_use_the_official_settings(name):
    lr, lr_bb, drops, epochs, cost_class, weight_class, select, queries, ff = OFFICIAL[name]
    (model, _, _), config = _coco(name)
    hp, net = model.hparams, model.hparams.net
    assert (hp.lr, hp.lr_backbone, hp.weight_decay, hp.lr_drop_epochs) == (lr, lr_bb, 1e-4, drops)
    assert config.trainer.max_epochs == epochs and config.trainer.gradient_clip_val == 0.1
    assert (hp.cost_class, hp.cost_bbox, hp.cost_giou) == (cost_class, 5.0, 2.0)
    assert (hp.weight_class, hp.weight_bbox, hp.weight_giou) == (weight_class, 5.0, 2.0)
    assert model.criterion.class_loss == "focal" and model.postprocess.num_select == select
    # Deformable DETR main.py: sampling offsets and reference points at 0.1x lr; DINO: none
    assert hp.lr_linear_proj_mult == (0.1 if name == "deformable_detr_r50" else 1.0)
    assert (net["num_queries"], net["dim_feedforward"], net["num_classes"]) == (queries, ff, 80)
    if name == "dino_r50":
        dn = model.net.denoising
        assert (dn.query_budget, dn.label_noise, dn.box_noise, dn.contrastive) == (
            100,
            0.25,
            0.4,
            True,
        )
        assert net["pe_temperature"] == 20.0 and net["dropout"] == 0.0


# -- the shared pieces they add --------------------------------------------------------------
def test_refine_boxes_on_points_moves_only_the_centre():
    delta = torch.tensor([[0.5, -0.5, 0.3, -0.2]])
    ref = torch.tensor([[0.2, 0.7]])
    out = refine_boxes(delta, ref)
    logit = torch.log(ref / (1 - ref))
    torch.testing.assert_close(out[:, :2], torch.sigmoid(delta[:, :2] + logit))
    torch.testing.assert_close(out[:, 2:], torch.sigmoid(delta[:, 2:]))


def test_sine_encoding_of_points_is_the_centre_part_of_the_box_encoding():
    boxes = torch.rand(3, 4)
    torch.testing.assert_close(
        sine_encoding_of_boxes(boxes[:, :2], 16), sine_encoding_of_boxes(boxes, 16)[:, :32]
    )


def test_valid_ratios_and_reference_points_follow_the_padding():
    """An image whose valid part is 3 of 4 columns and 2 of 4 rows: ratios (0.75, 0.5); each
    token's centre, normalised by the valid size, is mapped back onto every padded level."""
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, :2, :3] = False
    small = torch.ones(1, 2, 2, dtype=torch.bool)
    small[:, :1, :] = False  # valid: 1 of 2 rows, 2 of 2 columns
    ratios = valid_ratios([mask, small])
    torch.testing.assert_close(ratios, torch.tensor([[[0.75, 0.5], [1.0, 0.5]]]))
    ref = encoder_reference_points([(4, 4), (2, 2)], ratios)  # [1,20,2,2]
    # token (row 0, col 1) of level 0: centre (1.5, 0.5) px -> (1.5/3, 0.5/2) of the valid part
    x, y = 1.5 / 3, 0.5 / 2
    torch.testing.assert_close(ref[0, 1, 0], torch.tensor([x * 0.75, y * 0.5]))
    torch.testing.assert_close(ref[0, 1, 1], torch.tensor([x * 1.0, y * 0.5]))


def test_encoder_proposals_on_the_valid_part_and_masked_tokens():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, :, 4:] = True  # right half padded
    ratios = valid_ratios([mask])
    memory = Memory(torch.zeros(1, 32, 8), None, mask.flatten(1), [(4, 8)], ratios)
    logits, keep = encoder_proposals(memory)
    boxes = logits.sigmoid()[0].view(4, 8, 4)
    torch.testing.assert_close(boxes[1, 2], torch.tensor([2.5 / 4, 1.5 / 4, 0.05, 0.05]))
    assert not keep[0].view(4, 8)[:, 4:].any() and keep[0].view(4, 8)[:, :4].all()
    assert torch.isinf(logits[0].view(4, 8, 4)[:, 4:]).all()


def test_conditional_spatial_query_is_scaled_after_the_first_layer():
    """Layer 0's cross-attention position is the bare sine of the reference point; later layers
    multiply it by query_scale(content); the self-attention keeps the learned position."""
    net = ConditionalDETRNet(ConditionalDETRConfig(3, backbone=SINGLE, d_model=16, nhead=2))
    head = net.decoder.query_pos_head
    ref, tgt = torch.rand(2, 5, 2), torch.randn(2, 5, 16)
    pos0, cross0 = head(ref, tgt, 0)
    pos1, cross1 = head(ref, tgt, 1)
    assert pos0 is None and pos1 is None
    torch.testing.assert_close(cross0, sine_encoding_of_boxes(ref, 8))
    torch.testing.assert_close(cross1, cross0 * head.query_scale(tgt))


def test_valid_ratios_reach_the_deformable_cross_attention():
    """The decoder's references are image-normalised; on padded maps the sampling moves to the
    valid part: same output as feeding references already scaled by the ratios."""
    from detr_lineage.nn.transformer import DeformableCrossAttention

    torch.manual_seed(0)
    attn = DeformableCrossAttention(16, 2, 2, 2)
    shapes = [(4, 4), (2, 2)]
    value, query, ref = torch.randn(1, 20, 16), torch.randn(1, 3, 16), torch.rand(1, 3, 4)
    ratios = torch.tensor([[[0.5, 0.75], [1.0, 0.5]]])
    out = attn(query, None, Memory(value, spatial_shapes=shapes, valid_ratios=ratios), ref)
    scaled = ref[:, :, None] * ratios.repeat(1, 1, 2)[:, None]
    expected = attn(query, None, Memory(value, spatial_shapes=shapes), scaled)
    torch.testing.assert_close(out, expected)


# -- tiny models overfit one batch -----------------------------------------------------------
SINGLE = BackboneConfig(name="conv", channels=[16, 32, 64], return_strides=[8])
MULTI = BackboneConfig(name="conv", channels=[16, 32, 64, 64], return_strides=[4, 8, 16])
TINY = dict(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
            dim_feedforward=128, num_queries=10, dropout=0.0)  # fmt: skip
TINY_CDN = DenoisingConfig(query_budget=8, label_noise=0.25, box_noise=0.4, contrastive=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: make_module(ConditionalDETR, 6, backbone=SINGLE, num_select=10, **TINY),
        lambda: make_module(DeformableDETR, 6, backbone=MULTI, num_select=10, **TINY),
        lambda: make_module(
            DeformableDETR,
            6,
            backbone=MULTI,
            num_select=10,
            box_refine=True,
            two_stage=True,
            **TINY,
        ),
        lambda: make_module(DINO, 6, backbone=MULTI, denoising=TINY_CDN, **TINY),
    ],
    ids=["conditional_detr", "deformable_detr", "deformable_refine_two_stage", "dino"],
)
def test_tiny_model_overfits_one_batch(make):
    """The matching loss falls at least 5x on one fixed batch and the mAP@0.5 of the module's own
    post-processed detections rises."""
    torch.manual_seed(0)
    model, batch = make(), fixed_batch()
    before = map50(model, batch)
    first, last = overfit(model, batch, steps=300)
    after = map50(model, batch)
    assert last < first / 5, (first, last)
    assert before < 0.1 and after > 0.5, (before, after)


def test_dino_decoder_and_denoising_details_are_the_official():
    """IDEA-Research/DINO: references refined from the un-normed layer output, logits clamped at
    1e-3 (its inverse_sigmoid), denoising padding slots with zero, untrained content."""
    torch.manual_seed(0)
    model = make_module(DINO, 6, backbone=MULTI, denoising=TINY_CDN, **TINY)
    decoder = model.net.decoder
    assert decoder.look_forward_twice and decoder.refine_unnormed and decoder.eps == 1e-3
    batch = fixed_batch()
    assert len({len(t["labels"]) for t in batch["targets"]}) > 1  # unequal counts: padding slots
    model.train()
    out = model.net(batch["images"], batch["masks"], batch["targets"])
    loss = model.criterion(out, batch["targets"])["loss"]
    loss.backward()
    padding = model.net.label_embed.weight[model.net.num_classes]
    assert torch.equal(padding, torch.zeros_like(padding))
    assert torch.equal(model.net.label_embed.weight.grad[-1], torch.zeros_like(padding))
    assert model.net.label_embed.weight.grad[:-1].abs().sum() > 0
