"""ResNet-vd (RT-DETR's PResNet) on timm: structure, sizes, freezing, local weight loading."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detr_lineage.nn.backbone import BackboneConfig, build_backbone
from detr_lineage.nn.resnet_vd import ResNetVd, freeze_batch_norm, official_to_timm_key

# Official counts: lyuwenyu/RT-DETR @068dfde, rtdetrv2_pytorch/src/nn/backbone/presnet.py,
# PResNet(depth, variant="d", return_idx=[1, 2, 3], num_stages=4) built in a scratch copy
# and counted with sum(p.numel() for p in model.parameters()).
OFFICIAL_PARAMS = {18: 11_199_968, 34: 21_308_128, 50: 23_527_264, 101: 42_519_392}
# Same, trainable only, with the L/X settings freeze_at=0, freeze_norm=True.
OFFICIAL_TRAINABLE_FROZEN = {50: 23_445_504, 101: 42_385_408}


def n_params(m: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def randomize_bn(m: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine values, so equalities are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(c, generator=g) - 0.5)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_param_count_matches_official(depth: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = ResNetVd(depth)
        frozen = ResNetVd(depth, freeze_at=0, freeze_norm=True)
    print(f"ResNet-vd{depth}: {n_params(net):,} (official {OFFICIAL_PARAMS[depth]:,})")
    assert n_params(net) == OFFICIAL_PARAMS[depth]
    if depth in OFFICIAL_TRAINABLE_FROZEN:
        assert n_params(frozen, trainable_only=True) == OFFICIAL_TRAINABLE_FROZEN[depth]


def test_vd_structure() -> None:
    net = ResNetVd(18)
    stem = [m for m in net.body.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in stem] == [
        (3, 32, (3, 3)),
        (32, 32, (3, 3)),
        (32, 64, (3, 3)),
    ]
    assert isinstance(net.body.layer2[0].downsample[0], nn.AvgPool2d)  # avg-pool shortcut
    # The official first BasicBlock has a 1x1 projection shortcut even at 64 -> 64.
    assert isinstance(net.body.layer1[0].downsample[1], nn.Conv2d)
    assert net.body.layer1[1].downsample is None


@pytest.mark.parametrize(("depth", "channels"), [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_output_shapes(depth: int, channels: list[int]) -> None:
    with torch.device("meta"):  # shape propagation only
        net = ResNetVd(depth).eval()
        outs = net(torch.rand(1, 3, 97, 131))  # odd sizes: every stride-2 step rounds up
    assert net.out_channels == channels
    assert net.strides == [8, 16, 32]
    assert [tuple(o.shape) for o in outs] == [
        (1, channels[0], 13, 17),
        (1, channels[1], 7, 9),
        (1, channels[2], 4, 5),
    ]


def test_output_shapes_640() -> None:
    with torch.device("meta"):
        outs = ResNetVd(18)(torch.rand(1, 3, 640, 640))
    assert [o.shape[-1] for o in outs] == [80, 40, 20]


def test_return_idx_all_stages() -> None:
    net = ResNetVd(18, return_idx=(0, 1, 2, 3))
    assert net.strides == [4, 8, 16, 32] and net.out_channels == [64, 128, 256, 512]
    outs = net(torch.rand(1, 3, 64, 64))
    assert [o.shape[-1] for o in outs] == [16, 8, 4, 2]


@pytest.mark.parametrize(
    ("freeze_at", "frozen"),
    [(-1, []), (0, ["conv1", "bn1"]), (2, ["conv1", "bn1", "layer1", "layer2"])],
)
def test_freeze_at(freeze_at: int, frozen: list[str]) -> None:
    with torch.device("meta"):
        net = ResNetVd(18, freeze_at=freeze_at)
    for name, p in net.body.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name


def test_freeze_norm_replaces_bn_and_keeps_function() -> None:
    net = ResNetVd(18)
    randomize_bn(net)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval()(x)
        freeze_batch_norm(net)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == n_bn
        out = net.train()(x)  # frozen statistics: train mode computes the same thing
    for a, b in zip(ref, out):  # same maths, different rounding order (rsqrt, fused affine)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    fresh = ResNetVd(18, freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fresh.modules())
    bn_params = n_params(ResNetVd(18)) - n_params(fresh)
    assert bn_params == 2 * sum(
        m.weight.numel() for m in fresh.modules() if isinstance(m, FrozenBatchNorm2d)
    )


def test_missing_pretrained_path_names_it(tmp_path) -> None:
    path = tmp_path / "no_such_weights.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        ResNetVd(18, pretrained=str(path))


def test_pretrained_round_trip_and_frozen_bn(tmp_path) -> None:
    src = ResNetVd(18)
    randomize_bn(src)
    path = tmp_path / "r18vd.pth"
    torch.save(src.state_dict(), path)  # our own keys, with the "body." prefix
    dst = ResNetVd(18, pretrained=str(path), freeze_norm=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src.eval()(x), dst.eval()(x)):  # BN vs FrozenBN rounding
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def to_official_key(key: str) -> str:
    """Test-side inverse of the renaming, written from the official PResNet module names."""
    key = key.removeprefix("body.")
    stem = {
        "conv1.0.": "conv1.conv1_1.conv.",
        "conv1.1.": "conv1.conv1_1.norm.",
        "conv1.3.": "conv1.conv1_2.conv.",
        "conv1.4.": "conv1.conv1_2.norm.",
        "conv1.6.": "conv1.conv1_3.conv.",
        "bn1.": "conv1.conv1_3.norm.",
    }
    for ours, theirs in stem.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    m = re.match(r"layer(\d)\.(\d+)\.(.*)", key)
    stage, block, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    stride2 = stage > 0 and block == 0  # official: Sequential(pool, conv=ConvNorm)
    short = "short.conv.conv." if stride2 else "short.conv."
    short_norm = "short.conv.norm." if stride2 else "short.norm."
    for ours, theirs in {
        "downsample.1.": short,
        "downsample.2.": short_norm,
        "conv1.": "branch2a.conv.",
        "bn1.": "branch2a.norm.",
        "conv2.": "branch2b.conv.",
        "bn2.": "branch2b.norm.",
        "conv3.": "branch2c.conv.",
        "bn3.": "branch2c.norm.",
    }.items():
        if rest.startswith(ours):
            rest = theirs + rest[len(ours) :]
            break
    return f"res_layers.{stage}.blocks.{block}.{rest}"


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_official_key_renaming(depth: int) -> None:
    with torch.device("meta"):
        keys = list(ResNetVd(depth).state_dict())
    official = [to_official_key(k) for k in keys]
    assert "res_layers.0.blocks.0.short.conv.weight" in official  # stride-1 projection
    assert "res_layers.1.blocks.0.short.conv.conv.weight" in official  # pooled projection
    assert [official_to_timm_key(k) for k in official] == [k.removeprefix("body.") for k in keys]


def test_official_layout_loads(tmp_path) -> None:
    src = ResNetVd(18)
    randomize_bn(src)
    path = tmp_path / "presnet.pth"
    torch.save({to_official_key(k): v for k, v in src.state_dict().items()}, path)
    dst = ResNetVd(18, pretrained=str(path))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_mismatched_weights_are_named(tmp_path) -> None:
    path = tmp_path / "r18vd.pth"
    good = ResNetVd(18).state_dict()
    torch.save(good, path)
    with pytest.raises(ValueError, match="missing keys") as err:
        ResNetVd(34, pretrained=str(path))  # R34 has more blocks than R18
    assert str(path) in str(err.value)

    state = dict(good)
    state["body.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected keys.*extra\.weight"):
        ResNetVd(18, pretrained=str(path))

    state = dict(good)
    state["body.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="shapes do not match"):
        ResNetVd(18, pretrained=str(path))


def test_build_from_backbone_config() -> None:
    cfg = BackboneConfig(
        name="resnet34vd", frozen_bn=False, return_strides=[8, 16, 32], freeze_at=-1
    )
    with torch.device("meta"):
        net = build_backbone(cfg)
    assert isinstance(net, ResNetVd)
    assert net.depth == 34 and net.strides == [8, 16, 32] and net.out_channels == [128, 256, 512]
    assert n_params(net) == OFFICIAL_PARAMS[34]
