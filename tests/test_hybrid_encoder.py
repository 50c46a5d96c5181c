"""RT-DETR hybrid encoder: RepVGG fusion, shapes, AIFI placement, sizes against the official."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lineage.nn.hybrid_encoder import (
    HybridEncoder,
    RepVggBlock,
    aifi_position_encoding,
    fuse_repvgg,
)
from detr_lineage.nn.resnet_vd import ResNetVd
from detr_lineage.nn.transformer import EncoderLayer

# Official counts: lyuwenyu/RT-DETR @068dfde (rtdetrv2_pytorch), PResNet
# (src/nn/backbone/presnet.py, return_idx [1,2,3]) and HybridEncoder
# (src/zoo/rtdetr/hybrid_encoder.py) built in a scratch copy with each configs/rtdetrv2/*.yml's
# settings and counted with sum(p.numel() for p in m.parameters()) (all parameters; with
# freeze_norm=True L/X have fewer *trainable* ones, see tests/test_resnet_vd.py).
CONFIGS = {
    # name: (depth, encoder kwargs, official backbone, official encoder)
    "S": (18, dict(in_channels=[128, 256, 512], expansion=0.5), 11_199_968, 4_965_120),
    "M*": (34, dict(in_channels=[128, 256, 512], expansion=0.5), 21_308_128, 4_965_120),
    "M": (50, dict(in_channels=[512, 1024, 2048], expansion=0.5), 23_527_264, 5_653_248),
    "L": (50, dict(in_channels=[512, 1024, 2048], expansion=1.0), 23_527_264, 11_950_848),
    "X": (
        101,
        dict(in_channels=[512, 1024, 2048], hidden_dim=384, dim_feedforward=2048, expansion=1.0),
        42_519_392,
        26_577_536,
    ),
}

SMALL = dict(in_channels=[8, 16, 32], hidden_dim=32, nhead=4, dim_feedforward=64)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_bn(m: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN running statistics and affine values (fresh BN folds to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.2)


def small_feats(batch: int = 2, size: int = 16) -> list[torch.Tensor]:
    """Three levels at strides 1/2/4 of ``size`` with SMALL's channels."""
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(batch, c, size // s, size // s, generator=g)
        for c, s in zip(SMALL["in_channels"], (1, 2, 4))
    ]


def test_repvgg_fuse_equals_two_branches() -> None:
    torch.manual_seed(0)
    block = RepVggBlock(16, 24, act="silu")
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 16, 9, 11)
    with torch.no_grad():
        ref = block(x)
        block.fuse()
        out = block(x)
    assert block.conv1 is None and block.conv2 is None and block.conv is not None
    assert (out - ref).abs().max().item() <= 1e-5
    block.fuse()  # idempotent
    with torch.no_grad():
        assert torch.equal(block(x), out)


def test_encoder_deploy_equals_eval_outputs() -> None:
    torch.manual_seed(0)
    enc = HybridEncoder(**SMALL, expansion=0.5)
    randomize_bn(enc)
    enc.eval()
    feats = small_feats()
    with torch.no_grad():
        ref = enc(feats)
        n_blocks = sum(isinstance(m, RepVggBlock) for m in enc.modules())
        assert enc.deploy() is enc
        out = enc(feats)
    assert n_blocks == 4 * 3  # 2 FPN + 2 PAN CSP layers x round(3 * depth_mult)
    assert all(m.conv is not None for m in enc.modules() if isinstance(m, RepVggBlock))
    for a, b in zip(ref, out):
        assert (a - b).abs().max().item() <= 1e-5
    assert fuse_repvgg(enc) is enc  # fusing twice is a no-op


def test_output_shapes_at_640() -> None:
    enc = HybridEncoder([128, 256, 512], expansion=0.5)
    assert enc.out_channels == [256, 256, 256] and enc.strides == [8, 16, 32]
    with torch.device("meta"):  # shape propagation only: 640x640 maps cost nothing
        enc = enc.to("meta")
        feats = [torch.rand(2, c, s, s) for c, s in zip([128, 256, 512], [80, 40, 20])]
        outs = enc(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 256, 80, 80), (2, 256, 40, 40), (2, 256, 20, 20)]


def test_backbone_and_encoder_at_odd_size_run_and_train() -> None:
    torch.manual_seed(0)
    backbone = ResNetVd(18)
    enc = HybridEncoder(backbone.out_channels, hidden_dim=64, nhead=4, expansion=0.5)
    outs = enc(backbone(torch.rand(2, 3, 97, 131)))  # strides give 13x17, 7x9, 4x5
    assert [tuple(o.shape) for o in outs] == [(2, 64, 13, 17), (2, 64, 7, 9), (2, 64, 4, 5)]
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_aifi_runs_only_on_the_last_level() -> None:
    enc = HybridEncoder(**SMALL).eval()
    seen: list[tuple[int, ...]] = []
    for m in enc.modules():
        if isinstance(m, EncoderLayer):
            m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        enc(small_feats(batch=2, size=16))
    assert seen == [(2, 4 * 4, 32)]  # one layer, on the 4x4 top level only

    two = HybridEncoder(**SMALL, use_encoder_idx=(1, 2), num_encoder_layers=2)
    assert sum(isinstance(m, EncoderLayer) for m in two.modules()) == 4
    none = HybridEncoder(**SMALL, num_encoder_layers=0)
    assert not any(isinstance(m, EncoderLayer) for m in none.modules())
    assert none(small_feats())[2].shape == (2, 32, 4, 4)


def official_pe(h: int, w: int, dim: int, temperature: float, first: int) -> torch.Tensor:
    """The official layout [sin y | cos y | sin x | cos x], frequencies 1/T^(i/(dim/4)).

    Written from the formula in rtdetrv2's build_2d_sincos_position_embedding, but on
    row-major (y, x) tokens, which is what it computes for the square maps it is used on.
    ``first`` is the first coordinate (official 0; before the fix ours counted from 1).
    """
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float32) + first,
        torch.arange(w, dtype=torch.float32) + first,
        indexing="ij",
    )
    ay = y.flatten()[:, None] * omega  # [h*w, dim/4]
    ax = x.flatten()[:, None] * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)[None]


@pytest.mark.parametrize(("h", "w"), [(20, 20), (5, 7)])
def test_aifi_position_encoding_layout(h: int, w: int) -> None:
    pos = aifi_position_encoding(h, w, 256, 10000.0, torch.device("cpu"))
    assert pos.shape == (1, h * w, 256)
    torch.testing.assert_close(pos, official_pe(h, w, 256, 10000.0, first=0))
    assert not torch.allclose(pos, official_pe(h, w, 256, 10000.0, first=1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_param_counts_match_official(name: str) -> None:
    depth, kwargs, official_backbone, official_encoder = CONFIGS[name]
    with torch.device("meta"):
        backbone = ResNetVd(depth)
        enc = HybridEncoder(**kwargs)
    nb, ne = n_params(backbone), n_params(enc)
    print(
        f"{name}: backbone {nb:,} (official {official_backbone:,}), encoder {ne:,} "
        f"(official {official_encoder:,}), sum {nb + ne:,}"
    )
    assert backbone.out_channels == kwargs["in_channels"]
    assert nb == official_backbone
    assert ne == official_encoder


def test_depth_mult_and_validation() -> None:
    enc = HybridEncoder(**SMALL, depth_mult=0.34)  # round(3 * 0.34) = 1 block per CSP layer
    assert sum(isinstance(m, RepVggBlock) for m in enc.modules()) == 4
    with pytest.raises(ValueError, match="use_encoder_idx"):
        HybridEncoder(**SMALL, use_encoder_idx=(3,))
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        HybridEncoder(**SMALL)(small_feats()[:2])
