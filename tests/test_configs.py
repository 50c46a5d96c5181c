"""Every experiment YAML under test: it parses with the CLI's parser, builds, and the COCO ones
match the published sizes (README "Fidelity checks") and the official optimisation settings
(../shared/REFERENCE.md), so that a drifting config fails here rather than on a COCO run."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from detr_lineage.analysis.ablate import expand, load_spec, sweep_config

from .helpers import CLI_CONFIGS, NO_DENOISING, ROOT, build, parse, takes_denoising

CASES = [(p, False) for p in CLI_CONFIGS]
CASES += [(p, True) for p in CLI_CONFIGS if takes_denoising(p)]


def _id(case) -> str:
    path, off = case
    return f"{path.parent.name}/{path.stem}" + ("+no_denoising" if off else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_config_parses_and_builds(case):
    path, dn_off = case
    coco = path.parent.name == "coco"
    if coco:
        (model, data, _), config = _coco(path.stem, dn_off)
    else:
        parser, config = parse(path, *([NO_DENOISING] if dn_off else []))
        model, data, _ = build(parser, config)
    assert type(model).__name__ == config.model.class_path.rpartition(".")[2]
    assert type(data).__name__ == config.data.class_path.rpartition(".")[2]
    assert model.num_classes == config.model.init_args.net.num_classes
    if takes_denoising(config):
        raw = yaml.safe_load(path.read_text())["model"]["init_args"]
        assert (model.net.denoising is None) == (dn_off or raw["net"].get("denoising") is None)
    if not coco:  # toy models are small: one forward on real tensors
        # images rendered once and kept in memory, no loader worker competing for the cores
        assert data.num_workers == 0 and data.train_set.cache and data.val_set.cache
        model.eval()
        size = config.data.init_args.image_size
        out = model(torch.rand(2, 3, size, size), torch.zeros(2, size, size, dtype=torch.bool))
        assert out["pred_boxes"].shape[:2] == (2, config.model.init_args.net.num_queries)


# -- ablation specs: the runner's own loader and planner, every planned command parsed --------
SPECS = sorted(
    p for p in (ROOT / "experiments/ablations").glob("*.yaml") if "variants" in p.read_text()
)


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_ablation_spec_plans_valid_fit_commands(spec_path, tmp_path):
    spec = load_spec(spec_path, root=ROOT)
    runs = expand(spec)
    assert runs
    for run in runs:
        cmd = run.command(tmp_path, spec.checkpoint_every_n_steps)
        assert cmd[2:4] == ["detr_lineage", "fit"]
        # flags as the child process receives them; the CLI parser validates every key
        _, config = parse(args=tuple(cmd[4:]))
        assert config.seed_everything == run.seed
        assert config.run.name == run.name and config.run.group == run.group
        if takes_denoising(config):
            assert (config.model.init_args.net.denoising is None) == (run.denoising == "off")
        else:
            assert run.denoising == "off"
        for key, value in spec.overrides.items():
            assert config[key] == value, key


def test_sweep_file_matches_its_spec():
    """The committed W&B sweep lists exactly the groups and seeds the runner plans."""
    committed = yaml.safe_load((ROOT / "experiments/ablations/toy_main_sweep.yaml").read_text())
    spec = load_spec(ROOT / "experiments/ablations/toy_main.yaml", root=ROOT)
    fresh = sweep_config(spec, "experiments/ablations/toy_main.yaml")
    assert json.dumps(committed["parameters"]) == json.dumps(fresh["parameters"])
    groups = sorted({r.group for r in expand(spec)})
    assert sorted(committed["parameters"]["group"]["values"]) == groups


# -- COCO configs against the published numbers -------------------------------------------
# README "Fidelity checks" (ours, params in M to 0.01, GFLOPs to 0.1 at 640x640) and the
# official table (REFERENCE.md section 3/4): params in M, GFLOPs.
RTDETR_SIZES = {
    "rtdetrv2_r18": (20.18, 61.5, 20, 60),
    "rtdetrv2_r34": (31.44, 93.6, 31, 92),
    "rtdetrv2_r50": (42.89, 137.8, 42, 136),
    "rtdetrv2_r101": (76.56, 260.6, 76, 259),
}
# DETR 41M, DN-DETR (DAB-DETR + DN) 44M published. Ours: FrozenBN has no parameters; DN-DETR
# 43.69M, the official structure with 80 class rows instead of 91 ids (43.69M + 5,632).
DETR_SIZES = {"detr_r50": 41, "dn_detr_r50": 44}


@functools.cache
def _coco(name: str, dn_off: bool = False):
    """A COCO config's (module on the meta device, data module, trainer args), config."""
    configs = [ROOT / f"experiments/coco/{name}.yaml"] + ([NO_DENOISING] if dn_off else [])
    parser, config = parse(*configs)
    return build(parser, config, meta=True), config


@pytest.mark.parametrize("name", list(DETR_SIZES))
def test_detr_coco_parameter_count(name):
    (model, _, _), _ = _coco(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - DETR_SIZES[name]) / DETR_SIZES[name] < 0.03, n


@pytest.mark.parametrize("name", list(RTDETR_SIZES))
def test_rtdetr_coco_params_and_flops(name):
    ours_m, ours_gflops, pub_m, pub_gflops = RTDETR_SIZES[name]
    (model, _, _), config = _coco(name)
    net = model.net.eval()
    n = sum(p.numel() for p in net.parameters()) / 1e6
    size = config.data.init_args.rtdetr_size
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, size, size), torch.zeros(1, size, size, dtype=torch.bool))
    gflops = counter.get_total_flops() / 1e9
    assert round(n, 2) == ours_m, n
    assert abs(gflops - ours_gflops) < 0.05, gflops
    assert abs(n - pub_m) / pub_m < 0.03 and abs(gflops - pub_gflops) / pub_gflops < 0.05


@pytest.mark.parametrize("name", ["dn_detr_r50", *RTDETR_SIZES])
def test_coco_denoising_off_twin_has_the_same_parameters(name):
    """Turning denoising off changes no parameter: the ablation differs only by denoising."""
    (on, _, _), _ = _coco(name)
    (off, _, _), _ = _coco(name, dn_off=True)
    assert on.net.denoising is not None and off.net.denoising is None
    shapes = {k: v.shape for k, v in on.state_dict().items()}
    assert shapes == {k: v.shape for k, v in off.state_dict().items()}


# Official optimisation (REFERENCE.md sections 1-3), declared here independently of the YAMLs.
#   lr, backbone lr, weight decay, norms without decay, warm-up steps, lr drops (epochs),
#   epochs, gradient clip, EMA decay (None: no EMA), recipe, stop epoch of the strong augs
OFFICIAL = {
    "detr_r50": (1e-4, 1e-5, 1e-4, False, 0, [200], 300, 0.1, None, "detr", None),
    "dn_detr_r50": (1e-4, 1e-5, 1e-4, False, 0, [40], 50, 0.1, None, "detr", None),
    "rtdetrv2_r18": (1e-4, 1e-4, 1e-4, True, 2000, [], 120, 0.1, 0.9999, "rtdetr", 117),
    "rtdetrv2_r34": (1e-4, 5e-5, 1e-4, True, 2000, [], 120, 0.1, 0.9999, "rtdetr", 117),
    "rtdetrv2_r50": (1e-4, 1e-5, 1e-4, True, 2000, [], 72, 0.1, 0.9999, "rtdetr", 71),
    "rtdetrv2_r101": (1e-4, 1e-6, 1e-4, True, 2000, [], 72, 0.1, 0.9999, "rtdetr", 71),
}
# the network/loss settings each official repository uses at every size
OFFICIAL_NET = {
    "detr_r50": dict(
        num_queries=100,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.1,
        dim_feedforward=2048,
        cost_class=1.0,
        weight_bbox=5.0,
        weight_giou=2.0,
        eos_coef=0.1,
    ),
    "dn_detr_r50": dict(
        num_queries=300,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.0,
        activation="prelu",
        pe_temperature=20.0,
        cost_class=2.0,
        weight_bbox=5.0,
        weight_giou=2.0,
        focal_alpha=0.25,
        num_select=300,
        denoising=dict(groups=5, label_noise=0.2, box_noise=0.4),
    ),
}
for _name, (_layers, _backbone, _enc, _ffn, _exp) in {
    "rtdetrv2_r18": (3, "resnet18vd", 256, 1024, 0.5),
    "rtdetrv2_r34": (4, "resnet34vd", 256, 1024, 0.5),
    "rtdetrv2_r50": (6, "resnet50vd", 256, 1024, 1.0),
    "rtdetrv2_r101": (6, "resnet101vd", 384, 2048, 1.0),
}.items():
    OFFICIAL_NET[_name] = dict(
        num_decoder_layers=_layers, backbone=dict(name=_backbone), encoder_dim=_enc,
        encoder_dim_feedforward=_ffn, expansion=_exp, hidden_dim=256, num_queries=300,
        num_select=300, cost_class=2.0, weight_bbox=5.0, weight_giou=2.0, vfl_alpha=0.75,
        vfl_gamma=2.0, eval_idx=-1, num_points=[4, 4, 4],
        denoising=dict(query_budget=100, label_noise=0.25, box_noise=1.0, contrastive=True),
    )  # fmt: skip


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_coco_optimisation_is_official(name):
    lr, lr_bb, wd, no_wd_norm, warmup, drops, epochs, clip, ema, recipe, stop = OFFICIAL[name]
    (model, data, trainer), config = _coco(name)
    hp = model.hparams
    assert (hp.lr, hp.lr_backbone, hp.weight_decay) == (lr, lr_bb, wd)
    assert (hp.no_decay_on_norm, hp.warmup_steps, hp.lr_gamma) == (no_wd_norm, warmup, 0.1)
    # the official M* config alone also exempts encoder/decoder biases from weight decay
    assert bool(hp.get("no_decay_on_bias")) == (name == "rtdetrv2_r34")
    assert [d for d in (hp.lr_drop_epochs or []) if d < epochs] == drops
    assert tuple(hp.betas) == (0.9, 0.999)
    assert config.trainer.max_epochs == epochs and config.trainer.gradient_clip_val == clip
    callbacks = config.trainer.callbacks or []
    emas = [
        (c.init_args.decay, c.init_args.warmups)
        for c in callbacks
        if c.class_path == "detr_lineage.ema.WarmupEMAWeightAveraging"
    ]
    assert emas == ([] if ema is None else [(ema, 2000)])  # the official warm-up
    assert len(emas) == sum(
        type(c).__name__ == "WarmupEMAWeightAveraging" for c in trainer.callbacks or []
    )
    assert data.recipe == recipe and data.rtdetr_stop_epoch == stop


@pytest.mark.parametrize("name", list(OFFICIAL_NET))
def test_coco_network_settings_are_official(name):
    (model, _, _), _ = _coco(name)
    hp = model.hparams
    for key, want in OFFICIAL_NET[name].items():
        got = model.net.denoising if key == "denoising" else (hp.net if key in hp.net else hp)[key]
        if isinstance(want, dict):
            got = {k: got[k] if isinstance(got, dict) else getattr(got, k) for k in want}
        assert got == want, key
    assert hp.net["num_classes"] == 80  # the CLI saves net as a dict
