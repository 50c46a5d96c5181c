"""Checkpoint converters: official key/shape lists, and outputs equal to Hugging Face's models.

The Hugging Face models are built at random init (nothing is downloaded), perturbed so that no
head is trivially zero, converted, and run side by side with ours on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from detr_lineage.convert import (
    COCO_CATEGORY_IDS,
    VARIANTS,
    build_module,
    convert_state,
    main,
    save_checkpoint,
)
from detr_lineage.data.collate import collate_detection
from detr_lineage.lit import load_detector
from detr_lineage.models.common import IMAGENET_MEAN, IMAGENET_STD
from tests.helpers import make_module

KEYS = Path(__file__).parent / "data" / "official_state_dict_keys.json"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def official_state(variant: str) -> dict[str, Tensor]:
    """A random state dict with the official model's key names and shapes."""
    gen = torch.Generator().manual_seed(0)
    keys = json.loads(KEYS.read_text())[variant]
    return {k: torch.randn(shape, generator=gen) for k, shape in keys}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_key_lists_convert(variant: str) -> None:
    state = official_state(variant)
    module, converted = convert_state(state, "official", variant)
    ours = module.net.state_dict()
    for key, value in converted.items():  # what was converted is what was loaded
        assert torch.equal(ours[key], value), key
    # every official tensor lands somewhere (nothing silently dropped)
    dropped = {"decoder.anchors", "decoder.valid_mask"}
    values = {id(v) for v in converted.values()}
    if VARIANTS[variant].family == "rtdetrv2":
        lost = [
            k
            for k, v in state.items()
            if id(v) not in values and k not in dropped and not k.endswith("num_batches_tracked")
        ]
        assert lost == []
        n = sum(k.startswith("decoder.dec_bbox_head.") for k in state)
        assert n > 0
        for key in (k for k in ours if k.startswith("decoder.box_heads.")):
            shared = key.replace("decoder.box_heads.", "dec_bbox_heads.")
            assert torch.equal(ours[key], ours[shared])
        assert torch.equal(
            ours["decoder.layers.0.cross_attn.attn.sampling_offsets.weight"],
            state["decoder.decoder.layers.0.cross_attn.sampling_offsets.weight"],
        )
    elif VARIANTS[variant].family == "dn_detr":
        tied, gathered = "transformer.decoder.bbox_embed.", ("class_embed.", "label_enc.")
        lost = [
            k
            for k, v in state.items()
            if id(v) not in values and not k.startswith((tied, *gathered))
        ]
        assert lost == []
        # sigmoid head: one row per COCO id 0..90, no no-object; label embedding + "unknown"
        official, labels = state["class_embed.weight"], state["label_enc.weight"]
        assert torch.equal(ours["class_head.weight"][0], official[1])  # person
        assert torch.equal(ours["class_head.weight"][79], official[90])  # toothbrush
        assert torch.equal(ours["label_embed.weight"][79], labels[90])
        assert torch.equal(ours["label_embed.weight"][80], labels[91])  # unknown
        for i in range(6):  # the shared box head under each layer's name
            assert torch.equal(
                ours[f"decoder.box_heads.{i}.layers.2.weight"], state["bbox_embed.layers.2.weight"]
            )
        assert torch.equal(
            ours["decoder.layers.3.self_attn.proj.k_pos.weight"],
            state["transformer.decoder.layers.3.sa_kpos_proj.weight"],
        )
    else:
        # class rows: our label i is COCO category COCO_CATEGORY_IDS[i]; the last is no-object
        official = state["class_embed.weight"]
        assert torch.equal(ours["class_head.weight"][0], official[1])  # person
        assert torch.equal(ours["class_head.weight"][79], official[90])  # toothbrush
        assert torch.equal(ours["class_head.weight"][80], official[91])  # no-object
        assert torch.equal(
            ours["encoder.backbone.body.stages.3.0.conv1.weight"],
            state["backbone.0.body.layer4.0.conv1.weight"],
        )


@pytest.mark.parametrize(
    ("file_variant", "asked"),
    [
        ("rtdetrv2-s", "rtdetrv2-l"),
        ("rtdetrv2-l", "rtdetrv2-m"),
        ("detr-r50", "rtdetrv2-s"),
        ("detr-r50", "dn-detr-r50"),
    ],
)
def test_a_file_of_another_model_or_size_is_refused(file_variant: str, asked: str) -> None:
    with pytest.raises(ValueError, match="another model or size"):
        convert_state(official_state(file_variant), "official", asked, "weights.pth")


def test_cli_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(SystemExit):
        main(["--from", "official", "--variant", "detr-r50", str(missing), str(tmp_path / "o")])
    assert str(missing) in capsys.readouterr().err
    path = tmp_path / "s.pth"
    torch.save({"model": official_state("rtdetrv2-s")}, path)
    with pytest.raises(SystemExit):
        main(["--from", "official", "--variant", "rtdetrv2-x", str(path), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert str(path) in err and "another model or size" in err
    with pytest.raises(SystemExit):
        main(["--from", "official", "--state", "ema", "--variant", "rtdetrv2-s", str(path), "o"])
    assert "no 'ema' state" in capsys.readouterr().err


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random BN statistics and a small random offset on every parameter (no zero heads)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif not name.endswith(("n_points_scale", "num_points_scale")):
                t.add_(0.02 * torch.randn(t.shape, generator=gen))


def layers_of(out: dict) -> list[dict]:
    return [*out.get("aux_outputs", []), {k: out[k] for k in ("pred_logits", "pred_boxes")}]


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.slow
def test_hf_detr_r50_outputs_equal_ours_on_a_padded_batch() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DetrConfig(
        use_timm_backbone=True,
        backbone="resnet50",
        use_pretrained_backbone=False,
        num_labels=91,  # the COCO checkpoints: one row per category id 0..90
        auxiliary_loss=False,  # True makes transformers feed each layer the *normed* state
    )
    hf = transformers.DetrForObjectDetection(config).eval()
    perturb(hf)
    module, _ = convert_state(hf.state_dict(), "hf", "detr-r50")
    net = module.net.eval()
    images = [torch.rand(3, 75, 101), torch.rand(3, 96, 66)]  # padded batch, odd sizes
    batch = collate_detection([(im, {}) for im in images])
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    pixel_values = torch.zeros(2, 3, 96, 101)  # transformers pads the normalised images with 0
    for b, im in enumerate(images):
        pixel_values[b, :, : im.shape[1], : im.shape[2]] = (im - mean) / std
    with torch.no_grad():
        theirs = hf.model(
            pixel_values, pixel_mask=(~batch["masks"]).long(), output_hidden_states=True
        )
        # each layer's output (inputs of layers 1..5, then the last), normed as the official
        hidden = theirs.decoder_hidden_states
        norm = hf.model.decoder.layernorm
        states = torch.stack([*(norm(h) for h in hidden[1:-1]), theirs.last_hidden_state])
        logits = hf.class_labels_classifier(states)[..., [*COCO_CATEGORY_IDS, 91]]
        boxes = hf.bbox_predictor(states).sigmoid()
        ours = layers_of(net(batch["images"], batch["masks"]))
    assert len(ours) == logits.shape[0] == 6
    dl = max(max_diff(o["pred_logits"], logits[i]) for i, o in enumerate(ours))
    db = max(max_diff(o["pred_boxes"], boxes[i]) for i, o in enumerate(ours))
    print(f"HF DETR-R50 vs ours, padded batch: max |d logits| {dl:.2e}, |d boxes| {db:.2e}")
    assert dl < 1e-5 and db < 1e-5
    full = hf(pixel_values, pixel_mask=(~batch["masks"]).long())  # the head path agrees too
    torch.testing.assert_close(full.logits[..., [*COCO_CATEGORY_IDS, 91]], ours[-1]["pred_logits"])


def hf_rtdetrv2_s(transformers) -> nn.Module:
    backbone = transformers.RTDetrResNetConfig(
        depths=[2, 2, 2, 2],
        layer_type="basic",
        hidden_sizes=[64, 128, 256, 512],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = transformers.RTDetrV2Config(
        backbone_config=backbone,
        encoder_in_channels=[128, 256, 512],
        hidden_expansion=0.5,
        decoder_layers=3,
        freeze_backbone_batch_norms=False,
        num_labels=80,
    )
    return transformers.RTDetrV2ForObjectDetection(config).eval()


@pytest.mark.slow
def test_hf_rtdetrv2_s_outputs_equal_ours() -> None:
    """Every decoder layer's logits and boxes, and the encoder's top-k proposals.

    Run in float64: at random init many encoder scores are within float32 noise of each
    other, so the top-k query *order* (not the set) would depend on rounding; in float64 the
    same computation gives the same order and the comparison is exact to ~1e-12.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = hf_rtdetrv2_s(transformers)
    perturb(hf)
    module, _ = convert_state(hf.state_dict(), "hf", "rtdetrv2-s")
    net = module.net.eval()
    images = torch.rand(2, 3, 128, 128)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    with torch.no_grad():
        spatial = [(16, 16), (8, 8), (4, 4)]
        hf, net, images = hf.double(), net.double(), images.double()
        theirs = hf.model(images)
        memory = net.memory(images)
        assert [tuple(s) for s in memory.spatial_shapes] == spatial
        _, _, enc = net.select_queries(memory)
        ours = layers_of(net(images, masks))
    logits, boxes = theirs.intermediate_logits, theirs.intermediate_reference_points
    assert len(ours) == logits.shape[1] == 3
    dl = max(max_diff(o["pred_logits"], logits[:, i]) for i, o in enumerate(ours))
    db = max(max_diff(o["pred_boxes"], boxes[:, i]) for i, o in enumerate(ours))
    de = max(
        max_diff(enc["pred_logits"], theirs.enc_topk_logits),
        max_diff(enc["pred_boxes"], theirs.enc_topk_bboxes),
    )
    print(
        f"HF RT-DETRv2-S vs ours (float64): |d logits| {dl:.2e}, |d boxes| {db:.2e}, enc {de:.2e}"
    )
    assert dl < 1e-5 and db < 1e-5 and de < 1e-5


@pytest.mark.slow
def test_converted_checkpoint_loads_for_test_and_predict(tmp_path: Path) -> None:
    """convert CLI -> a checkpoint ``load_detector`` (validate/test/predict) reads back."""
    transformers = pytest.importorskip("transformers")
    hf = hf_rtdetrv2_s(transformers)
    perturb(hf)
    source, out = tmp_path / "hf.bin", tmp_path / "ours.ckpt"
    torch.save(hf.state_dict(), source)
    main(["--from", "hf", "--variant", "rtdetrv2-s", str(source), str(out)])
    model = load_detector(str(out))
    expected, _ = convert_state(hf.state_dict(), "hf", "rtdetrv2-s")
    for key, value in expected.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    checkpoint = torch.load(out, map_location="cpu", weights_only=False)
    assert checkpoint["label_to_category_id"] == COCO_CATEGORY_IDS
    assert checkpoint["class_names"][0] == "person" and len(checkpoint["class_names"]) == 80


def test_build_module_uses_the_variant_yaml() -> None:
    m = build_module("rtdetrv2-m")
    assert m.net.eval_layers == 3 and len(m.net.decoder.layers) == 6
    assert m.hparams.net.expansion == 0.5
    with pytest.raises(ValueError, match="unknown variant"):
        save_checkpoint(m, "rtdetrv2-q", "x", "")


def toy_rtdetr(num_classes: int, seed: int) -> nn.Module:
    from detr_lineage.lit import RTDETRv2
    from detr_lineage.nn.backbone import BackboneConfig

    torch.manual_seed(seed)
    backbone = BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[2, 4, 8])
    return make_module(
        RTDETRv2, num_classes, backbone, hidden_dim=32, encoder_dim=32, encoder_dim_feedforward=32,
        num_queries=10, num_decoder_layers=2, dim_feedforward=32,
    )  # fmt: skip


def test_init_weights_keep_fresh_class_heads_of_another_size(tmp_path: Path) -> None:
    from detr_lineage.convert import load_initial_weights

    source, fresh = toy_rtdetr(80, seed=0), toy_rtdetr(3, seed=1)
    before = {k: v.clone() for k, v in fresh.net.state_dict().items()}
    path = tmp_path / "coco.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    kept = load_initial_weights(fresh, str(path))
    assert sorted(kept) == sorted(
        [f"{h}.{p}" for h in ("enc_score_head", "dec_score_heads.0", "dec_score_heads.1")
         for p in ("weight", "bias")] + ["denoising_class_embed.weight"]
    )  # fmt: skip
    src = source.net.state_dict()
    for key, value in fresh.net.state_dict().items():
        expected = before[key] if key in kept else src[key]
        assert torch.equal(value, expected), key
    wider = toy_rtdetr(80, seed=0)
    wider.net.query_pos_head_extra = nn.Linear(2, 2)  # a tensor the file does not have
    with pytest.raises(ValueError, match=str(path)):
        load_initial_weights(wider, str(path))


def test_fit_loads_init_weights_before_training(tmp_path: Path) -> None:
    """``fit --run.init_weights`` runs the loader before any step: a file of another width
    (here the 32-wide toy model vs the 128-wide toy YAML) stops the run, naming the file."""
    from detr_lineage.cli import main as cli_main

    from .test_cli import ROOT, TINY

    path = tmp_path / "init.ckpt"
    torch.save({"state_dict": toy_rtdetr(6, seed=0).state_dict()}, path)
    config = str(ROOT / "experiments/toy/rtdetr_v2.yaml")
    with pytest.raises(ValueError, match=f"{path}.*another model or size"):
        cli_main(
            ["fit", "--config", config, *TINY, "--trainer.fast_dev_run=1", f"--run.dir={tmp_path}"]
            + ["--run.wandb=false", f"--run.init_weights={path}"]
        )


def test_convert_is_a_subcommand(capsys: pytest.CaptureFixture) -> None:
    from detr_lineage.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["convert", "--help"])
    assert "--variant" in capsys.readouterr().out


@pytest.mark.slow
def test_a_converted_style_checkpoint_runs_detr_lineage_test(tmp_path: Path) -> None:
    """What ``convert`` writes (state dict, hyper-parameters, no training state) is accepted by
    ``detr-lineage test --ckpt_path`` (here: the toy RT-DETRv2 and its YAML)."""
    from detr_lineage.cli import main as cli_main
    from detr_lineage.convert import write_checkpoint

    from .helpers import build, parse
    from .test_cli import ROOT, TINY

    config = ROOT / "experiments/toy/rtdetr_v2.yaml"
    module, _, _ = build(*parse(config))
    path = tmp_path / "converted.ckpt"
    write_checkpoint(module, dict(module.hparams), path, "test")
    cli_main(["test", "--config", str(config), *TINY, f"--ckpt_path={path}",
              f"--run.dir={tmp_path}", "--run.wandb=false",
              "--trainer.enable_progress_bar=false"])  # fmt: skip
