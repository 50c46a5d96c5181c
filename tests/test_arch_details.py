"""Architecture details pinned against independent computations, on non-square, asymmetric
inputs (a square symmetric case hides a swapped h/w or x/y):

- RT-DETRv2 query-selection anchors on non-square levels (loop over cells) and their order
  matching the flattened memory tokens;
- which decoder layer each auxiliary output comes from (a network cut after that layer);
- RT-DETRv2's eval_idx (the depth used at inference);
- look-forward-twice: the exact gradient the last layer's box sends to the previous box head;
- DAB-DETR's box sine encoding order (cy, cx, w, h) and the width/height modulation of the
  cross-attention position.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from detr_lineage.lit import DETR, DNDETR, RTDETRv2
from detr_lineage.models.dn_detr import AnchorQueryPosition
from detr_lineage.models.rtdetr_v2 import make_anchors
from detr_lineage.nn.backbone import BackboneConfig
from detr_lineage.nn.position import sine_encoding_of_boxes
from tests.helpers import make_module

SHAPES = [(2, 5), (3, 1), (1, 4)]


def test_anchors_on_non_square_levels():
    eps, size = 0.01, 0.05
    logits, valid = make_anchors(SHAPES, torch.device("cpu"), size, eps)
    want, want_valid = [], []
    for level, (h, w) in enumerate(SHAPES):
        for i in range(h):  # row-major, as the memory is flattened
            for j in range(w):
                box = [(j + 0.5) / w, (i + 0.5) / h, size * 2**level, size * 2**level]
                want.append(box)
                want_valid.append(all(eps < v < 1 - eps for v in box))
    want = torch.tensor(want)
    assert valid[0, :, 0].tolist() == want_valid
    keep = valid[0, :, 0]
    torch.testing.assert_close(logits[0, keep].sigmoid(), want[keep])
    assert torch.isinf(logits[0, ~keep]).all()


def tiny_rtdetr(**kw) -> RTDETRv2:
    torch.manual_seed(0)
    args = dict(
        backbone=BackboneConfig("conv", channels=[8, 16, 16, 16], return_strides=[4, 8, 16]),
        hidden_dim=32,
        encoder_dim=32,
        nhead=4,
        encoder_dim_feedforward=32,
        expansion=0.5,
        depth_mult=0.34,
        num_queries=10,
        num_decoder_layers=3,
        dim_feedforward=32,
    )
    module = make_module(RTDETRv2, 4, **{**args, **kw})
    with torch.no_grad():  # trained-looking box heads: zero-initialised ones hide a layer mix-up
        for head in module.net.dec_bbox_heads:
            head.layers[-1].weight.normal_(0, 0.3)
            head.layers[-1].bias.normal_(0, 0.3)
    return module


def test_memory_tokens_follow_the_anchor_order():
    """Token k of the flattened memory is the cell the anchor k describes (non-square maps)."""
    net = tiny_rtdetr().net.eval()
    maps = []
    hooks = [p.register_forward_hook(lambda m, i, o: maps.append(o)) for p in net.input_proj]
    with torch.no_grad():
        memory = net.memory(torch.rand(2, 3, 32, 80))
    for h in hooks:
        h.remove()
    assert memory.spatial_shapes == [(8, 20), (4, 10), (2, 5)]
    offset = 0
    for m in maps:
        h, w = m.shape[-2:]
        for i, j in [(0, w - 1), (h - 1, 0), (1, 3)]:
            torch.testing.assert_close(memory.value[:, offset + i * w + j], m[:, :, i, j])
        offset += h * w


def tiny(cls, **kw):
    torch.manual_seed(0)
    if cls is RTDETRv2:
        return tiny_rtdetr(**kw)
    module = make_module(
        cls,
        4,
        backbone=BackboneConfig("conv", channels=[8, 16, 16, 16], return_strides=[16]),
        d_model=32,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=3,
        dim_feedforward=32,
        num_queries=10,
        dropout=0.0,
        **kw,
    )
    with torch.no_grad():
        module.net.box_head.layers[-1].weight.normal_(0, 0.3)
    return module


def cut_after(module, layers: int):
    """An independent network: the same weights with the decoder cut after ``layers``."""
    net = copy.deepcopy(module.net)
    del net.decoder.layers[layers:]
    if isinstance(module, RTDETRv2):
        del net.dec_score_heads[layers:], net.dec_bbox_heads[layers:]
        net.eval_layers = layers
    return net


@pytest.mark.parametrize("cls", [DETR, DNDETR, RTDETRv2], ids=["detr", "dn_detr", "rtdetr_v2"])
def test_each_aux_output_comes_from_its_layer(cls):
    module = tiny(cls)
    images, masks = torch.rand(2, 3, 32, 48), torch.zeros(2, 32, 48, dtype=torch.bool)
    module.net.train()  # the training outputs (aux); no targets -> no denoising
    with torch.no_grad():
        out = module.net(images, masks)
        assert len(out["aux_outputs"]) == 2
        for k, aux in enumerate([*out["aux_outputs"], out]):
            ref = cut_after(module, k + 1).train()(images, masks)
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(aux[key], ref[key], msg=f"layer {k} {key}")


@pytest.mark.parametrize("eval_idx, layers", [(0, 1), (1, 2), (-1, 3)])
def test_rtdetr_eval_idx_is_the_inference_depth(eval_idx, layers):
    module = tiny_rtdetr(eval_idx=eval_idx)
    images, masks = torch.rand(2, 3, 32, 48), torch.zeros(2, 32, 48, dtype=torch.bool)
    module.eval()
    with torch.no_grad():
        out = module.net(images, masks)
        ref = cut_after(module, layers).eval()(images, masks)
    torch.testing.assert_close(out["pred_boxes"], ref["pred_boxes"])
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"])


@pytest.mark.parametrize("training", [True, False])
def test_look_forward_twice_gradient(training):
    """Training: layer L's box is sigmoid(delta_L + logit(box_{L-1})) with box_{L-1} not
    detached, so d sum(box_L) / d bias of box head L-1's last layer is sum p(1 - p) (logit and
    sigmoid cancel), and nothing reaches box head L-2. Evaluation: references are detached."""
    module = tiny_rtdetr()
    net = module.net.train(training)
    out = net(torch.rand(2, 3, 32, 48), torch.zeros(2, 32, 48, dtype=torch.bool))
    p = out["pred_boxes"]
    p.sum().backward()
    heads = net.dec_bbox_heads
    grad = heads[1].layers[-1].bias.grad
    if training:
        torch.testing.assert_close(grad, (p * (1 - p)).detach().sum((0, 1)))
    else:
        assert grad is None or torch.equal(grad, torch.zeros(4))
    assert heads[2].layers[-1].bias.grad.abs().sum() > 0
    grad = heads[0].layers[-1].bias.grad
    assert grad is None or torch.equal(grad, torch.zeros(4))


def sine(v: float, num_feats: int, temperature: float = 10000.0) -> list[float]:
    out = []
    for k in range(num_feats):
        angle = v * 2 * math.pi / temperature ** (2 * (k // 2) / num_feats)
        out.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
    return out


def test_dab_box_sine_encoding_order():
    cx, cy, w, h = 0.1, 0.7, 0.3, 0.05
    got = sine_encoding_of_boxes(torch.tensor([[cx, cy, w, h]]), 8)[0]
    want = sine(cy, 8) + sine(cx, 8) + sine(w, 8) + sine(h, 8)
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize("layer", [0, 2])
def test_dab_width_height_modulation(layer):
    d = 16
    torch.manual_seed(0)
    head = AnchorQueryPosition(d)
    ref = torch.tensor([[[0.2, 0.6, 0.4, 0.1], [0.7, 0.3, 0.05, 0.5]]])  # w != h
    tgt = torch.randn(1, 2, d)
    query_pos, cross = head(ref, tgt, layer)
    with torch.no_grad():
        for q in range(2):
            cx, cy, w, h = ref[0, q].tolist()
            enc = torch.tensor(
                sine(cy, d // 2) + sine(cx, d // 2) + sine(w, d // 2) + sine(h, d // 2)
            )
            torch.testing.assert_close(query_pos[0, q], head.ref_point_head(enc))
            centre = enc[:d]  # (y part, x part)
            if layer > 0:
                centre = centre * head.query_scale(tgt[0, q])
            w_ref, h_ref = head.ref_anchor_head(tgt[0, q]).sigmoid().tolist()
            want = torch.cat([centre[: d // 2] * (h_ref / h), centre[d // 2 :] * (w_ref / w)])
            torch.testing.assert_close(cross[0, q], want)
