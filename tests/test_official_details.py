"""Details where the official code's outputs depend on a choice ours must make the same way."""

from __future__ import annotations

import torch
from torch import nn

from detr_lineage.data.collate import collate_detection
from detr_lineage.models.common import IMAGENET_MEAN, IMAGENET_STD, NormalizedBackbone
from detr_lineage.models.detr import DETRConfig, DETRNet
from detr_lineage.nn.backbone import BackboneConfig


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(x)
        return [x]


def test_padding_is_zero_after_normalisation() -> None:
    """The official DETR normalises each image, then pads with 0; the collate pads in [0, 1]."""
    torch.manual_seed(0)
    small, big = torch.rand(3, 5, 6), torch.rand(3, 8, 7)
    batch = collate_detection([(small, {}), (big, {})])
    backbone = NormalizedBackbone(
        BackboneConfig(name="conv", return_strides=[16]), IMAGENET_MEAN, IMAGENET_STD
    )
    backbone.body = Recorder()
    backbone(batch["images"], batch["masks"])
    seen = backbone.body.seen[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    official = torch.zeros(2, 3, 8, 7)
    official[0, :, :5, :6] = (small - mean) / std
    official[1] = (big - mean) / std
    torch.testing.assert_close(seen, official, rtol=0, atol=1e-6)


def test_detr_output_of_a_padded_image_equals_the_officially_padded_one() -> None:
    """End to end: DETR on our collated batch == DETR fed the officially padded input."""
    torch.manual_seed(0)
    net = DETRNet(
        DETRConfig(
            3,
            BackboneConfig(name="conv", channels=[8, 16], return_strides=[4]),
            d_model=32,
            nhead=4,
            num_encoder_layers=1,
            num_decoder_layers=2,
            dim_feedforward=32,
            num_queries=5,
        )
    ).eval()
    small, big = torch.rand(3, 19, 23), torch.rand(3, 32, 28)  # odd: convs see padding
    batch = collate_detection([(small, {}), (big, {})])
    with torch.no_grad():
        ours = net(batch["images"], batch["masks"])["pred_logits"]
        # the official input: pad the normalised image with 0 == pad [0,1] images with the mean
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        images = torch.where(batch["masks"][:, None], mean, batch["images"])
        net.encoder.backbone.forward = lambda x, masks=None, f=net.encoder.backbone.forward: f(x)
        official = net(images, batch["masks"])["pred_logits"]
    torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_rtdetrv2_m_star_has_no_weight_decay_on_encoder_decoder_biases() -> None:
    """Official M* (R34) config: no decay on encoder/decoder norms *and biases*; S: norms only."""
    from .test_configs import _coco

    def decayed(name: str) -> set[str]:
        (model, _, _), _ = _coco(name)
        ids = {
            id(p) for g in model.parameter_groups() if g["weight_decay"] > 0 for p in g["params"]
        }
        return {n for n, p in model.net.named_parameters() if id(p) in ids}

    m_star, s = decayed("rtdetrv2_r34"), decayed("rtdetrv2_r18")
    head_bias = "dec_score_heads.0.bias"
    assert head_bias not in m_star and head_bias in s
    assert not any(n.endswith(".bias") and not n.startswith("backbone.") for n in m_star)
    assert any(n.endswith(".bias") for n in s)
    assert "decoder.layers.0.ffn.linear1.weight" in m_star  # weights still decay


def test_rtdetrv2_decoder_ffn_and_query_pos_head_use_xavier_init() -> None:
    """Official RT-DETRv2: xavier-uniform decoder FFN and query_pos_head weights. Their bound
    sqrt(6 / (fan_in + fan_out)) differs from PyTorch's default 1 / sqrt(fan_in)."""
    import math

    from detr_lineage.models.rtdetr_v2 import RTDETRv2Config, RTDETRv2Net

    torch.manual_seed(0)
    backbone = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[2, 4, 8])
    net = RTDETRv2Net(RTDETRv2Config(3, backbone, hidden_dim=64, encoder_dim=64,
                      num_decoder_layers=2, dim_feedforward=1024, num_queries=10))  # fmt: skip
    linears = [net.decoder.query_pos_head.mlp.layers[0], net.decoder.query_pos_head.mlp.layers[1]]
    for layer in net.decoder.layers:
        linears += [layer.ffn.linear1, layer.ffn.linear2]
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        xavier = math.sqrt(6 / (fan_in + fan_out))
        w = linear.weight.abs().max().item()
        assert 0.9 * xavier < w <= xavier, (tuple(linear.weight.shape), w, xavier)


def test_rtdetrv2_multiscale_batches_as_the_official_collate() -> None:
    """Official M*/M/L/X: each training batch resized (nearest) to a random square size from
    480..800 until stop_epoch; S: off. Evaluation batches are never resized."""
    import types

    import torch.nn.functional as F

    from detr_lineage.data.coco import CocoDataModule

    from .test_configs import _coco

    scales = [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]
    for name, want in [("rtdetrv2_r18", None), ("rtdetrv2_r34", scales), ("rtdetrv2_r50", scales),
                       ("rtdetrv2_r101", scales)]:  # fmt: skip
        (_, data, _), _ = _coco(name)
        assert data.rtdetr_multiscale == want, name

    dm = CocoDataModule("unused", recipe="rtdetr", rtdetr_multiscale=[8, 12], rtdetr_stop_epoch=2)
    images = torch.rand(2, 3, 10, 10)
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
              "size": torch.tensor([10, 10])}  # fmt: skip
    batch = {"images": images, "masks": torch.zeros(2, 10, 10, dtype=torch.bool),
             "targets": [target, target]}  # fmt: skip
    dm.trainer = types.SimpleNamespace(training=True, current_epoch=0)
    sides = set()
    for _ in range(20):
        out = dm.on_after_batch_transfer(batch, 0)
        side = out["images"].shape[-1]
        sides.add(side)
        torch.testing.assert_close(out["images"], F.interpolate(images, size=(side, side)))
        assert out["masks"].shape == (2, side, side) and not out["masks"].any()
        assert out["targets"][0]["size"].tolist() == [side, side]
        assert torch.equal(out["targets"][0]["boxes"], target["boxes"])
    assert sides == {8, 12}
    dm.trainer = types.SimpleNamespace(training=True, current_epoch=2)  # stop_epoch reached
    assert dm.on_after_batch_transfer(batch, 0)["images"] is images
    dm.trainer = types.SimpleNamespace(training=False, current_epoch=0)  # evaluation
    assert dm.on_after_batch_transfer(batch, 0)["images"] is images


def test_dn_detr_transformer_uses_xavier_init_and_zero_box_head() -> None:
    """Official DN-DETR: xavier on every matrix of its Transformer (encoder, decoder layers,
    query-scale / reference-point / anchor heads); the box head's last layer stays zero."""
    import math

    from detr_lineage.models.dn_detr import DNDETRConfig, DNDETRNet

    torch.manual_seed(0)
    backbone = BackboneConfig(name="conv", channels=[8, 16], return_strides=[4])
    sizes = dict(d_model=64, nhead=4, num_encoder_layers=1, num_decoder_layers=2)
    net = DNDETRNet(DNDETRConfig(3, backbone, dim_feedforward=512, num_queries=5, **sizes))
    parts = [net.decoder.layers, net.decoder.query_pos_head, net.encoder.pos_scale]
    matrices = [p for part in parts for p in part.parameters() if p.dim() == 2]
    assert len(matrices) > 10
    for w in matrices:
        fan_out, fan_in = w.shape
        xavier = math.sqrt(6 / (fan_in + fan_out))
        assert 0.8 * xavier < w.abs().max().item() <= xavier, tuple(w.shape)
    assert not net.box_head.layers[-1].weight.any() and not net.box_head.layers[-1].bias.any()
