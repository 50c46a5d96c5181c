"""Hyper-parameter wiring: what a LightningModule passes to its matcher, criterion,
post-processing and network is what its arguments say, and the denoising on/off twins differ
only by denoising.

Every argument of each variant gets distinct non-default values (so a swap shows), and a test
fails if a variant grows an argument that no check here covers.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from detr_lineage.criterion import SetCriterion
from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DETR, DNDETR, RTDETRv2
from detr_lineage.matcher import HungarianMatcher
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

from .helpers import NO_DENOISING, ROOT, build, parse

NC = 5
DN = DenoisingConfig(groups=3, label_noise=0.3, box_noise=0.5, contrastive=True)
LOSS = dict(
    cost_class=1.7,
    cost_bbox=4.1,
    cost_giou=2.9,
    weight_class=1.3,
    weight_bbox=6.2,
    weight_giou=3.4,
)
VARIANTS = {
    "detr": (
        DETR,
        dict(
            backbone=BackboneConfig("conv", channels=[8, 16, 24, 40], return_strides=[16]),
            d_model=32,
            nhead=2,
            num_encoder_layers=2,
            num_decoder_layers=3,
            dim_feedforward=48,
            dropout=0.15,
            num_queries=7,
            pre_norm=True,
            aux_loss=True,
            denoising=DN,
            dn_combine="concat",
            eos_coef=0.23,
            **LOSS,
        ),
    ),
    "dn_detr": (
        DNDETR,
        dict(
            backbone=BackboneConfig("conv", channels=[8, 16, 24, 40], return_strides=[16]),
            d_model=32,
            nhead=2,
            num_encoder_layers=2,
            num_decoder_layers=3,
            dim_feedforward=48,
            dropout=0.15,
            activation="gelu",
            num_queries=7,
            pe_temperature=33.0,
            denoising=DN,
            aux_loss=True,
            focal_alpha=0.35,
            focal_gamma=1.5,
            num_select=9,
            **LOSS,
        ),
    ),
    "rtdetr_v2": (
        RTDETRv2,
        dict(
            backbone=BackboneConfig("conv", channels=[8, 16, 24, 40], return_strides=[4, 8, 16]),
            hidden_dim=32,
            nhead=2,
            encoder_dim=24,
            encoder_dim_feedforward=40,
            num_encoder_layers=2,
            expansion=0.5,
            depth_mult=0.67,
            num_queries=7,
            num_decoder_layers=3,
            dim_feedforward=48,
            dropout=0.15,
            num_points=[2, 3, 1],
            cross_attn_method="discrete",
            eval_idx=1,
            denoising=DN,
            aux_loss=True,
            vfl_alpha=0.65,
            vfl_gamma=1.5,
            focal_alpha=0.3,
            focal_gamma=1.7,
            num_select=9,
            **LOSS,
        ),
    ),
}
# DetectionModule's own arguments are checked in test_optim.py
BASE_ARGS = set(inspect.signature(DETR.__mro__[1].__init__).parameters) - {"self"}


def make(name: str, **override):
    cls, kw = VARIANTS[name]
    torch.manual_seed(0)
    return make_module(cls, NC, **{**kw, **override})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_argument_has_a_wiring_check(name):
    cls, kw = VARIANTS[name]
    own = cls.__mro__[: cls.__mro__.index(DETR.__mro__[1])]  # up to DetectionModule
    args = set().union(*(inspect.signature(c.__init__).parameters for c in own))
    args -= {"self", "net", "kwargs"}
    args |= {f.name for f in dataclasses.fields(cls.net_config)} - {"num_classes"}
    missing = args - set(kw)
    assert not missing, f"{cls.__name__} arguments without a wiring check here: {missing}"


def _reference_criterion(name: str) -> SetCriterion:
    """The criterion the papers' settings describe, built from VARIANTS' values by hand."""
    kw = VARIANTS[name][1]
    costs = (kw["cost_class"], kw["cost_bbox"], kw["cost_giou"])
    weights = (kw["weight_class"], kw["weight_bbox"], kw["weight_giou"])
    if name == "detr":
        return SetCriterion(NC, HungarianMatcher(*costs, "softmax"), "ce", *weights, kw["eos_coef"])
    if name == "dn_detr":
        a, g = kw["focal_alpha"], kw["focal_gamma"]
        return SetCriterion(
            NC, HungarianMatcher(*costs, "focal", a, g), "focal", *weights, 0.1, a, g
        )
    # RT-DETRv2: the matcher's focal cost takes focal_alpha / focal_gamma (official 0.25 / 2),
    # the varifocal loss its own vfl_alpha / vfl_gamma
    matcher = HungarianMatcher(*costs, "focal", kw["focal_alpha"], kw["focal_gamma"])
    return SetCriterion(NC, matcher, "vfl", *weights, 0.1, kw["vfl_alpha"], kw["vfl_gamma"])


def _targets() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate([3, 1]):
        xy = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        out.append(
            {
                "boxes": torch.cat([xy, wh], 1),
                "labels": torch.randint(0, NC, (n,), generator=g),
                "image_id": i,
                "orig_size": torch.tensor([64, 64]),
            }
        )
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matcher_and_criterion_receive_the_modules_values(name):
    module, kw = make(name), VARIANTS[name][1]
    m = module.criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (
        kw["cost_class"],
        kw["cost_bbox"],
        kw["cost_giou"],
    )
    ref = _reference_criterion(name)
    assert m.class_cost == ref.matcher.class_cost
    assert (m.focal_alpha, m.focal_gamma) == (ref.matcher.focal_alpha, ref.matcher.focal_gamma)
    c = module.criterion
    assert c.weights == ref.weights and c.class_loss == ref.class_loss
    assert (c.alpha, c.gamma) == (ref.alpha, ref.gamma) or c.class_loss == "ce"
    torch.testing.assert_close(c.empty_weight, ref.empty_weight)
    # the same numbers on a training batch (main, aux, encoder and denoising terms)
    module.train()
    targets = _targets()
    torch.manual_seed(3)
    out = module(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    assert "dn_outputs" in out  # denoising reached the network
    got, want = c(out, targets), ref(out, targets)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_postprocess_receives_the_modules_values(name):
    module, kw = make(name), VARIANTS[name][1]
    pp = module.postprocess
    if name == "detr":
        assert pp.mode == "softmax"
    else:
        assert (pp.mode, pp.num_select) == ("sigmoid", kw["num_select"])
    module.eval()
    with torch.no_grad():
        out = module(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    dets = module.detections(out, _targets())
    want = kw["num_queries"] if name == "detr" else kw["num_select"]
    assert [len(d["scores"]) for d in dets] == [want, want]


def _layer_shapes(module, kw):
    """What the network's structure says, per argument (read from the built modules)."""
    net = module.net
    dec = net.decoder.layers
    seen = {
        "num_decoder_layers": len(dec),
        "dim_feedforward": dec[0].ffn.linear1.out_features,
        "dropout": dec[0].dropout1.p,
        "nhead": dec[0].self_attn.num_heads,
        "aux_loss": net.aux_loss,
        "denoising": net.denoising,
        "num_queries": net.num_queries,
    }
    if isinstance(module, RTDETRv2):
        enc = net.encoder
        aifi = enc.encoder[0]
        attn = dec[0].cross_attn.attn
        seen |= {
            "hidden_dim": dec[0].self_attn.embed_dim,
            "encoder_dim": enc.hidden_dim,
            "encoder_dim_feedforward": aifi.layers[0].ffn.linear1.out_features,
            "num_encoder_layers": len(aifi.layers),
            "expansion": enc.fpn_blocks[0].conv1.conv.out_channels / enc.hidden_dim,
            "depth_mult": len(enc.fpn_blocks[0].bottlenecks),
            "num_points": list(attn.num_points),
            "cross_attn_method": attn.method,
            "eval_idx": net.eval_layers - 1,
            "backbone": net.backbone.body.out_channels,
        }
        seen["nhead"] = (seen["nhead"], aifi.layers[0].self_attn.num_heads, attn.n_heads)
        seen["dropout"] = (seen["dropout"], aifi.layers[0].dropout.p)
    else:
        enc = net.encoder
        seen |= {
            "d_model": dec[0].self_attn.embed_dim,
            "num_encoder_layers": len(enc.layers),
            "backbone": enc.backbone.body.out_channels,
        }
        seen["nhead"] = (seen["nhead"], enc.layers[0].self_attn.num_heads)
        seen["dropout"] = (seen["dropout"], enc.layers[0].dropout.p)
        seen["dim_feedforward"] = (seen["dim_feedforward"], enc.layers[0].ffn.linear1.out_features)
    if isinstance(module, DETR):
        seen["pre_norm"] = (dec[0].normalize_before, enc.layers[0].normalize_before)
        seen["dn_combine"] = net.dn_query_pos.combine
    if isinstance(module, DNDETR):
        seen["activation"] = type(dec[0].ffn.activation).__name__.lower()
        seen["pe_temperature"] = enc.pe_temperature
    return seen


@pytest.mark.parametrize("name", list(VARIANTS))
def test_network_receives_the_modules_values(name):
    module, kw = make(name), VARIANTS[name][1]
    seen = _layer_shapes(module, kw)
    want = dict(kw)
    want["backbone"] = [kw["backbone"].channels[-1]] * len(kw["backbone"].return_strides)
    if name == "rtdetr_v2":
        want["backbone"] = [kw["backbone"].channels[i] for i in (1, 2, 3)]
        want["depth_mult"] = round(3 * kw["depth_mult"])  # RepVGG blocks per CSP layer
        want["nhead"] = (kw["nhead"],) * 3
        want["dropout"] = (kw["dropout"],) * 2
    else:
        want["nhead"] = (kw["nhead"],) * 2
        want["dropout"] = (kw["dropout"],) * 2
        want["dim_feedforward"] = (kw["dim_feedforward"],) * 2
    if name == "detr":
        want["pre_norm"] = (True, True)
    if name == "dn_detr":
        want["activation"] = "gelu"
    for key, value in seen.items():
        assert (
            value == pytest.approx(want[key]) if isinstance(value, float) else value == want[key]
        ), key
    # the class head sizes follow num_classes (+1 no-object for DETR's softmax)
    module.eval()
    with torch.no_grad():
        out = module(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out["pred_logits"].shape[-1] == NC + (name == "detr")
    assert len(out["aux_outputs"]) == kw["num_decoder_layers"] - 1 - (name == "rtdetr_v2")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_aux_loss_off_reaches_the_network(name):
    module = make(name, aux_loss=False).train()
    targets = _targets()
    out = module(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    assert "aux_outputs" not in out
    assert not any("_aux" in k for k in module.criterion(out, targets))


# -- the denoising on/off twins -------------------------------------------------------------
def _twin(config: str, dn_off: bool, seed: int = 7):
    configs = [ROOT / config] + ([NO_DENOISING] if dn_off else [])
    parser, cfg = parse(*configs, args=("--model.init_args.net.num_queries=6",))
    torch.manual_seed(seed)
    model, _, _ = build(parser, cfg)
    return model


TWINS = [
    "experiments/toy/dn_detr.yaml",
    "experiments/toy/rtdetr_v2.yaml",
    "experiments/toy/dino.yaml",
]
TWINS += ["experiments/coco/dn_detr_r50.yaml", "experiments/coco/rtdetrv2_r18.yaml"]
TWINS += ["experiments/coco/dino_r50.yaml"]


@pytest.mark.parametrize("config", TWINS, ids=[c.split("/", 1)[1] for c in TWINS])
def test_denoising_twins_have_the_same_parameters_initial_weights_and_eval_outputs(config):
    on, off = _twin(config, False), _twin(config, True)
    assert on.net.denoising is not None and off.net.denoising is None
    s_on, s_off = on.state_dict(), off.state_dict()
    assert s_on.keys() == s_off.keys()
    for key in s_on:
        assert torch.equal(s_on[key], s_off[key]), key
    assert on.hparams.keys() == off.hparams.keys()
    assert {k: v for k, v in on.hparams.items() if k != "net"} == {
        k: v for k, v in off.hparams.items() if k != "net"
    }
    assert {**on.hparams.net, "denoising": None} == off.hparams.net  # CLI: saved as a dict
    if "coco" in config:
        return  # the weights decide the outputs; a COCO-size forward costs seconds
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        a, b = on.eval()(images, masks), off.eval()(images, masks)
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def test_detr_denoising_twin_shares_every_non_denoising_weight():
    """Vanilla DETR + denoising adds its denoising-query embedding, and nothing else moves."""
    on = make("detr")
    off = make("detr", denoising=None)
    s_on, s_off = on.state_dict(), off.state_dict()
    extra = set(s_on) - set(s_off)
    assert extra and all(k.startswith("net.dn_query_pos.") for k in extra)
    assert set(s_off) <= set(s_on)
    for key in s_off:
        assert torch.equal(s_on[key], s_off[key]), key
    images = torch.rand(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        a, b = on.eval()(images, masks), off.eval()(images, masks)
    assert torch.equal(a["pred_logits"], b["pred_logits"])


# -- the focal-loss variants added later (Conditional DETR, Deformable DETR, DINO) -------------
FOCAL_LOSS = dict(LOSS, focal_alpha=0.35, focal_gamma=1.5, num_select=9)
MULTI = BackboneConfig("conv", channels=[8, 16, 24, 40], return_strides=[4, 8, 16])
FOCAL_VARIANTS = {
    "conditional_detr": dict(
        backbone=BackboneConfig("conv", channels=[8, 16, 24, 40], return_strides=[16]),
        d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=48,
        dropout=0.0, num_queries=7, aux_loss=True,
    ),
    "deformable_detr": dict(
        backbone=MULTI, d_model=32, nhead=2, num_levels=4, num_points=2, num_encoder_layers=1,
        num_decoder_layers=3, dim_feedforward=48, dropout=0.0, num_queries=7, box_refine=True,
        two_stage=True, aux_loss=True,
    ),
    "dino": dict(
        backbone=MULTI, d_model=32, nhead=2, num_levels=4, num_points=2, num_encoder_layers=1,
        num_decoder_layers=3, dim_feedforward=48, dropout=0.0, num_queries=7,
        pe_temperature=33.0, denoising=DN, aux_loss=True,
    ),
}  # fmt: skip
# module arguments a variant redeclares with its own default
FOCAL_OWN = {"deformable_detr": dict(lr_linear_proj_mult=0.3)}


def _focal_class(name: str):
    import detr_lineage.lit as lit

    return {
        "conditional_detr": lit.ConditionalDETR,
        "deformable_detr": lit.DeformableDETR,
        "dino": lit.DINO,
    }[name]


@pytest.mark.parametrize("name", list(FOCAL_VARIANTS))
def test_focal_variant_arguments_reach_matcher_criterion_postprocess_and_network(name):
    cls = _focal_class(name)
    kw = {**FOCAL_VARIANTS[name], **FOCAL_LOSS, **FOCAL_OWN.get(name, {})}
    own = cls.__mro__[: cls.__mro__.index(DETR.__mro__[1])]
    args = set().union(*(inspect.signature(c.__init__).parameters for c in own))
    args -= {"self", "net", "kwargs"}
    args |= {f.name for f in dataclasses.fields(cls.net_config)} - {"num_classes"}
    assert not args - set(kw), f"{cls.__name__} arguments without a wiring check here"
    torch.manual_seed(0)
    module = make_module(cls, NC, **kw)
    # matcher, criterion: the values given, and the same losses as a hand-built criterion
    a, g = kw["focal_alpha"], kw["focal_gamma"]
    costs = (kw["cost_class"], kw["cost_bbox"], kw["cost_giou"])
    weights = (kw["weight_class"], kw["weight_bbox"], kw["weight_giou"])
    ref = SetCriterion(NC, HungarianMatcher(*costs, "focal", a, g), "focal", *weights, 0.1, a, g)
    m, c = module.criterion.matcher, module.criterion
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.class_cost) == (*costs, "focal")
    assert (m.focal_alpha, m.focal_gamma, c.alpha, c.gamma) == (a, g, a, g)
    assert c.weights == ref.weights and c.class_loss == "focal"
    if "lr_linear_proj_mult" in kw:  # a default Deformable DETR changes: it reaches the groups
        lrs = {group["name"]: group["lr"] for group in module.parameter_groups()}
        assert lrs["detector_linear_proj"] == pytest.approx(1e-4 * kw["lr_linear_proj_mult"])
    module.train()
    targets = _targets()
    out = module(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    assert ("dn_outputs" in out) == (kw.get("denoising") is not None)
    assert ("enc_outputs" in out) == (name == "dino" or kw.get("two_stage", False))
    got, want = c(out, targets), ref(out, targets)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    # network: queries, classes, decoder depth; post-processing: sigmoid top-num_select
    assert out["pred_logits"].shape == (2, kw["num_queries"], NC)
    assert len(out["aux_outputs"]) == kw["num_decoder_layers"] - 1
    assert module.net.num_queries == kw["num_queries"]
    assert (module.postprocess.mode, module.postprocess.num_select) == ("sigmoid", 9)
    module.eval()
    with torch.no_grad():
        out = module(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    assert [len(d["scores"]) for d in module.detections(out, _targets())] == [9, 9]
    # the network was built from exactly these values
    for key, value in FOCAL_VARIANTS[name].items():
        assert getattr(module.hparams.net, key) == value, key
