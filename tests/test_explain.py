"""``detr-lineage explain``: the tensor flow read off a real forward pass, for every variant."""

from __future__ import annotations

import re

import pytest
import torch

from detr_lineage import cli
from detr_lineage.explain import (
    VARIANTS,
    build_model,
    load_config,
    render_markdown,
    render_text,
    toy_image,
    trace_forward,
    variant_of,
)
from detr_lineage.explain import overview as explain_overview

TOY = {
    "detr": "experiments/toy/detr.yaml",
    "dn_detr": "experiments/toy/dn_detr.yaml",
    "rtdetr_v2": "experiments/toy/rtdetr_v2.yaml",
}
NO_DN = "experiments/ablations/no_denoising.yaml"
WITH_DN = "experiments/ablations/with_denoising.yaml"

# stage titles every variant's explanation must contain
STAGES = {
    "detr": [
        "Backbone",
        "Input projection",
        "Transformer encoder",
        "Decoder input",
        "Decoder layer 0",
        "Decoder layer 2",
        "Heads",
        "Outputs",
    ],
    "dn_detr": [
        "Backbone",
        "Transformer encoder",
        "Decoder queries",
        "Decoder input",
        "Decoder layer 2",
        "Heads",
        "Outputs",
    ],
    "rtdetr_v2": [
        "Backbone",
        "Hybrid encoder: input projections",
        "Hybrid encoder: AIFI",
        "CCFF fusion: top-down (FPN)",
        "CCFF fusion: bottom-up (PAN)",
        "Flatten + concat levels, query selection",
        "Denoising queries (contrastive)",
        "Decoder input",
        "Decoder layer 2",
        "Heads",
        "Outputs",
    ],
}


def dn_queries(num_objects: int, budget: int) -> int:
    """RT-DETR's contrastive denoising size: budget // M groups of 2M slots (M objects)."""
    return max(1, budget // num_objects) * 2 * num_objects


@pytest.mark.parametrize("variant", sorted(TOY))
def test_explain_cli_every_toy_variant(variant, capsys):
    cli.main(["explain", "--config", TOY[variant]])
    out = capsys.readouterr().out
    titles = re.findall(r"^== (.+) ==$", out, re.M)
    for stage in STAGES[variant]:
        assert any(t.startswith(stage) for t in titles), (stage, titles)
    # every line of a section carries shapes
    body = [line for line in out.splitlines()[2:] if not line.startswith("==")]
    assert body and all(re.search(r"\(|\d", line) for line in body)
    assert "(B, 3, 64, 64)" in out


def test_explain_rtdetr_toy_shapes_follow_the_config(capsys):
    image, target = toy_image(64)
    d = dn_queries(len(target["labels"]), 30)  # toy query_budget 30
    cli.main(["explain", "--config", TOY["rtdetr_v2"]])
    out = capsys.readouterr().out
    q = f"20+{d}"
    assert f"d = {d} queries" in out
    # toy: width 128, 8 heads, 3 levels (16x16, 8x8, 4x4 at strides 4/8/16), 4 points each
    assert "16x16 + 8x8 + 4x4 = 336 tokens" in out
    assert f"(B, {q}, 128) -> (B, {q}, 96) = 8 heads x 3 levels x 4 points" in out
    assert f"(B, {q}, 128) -> (B, {q}, 192) = 8 heads x 12 points x 2" in out
    assert f"(B, {q}, 8, 12, 2) in map coords [0,1]" in out
    assert "self-attn mask (True = blocked)" in out and f"({q}, {q})" in out
    assert "pred_logits" in out and "(B, 20, 6)" in out
    assert out.count("box refinement") == 3


def test_explain_dn_switch_and_markdown(tmp_path, capsys):
    cli.main(["explain", "--config", TOY["dn_detr"], "--denoising", "off"])
    out = capsys.readouterr().out
    assert "denoising off: K = 20 queries" in out and "mask" not in out
    md = tmp_path / "flow.md"
    cli.main(["explain", "--config", TOY["dn_detr"], "--format", "md", "--out", str(md)])
    text = md.read_text()
    assert "```mermaid" in text and "flowchart TD" in text
    assert "## Decoder layer 0" in text and "| step | shapes |" in text
    assert "`(B, 8, 20+20, 16)`" in text  # conditional cross-attention map over 4x4 tokens


def test_explain_detr_with_denoising(capsys):
    """DETR + denoising (the course's exercise): the denoising query positions and the mask."""
    cli.main(["explain", "--config", TOY["detr"], "--config", WITH_DN])
    out = capsys.readouterr().out
    image, target = toy_image(64)
    d = 5 * len(target["labels"])  # DN-DETR groups: 5 x M positive slots
    assert f"d = {d} queries (5 groups x {len(target['labels'])} slots)" in out
    assert f"noised GT labels, boxes -> query pos     (B, {d}), (B, {d}, 4) -> (B, {d}, 128)" in out
    assert f"query position ([denoising | learned])   (B, 20+{d}, 128)" in out
    assert f"attention map (8 heads)                (B, 8, 20+{d}, 16)" in out


def test_explain_bad_input_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", TOY["rtdetr_v2"], "--config", NO_DN, "--denoising", "on"])
    assert "denoising is null" in str(err.value) and "--denoising off" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", TOY["detr"], "--image", str(tmp_path / "no.png")])
    assert "no.png" in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  class_path: detr_lineage.lit.DETR\n"
        "  init_args:\n    net:\n      num_classes: 6\n    bogus_key: 3\n"
    )
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", str(bad)])
    assert "bogus_key" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", TOY["detr"], "--figures", str(tmp_path), "--query", "20"])
    assert "query 20 out of range: 20 matching queries" in str(err.value)
    # a checkpoint of another variant
    other = build_model(load_config([TOY["dn_detr"]]))
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, ckpt)
    with pytest.raises(SystemExit) as err:
        cli.main(["explain", "--config", TOY["detr"], "--ckpt_path", str(ckpt)])
    assert "other.ckpt: does not fit the model of the config" in str(err.value)


def test_explain_image_file_with_placeholder_targets(tmp_path, capsys):
    from torchvision.io import write_png

    path = tmp_path / "img.png"
    write_png((torch.rand(3, 50, 70) * 255).to(torch.uint8), str(path))
    cli.main(["explain", "--config", TOY["rtdetr_v2"], "--image", str(path), "--dn_objects", "3"])
    out = capsys.readouterr().out
    assert "(B, 3, 64, 64)" in out  # resized to the config's size
    assert f"d = {dn_queries(3, 30)} queries" in out


def test_recorded_tensors_are_the_modules_own():
    """The taps see what the attention uses: weights = softmax of the Linear output per head,
    locations inside the reference box's reach; the trace's outputs are the network's."""
    model = build_model(load_config([TOY["rtdetr_v2"]]))
    image, target = toy_image(64)
    trace = trace_forward(model.net, image, [target], denoising=False)
    raw = trace.first(r"decoder\.layers\.1\.cross_attn\.attn\.attention_weights").output
    soft = trace.first(r"decoder\.layers\.1\.cross_attn\.attn\.weights_tap").output
    torch.testing.assert_close(soft, raw.view(*raw.shape[:2], 8, 12).softmax(-1))
    loc = trace.first(r"decoder\.layers\.1\.cross_attn\.attn\.locations_tap").output
    ref = trace.first(r"decoder\.layers\.1\.cross_attn\.attn").args[1]  # [B,Q,4]
    off = trace.first(r"decoder\.layers\.1\.cross_attn\.attn\.sampling_offsets").output
    off = off.view(1, 20, 8, 12, 2)
    # RT-DETRv2: xy + offset / n_points_of_level * wh * offset_scale (0.5)
    expected_loc = ref[:, :, None, None, :2] + off / 4 * ref[:, :, None, None, 2:] * 0.5
    torch.testing.assert_close(loc, expected_loc)
    with torch.no_grad():
        expected = model.net.eval()(image[None], torch.zeros(1, 64, 64, dtype=torch.bool))
    torch.testing.assert_close(trace.outputs["pred_boxes"], expected["pred_boxes"])
    assert trace.denoising == 0


def test_unknown_variant_names_the_registry():
    with pytest.raises(ValueError, match="VARIANTS"):
        variant_of(torch.nn.Linear(2, 2))
    assert {"DETRNet", "DNDETRNet", "RTDETRv2Net"} <= set(VARIANTS)


@pytest.mark.slow
def test_rtdetrv2_r50_at_640_shows_the_explainer_shapes():
    """RT-DETRv2-L (R50-vd) at 640 px, random init, denoising on: the published walkthrough's
    shapes, (B, 300+d, 256) -> (B, 300+d, 96) weights for 8 heads x 3 levels x 4 points,
    (B, 300+d, 192) offsets, (B, 300+d, 8, 12, 2) sampling locations."""
    torch.manual_seed(0)
    config = load_config(["experiments/coco/rtdetrv2_r50.yaml"])
    model = build_model(config)
    image, target = toy_image(640)
    trace = trace_forward(model.net, image, [target], denoising=True)
    d = dn_queries(len(target["labels"]), 100)
    assert trace.denoising == d
    text = render_text(trace, "test")
    q = f"300+{d}"
    for expected in [
        "S3 (stride 8)                                 (B, 512, 80, 80)",
        "S5 (stride 32)                                (B, 2048, 20, 20)",
        "(B, 256, 20, 20) -> (B, 400, 256) -> (B, 256, 20, 20)",  # AIFI on S5
        "80x80 + 40x40 + 20x20 = 8400 tokens",
        "top-k query selection (K=300 of 8400 tokens)",
        f"(B, {q}, 256) -> (B, {q}, 96) = 8 heads x 3 levels x 4 points",
        f"(B, {q}, 256) -> (B, {q}, 192) = 8 heads x 12 points x 2",
        f"(B, {q}, 8, 12, 2) in map coords [0,1]",
        f"({q}, {q}); matching queries blind to {d}",
        "(B, 300, 80)",
    ]:
        assert expected in text, expected
    assert text.count("== Decoder layer") == 6
    assert "```mermaid" in render_markdown(trace, "test")


@pytest.mark.parametrize("variant", ["detr", "dn_detr"])
def test_cross_attention_weights_reproduce_the_module_output(variant):
    """Recomputed maps are the ones used: weights x projected values -> the recorded output."""
    from detr_lineage.explain import cross_attention_weights

    torch.manual_seed(0)
    model = build_model(load_config([TOY[variant]]))
    image, _ = toy_image(64)
    trace = trace_forward(model.net, image)
    for layer in range(3):
        call = trace.first(rf"decoder\.layers\.{layer}\.cross_attn")
        weights = cross_attention_weights(call)  # [B,h,Q,S]
        memory, m = call.args[2], call.module
        assert weights.shape == (1, 8, 20, 16)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 8, 20))
        if variant == "detr":
            w_v = m.attn.in_proj_weight[2 * 128 :]
            b_v = m.attn.in_proj_bias[2 * 128 :]
            value, out_proj = memory.value @ w_v.T + b_v, m.attn.out_proj
        else:
            value, out_proj = m.v(memory.value), m.out_proj
        heads = value.view(1, 16, 8, 16).transpose(1, 2)  # [B,h,S,d/h]
        out = (weights @ heads).transpose(1, 2).reshape(1, 20, 128)
        torch.testing.assert_close(out_proj(out), call.output, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", sorted(TOY))
def test_figures_are_written_for_every_variant(variant, tmp_path):
    """Figure functions on a tiny random-init model: the right set of PNGs, non-empty."""
    from matplotlib.image import imread

    from detr_lineage.analysis.attention_figures import save_figures

    model = build_model(load_config([TOY[variant]]))
    image, _ = toy_image(64)
    trace = trace_forward(model.net, image)
    paths = save_figures(trace, tmp_path / "figs", query=3)
    names = {p.stem for p in paths}
    expected = {
        "detr": {"box_refinement", "cross_attention"},
        "dn_detr": {"box_refinement", "cross_attention"},
        "rtdetr_v2": {"box_refinement", "query_selection", "sampling_points"},
    }[variant]
    assert names == expected
    for path in paths:
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.std() > 0.05, path.name


def test_figure_inputs_and_errors():
    """The figures' tensors: the query's boxes per layer and the top-k proposals are the
    network's; out-of-range queries / layers are named."""
    from detr_lineage.analysis.attention_figures import (
        _decoder_refs,
        _layer_boxes,
        best_query,
        plot_sampling_points,
    )

    model = build_model(load_config([TOY["rtdetr_v2"]]))
    image, _ = toy_image(64)
    trace = trace_forward(model.net, image)
    q = best_query(trace)
    assert trace.scores()[0, q] == trace.scores()[0].max()
    boxes = _layer_boxes(trace, q)  # entering + 3 layers
    assert boxes.shape == (4, 4)
    torch.testing.assert_close(boxes[-1], trace.outputs["pred_boxes"][0, q])
    torch.testing.assert_close(boxes[1], trace.outputs["aux_outputs"][0]["pred_boxes"][0, q])
    # the decoder's initial boxes are the K best encoder proposals (by max class score)
    enc_logits = trace.first("enc_score_head").output[0]
    enc_boxes = trace.first("enc_bbox_head").output[0]
    from detr_lineage.models.rtdetr_v2 import make_anchors

    anchors, _ = make_anchors([(16, 16), (8, 8), (4, 4)], enc_boxes.device)
    top = enc_logits.max(-1).values.topk(20).indices
    torch.testing.assert_close(_decoder_refs(trace)[0], (enc_boxes + anchors[0])[top].sigmoid())
    with pytest.raises(ValueError, match="query 20 out of range"):
        plot_sampling_points(trace, query=20)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        plot_sampling_points(trace, query=0, layer=3)


def test_explain_cli_figures_after_a_denoising_trace(tmp_path, capsys):
    cli.main(["explain", "--config", TOY["rtdetr_v2"], "--figures", str(tmp_path), "--query", "2"])
    out = capsys.readouterr().out
    for name in ("query_selection", "sampling_points", "box_refinement"):
        assert f"wrote {tmp_path / name}.png" in out
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_overview_is_what_each_stage_hands_on():
    model = build_model(load_config([TOY["rtdetr_v2"]]))
    image, target = toy_image(64)
    trace = trace_forward(model.net, image, [target], denoising=True)
    d = dn_queries(len(target["labels"]), 30)
    stages = dict(explain_overview(trace))
    assert stages["Backbone"] == "(B, 64, 16, 16), (B, 128, 8, 8), (B, 128, 4, 4)"
    assert stages["Hybrid encoder: AIFI (self-attention on the coarsest level)"] == "(B, 128, 4, 4)"
    assert stages["Flatten + concat levels, query selection"] == "(B, 336, 128)"
    assert stages["Decoder input"] == stages["Decoder layer 2"] == f"(B, 20+{d}, 128)"
    assert stages["Outputs"] == "(B, 20, 6)"
