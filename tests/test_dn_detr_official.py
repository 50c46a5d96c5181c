"""DN-DETR's decoder against an independent float64 reference of the official one.

The reference (``official_forward``) is written here from the structure of IDEA-Research/DN-DETR
``models/DN_DAB_DETR`` (``transformer.py``, ``DABDETR.py``, ``dn_components.py``) and reads its
weights under the official key names. The same random weights, converted by
``convert.convert_dn_detr``, drive our network; both run on the memory of our encoder. Compared:
the logits and boxes of every decoder layer (matching and denoising queries, a padded batch),
and, in training, the gradient of a loss on all of them with respect to every official tensor,
so a detach in another place (or refining from the normed state) is caught. Tolerance 1e-10
(float64).
"""

from __future__ import annotations

import math

import lightning
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from detr_lineage.convert import COCO_CATEGORY_IDS, convert_dn_detr, main
from detr_lineage.denoising import DenoisingConfig
from detr_lineage.lit import DNDETR, load_detector
from detr_lineage.models import dn_detr
from detr_lineage.models.dn_detr import DNDETRConfig, DNDETRNet
from detr_lineage.nn.backbone import BackboneConfig
from tests.helpers import make_module

D, HEADS, FF, LAYERS, QUERIES = 32, 4, 64, 3, 7
IDS = torch.tensor(COCO_CATEGORY_IDS)  # our label i is official class row IDS[i]
UNKNOWN = 91  # the official label embedding's extra row (matching queries)
TOL = dict(rtol=1e-10, atol=1e-10)


def official_state(seed: int = 0) -> dict[str, Tensor]:
    """Random float64 tensors under the official decoder and head names (tiny sizes, COCO's
    91 classes), scaled so that every path (box deltas included) is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    w: dict[str, Tensor] = {}

    def randn(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        w[f"{name}.weight"] = randn(fan_out, fan_in) / math.sqrt(fan_in)
        w[f"{name}.bias"] = 0.1 * randn(fan_out)

    def norm(name: str) -> None:
        w[f"{name}.weight"], w[f"{name}.bias"] = 1 + 0.1 * randn(D), 0.1 * randn(D)

    def mlp(name: str, *dims: int) -> None:
        for k in range(len(dims) - 1):
            linear(f"{name}.layers.{k}", dims[k], dims[k + 1])

    for i in range(LAYERS):
        p = f"transformer.decoder.layers.{i}."
        for n in ("qcontent", "qpos", "kcontent", "kpos", "v"):
            linear(f"{p}sa_{n}_proj", D, D)
        linear(f"{p}self_attn.out_proj", D, D)
        norm(f"{p}norm1")
        for n in ("qcontent", "qpos", "kcontent", "kpos", "v", "qpos_sine"):
            if n != "qpos" or i == 0:  # keep_query_pos=False: layer 0 only
                linear(f"{p}ca_{n}_proj", D, D)
        linear(f"{p}cross_attn.out_proj", D, D)
        linear(f"{p}linear1", D, FF)
        linear(f"{p}linear2", FF, D)
        norm(f"{p}norm2")
        norm(f"{p}norm3")
        w[f"{p}activation.weight"] = 0.25 + 0.1 * randn(1)
    norm("transformer.decoder.norm")
    mlp("transformer.decoder.query_scale", D, D, D)
    mlp("transformer.decoder.ref_point_head", 2 * D, D, D)
    mlp("transformer.decoder.ref_anchor_head", D, D, 2)
    mlp("bbox_embed", D, D, D, 4)
    for key in [k for k in w if k.startswith("bbox_embed.")]:  # tied, stored twice
        w[f"transformer.decoder.{key}"] = w[key]
    linear("class_embed", D, 91)
    w["label_enc.weight"] = randn(92, D - 1)
    w["refpoint_embed.weight"] = randn(QUERIES, 4)
    w["refpoint_embed.weight"][0, :2] = torch.tensor([8.0, -8.0])  # beyond the 1e-3 clamp
    return w


# -- the reference, from the official structure ---------------------------------------------


def lin(w: dict, name: str, x: Tensor) -> Tensor:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def mlp(w: dict, name: str, x: Tensor) -> Tensor:
    n = sum(k.startswith(f"{name}.layers.") and k.endswith(".weight") for k in w)
    for k in range(n):
        x = lin(w, f"{name}.layers.{k}", x)
        x = x.relu() if k < n - 1 else x
    return x


def layer_norm(w: dict, name: str, x: Tensor) -> Tensor:
    return F.layer_norm(x, (D,), w[f"{name}.weight"], w[f"{name}.bias"], 1e-5)


def logit(x: Tensor) -> Tensor:  # the official inverse_sigmoid, eps 1e-3
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3))


def sine(v: Tensor, n: int) -> Tensor:
    """``v [...]`` -> ``[..., n]``: sin at even, cos at odd k of v 2 pi / 10000^(2 (k//2) / n)
    (frequencies in float32, as the official)."""
    k = torch.arange(n, dtype=torch.float32)
    angle = v[..., None] * 2 * math.pi / 10000 ** (2 * (k // 2) / n)
    return torch.where(k % 2 == 0, angle.sin(), angle.cos())


def attend(q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None) -> Tensor:
    """Multi-head attention without input projections; ``blocked [B|1, Q|1, S]`` True = masked."""
    b, nq, e = q.shape

    def heads(x: Tensor) -> Tensor:
        return x.view(b, x.shape[1], HEADS, -1).transpose(1, 2)

    weights = heads(q) @ heads(k).transpose(-1, -2) * (e // HEADS) ** -0.5
    if blocked is not None:
        weights = weights.masked_fill(blocked[:, None], float("-inf"))
    return (weights.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, nq, -1)


def per_head_concat(a: Tensor, b: Tensor) -> Tensor:
    return torch.cat([a.unflatten(-1, (HEADS, -1)), b.unflatten(-1, (HEADS, -1))], -1).flatten(-2)


def official_forward(
    w: dict,
    tgt: Tensor,
    refpoints_unsigmoid: Tensor,
    memory: Tensor,
    pos: Tensor,
    padding: Tensor,
    attn_mask: Tensor | None,
    *,
    box_on_detached_ref: bool = False,
    refine_normed: bool = False,
) -> tuple[Tensor, Tensor]:
    """-> (logits ``[L,B,Q,91]``, boxes ``[L,B,Q,4]``). The two flags plant known deviations
    (the earlier behaviour of ours) to show that the comparison detects them."""
    out, ref = tgt, refpoints_unsigmoid.sigmoid()
    refs, states = [ref], []
    for i in range(LAYERS):
        p = f"transformer.decoder.layers.{i}."
        parts = [sine(ref[..., j], D // 2) for j in (1, 0, 2, 3)]  # (y, x, w, h)
        query_pos = mlp(w, "transformer.decoder.ref_point_head", torch.cat(parts, -1))
        centre = torch.cat(parts[:2], -1)
        if i > 0:
            centre = centre * mlp(w, "transformer.decoder.query_scale", out)
        hw = mlp(w, "transformer.decoder.ref_anchor_head", out).sigmoid()
        y_part = centre[..., : D // 2] * (hw[..., 1] / ref[..., 3])[..., None]
        x_part = centre[..., D // 2 :] * (hw[..., 0] / ref[..., 2])[..., None]
        query_sine = torch.cat([y_part, x_part], -1)
        # self-attention: content and position projected apart, no in-projection
        q = lin(w, p + "sa_qcontent_proj", out) + lin(w, p + "sa_qpos_proj", query_pos)
        k = lin(w, p + "sa_kcontent_proj", out) + lin(w, p + "sa_kpos_proj", query_pos)
        blocked = None if attn_mask is None else attn_mask[None]
        y = attend(q, k, lin(w, p + "sa_v_proj", out), blocked)
        out = layer_norm(w, p + "norm1", out + lin(w, p + "self_attn.out_proj", y))
        # cross-attention: [content | sine] per head against [content | position] per head
        q = lin(w, p + "ca_qcontent_proj", out)
        k = lin(w, p + "ca_kcontent_proj", memory)
        k_pos = lin(w, p + "ca_kpos_proj", pos)
        if i == 0:
            q, k = q + lin(w, p + "ca_qpos_proj", query_pos), k + k_pos
        q = per_head_concat(q, lin(w, p + "ca_qpos_sine_proj", query_sine))
        y = attend(q, per_head_concat(k, k_pos), lin(w, p + "ca_v_proj", memory), padding[:, None])
        out = layer_norm(w, p + "norm2", out + lin(w, p + "cross_attn.out_proj", y))
        y = lin(w, p + "linear1", out)
        y = y.clamp(min=0) + w[p + "activation.weight"] * y.clamp(max=0)  # PReLU
        out = layer_norm(w, p + "norm3", out + lin(w, p + "linear2", y))
        # iterative update: from the un-normed output, on this layer's reference
        state = layer_norm(w, "transformer.decoder.norm", out)
        new_ref = (mlp(w, "bbox_embed", state if refine_normed else out) + logit(ref)).sigmoid()
        if i < LAYERS - 1:
            refs.append(new_ref.detach() if box_on_detached_ref else new_ref)
        ref = new_ref.detach()
        states.append(state)
    hs = torch.stack(states)
    boxes = (mlp(w, "bbox_embed", hs) + logit(torch.stack(refs))).sigmoid()
    return lin(w, "class_embed", hs), boxes


def official_queries(w: dict, b: int, dn) -> tuple[Tensor, Tensor, Tensor | None]:
    """``prepare_for_dn``'s decoder input, from our noised labels/boxes (``dn``, or None):
    denoising slots first (label embedding + 1; padding slots all zeros and box logit 0), then
    the matching queries (the "unknown" embedding + 0, the anchors)."""
    unknown = torch.cat([w["label_enc.weight"][UNKNOWN], w["label_enc.weight"].new_zeros(1)])
    tgt = unknown.expand(b, QUERIES, D)
    ref = w["refpoint_embed.weight"].expand(b, QUERIES, 4)
    if dn is None:
        return tgt, ref, None
    real = (dn.labels < len(COCO_CATEGORY_IDS))[..., None]
    emb = w["label_enc.weight"][IDS[dn.labels.clamp(max=len(COCO_CATEGORY_IDS) - 1)]]
    emb = torch.cat([emb, emb.new_ones(*emb.shape[:-1], 1)], -1)
    pad = dn.labels.shape[1]
    single = pad // dn.meta.num_groups
    mask = torch.zeros(pad + QUERIES, pad + QUERIES, dtype=torch.bool)
    mask[pad:, :pad] = True  # matching queries do not see the denoising ones
    for g in range(dn.meta.num_groups):  # nor one group another
        rows = slice(g * single, (g + 1) * single)
        mask[rows, : g * single] = True
        mask[rows, (g + 1) * single : pad] = True
    box = torch.where(real, logit(dn.boxes.double()), 0.0)
    return (
        torch.cat([torch.where(real, emb, 0.0), tgt], 1),
        torch.cat([box, ref], 1),
        mask,
    )


# -- ours ---------------------------------------------------------------------------------------


def tiny_net(denoising: DenoisingConfig | None = None) -> DNDETRNet:
    torch.manual_seed(0)
    cfg = DNDETRConfig(
        num_classes=len(COCO_CATEGORY_IDS),
        backbone=BackboneConfig("conv", channels=[8, 16], return_strides=[4], frozen_bn=False),
        d_model=D,
        nhead=HEADS,
        num_encoder_layers=1,
        num_decoder_layers=LAYERS,
        dim_feedforward=FF,
        num_queries=QUERIES,
        denoising=denoising,
    )
    return DNDETRNet(cfg).double()


def stacked(out: dict) -> tuple[Tensor, Tensor]:
    layers = [*out["aux_outputs"], out]
    return (
        torch.stack([o["pred_logits"] for o in layers]),
        torch.stack([o["pred_boxes"] for o in layers]),
    )


def batch() -> tuple[Tensor, Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 48, generator=gen, dtype=torch.float64)
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[1, :, 32:] = True  # the second image is narrower: padded memory
    masks[1, 24:, :] = True
    targets = [
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
        {  # the last box is degenerate at a corner: only the 1e-3 clamp makes its reference
            "labels": torch.tensor([79, 3, 40, 7]),
            "boxes": torch.tensor(
                [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5], [0.5, 0.5, 1, 1], [0, 1, 0, 0]]
            ),
        },
    ]
    return images, masks, targets


def run_both(net: DNDETRNet, w: dict, monkeypatch, **flags) -> tuple:
    """Ours (``functional_call`` on the converted official tensors, so gradients reach them)
    and the reference on our encoder's memory -> (ours, reference) (logits, boxes) pairs,
    denoising then matching queries along dim 2, our 80 classes."""
    seen: dict = {}
    net.encoder.register_forward_hook(lambda m, a, out: seen.__setitem__("memory", out))
    make = dn_detr.make_denoising_queries

    def record(*args, **kwargs):
        seen["dn"] = make(*args, **kwargs)
        return seen["dn"]

    monkeypatch.setattr(dn_detr, "make_denoising_queries", record)
    images, masks, targets = batch()
    converted = convert_dn_detr(w, "official")
    out = torch.func.functional_call(net, converted, (images, masks, targets), strict=False)
    logits, boxes = stacked(out)
    if "dn_outputs" in out:
        dn_logits, dn_boxes = stacked(out["dn_outputs"])
        logits, boxes = torch.cat([dn_logits, logits], 2), torch.cat([dn_boxes, boxes], 2)
    memory = seen["memory"]
    tgt, ref, mask = official_queries(w, 2, seen.get("dn"))
    ref_logits, ref_boxes = official_forward(
        w,
        tgt,
        ref,
        memory.value.detach(),
        memory.pos.detach(),
        memory.padding_mask,
        mask,
        **flags,
    )
    assert memory.padding_mask.any() and not memory.padding_mask.all()
    return (logits, boxes), (ref_logits[..., IDS], ref_boxes)


def test_converted_official_tensors_cover_our_decoder() -> None:
    net = tiny_net()
    missing, unexpected = net.load_state_dict(convert_dn_detr(official_state(), "official"), False)
    assert unexpected == []
    assert missing and all(k.startswith("encoder.") for k in missing), missing


@pytest.mark.parametrize("denoising", [None, DenoisingConfig(groups=2)], ids=["eval", "train_dn"])
def test_outputs_equal_the_official_decoder(monkeypatch, denoising) -> None:
    net = tiny_net(denoising).train(denoising is not None)
    (logits, boxes), (ref_logits, ref_boxes) = run_both(net, official_state(), monkeypatch)
    assert logits.shape == ref_logits.shape and logits.shape[0] == LAYERS
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(boxes, ref_boxes, **TOL)
    assert (boxes[1:] - boxes[:-1]).abs().max() > 1e-2  # the layers do refine


def loss_and_grads(net: DNDETRNet, w: dict, monkeypatch, **flags) -> tuple[list, list]:
    """Gradients of one random linear loss on every layer's outputs, ours and the reference,
    with respect to every official tensor (None where it does not reach)."""
    leaves = {k: v.clone().requires_grad_() for k, v in w.items()}
    (logits, boxes), (ref_logits, ref_boxes) = run_both(net, leaves, monkeypatch, **flags)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    c = torch.randn(boxes.shape, generator=gen, dtype=torch.float64)
    keys = list(leaves)
    grads = []
    for lg, bx in ((logits, boxes), (ref_logits, ref_boxes)):
        loss = (a * lg).sum() + (c * bx).sum()
        grads.append(torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True))
    return keys, grads


def test_gradients_equal_the_official_decoder(monkeypatch) -> None:
    """Every official tensor gets the official gradient: the box of layer l is refined on the
    undetached reference made by layer l-1 (so its loss trains layer l-1's refinement), the next
    reference is detached, and refinement reads the un-normed state."""
    net = tiny_net(DenoisingConfig(groups=2)).train()
    keys, (ours, ref) = loss_and_grads(net, official_state(), monkeypatch)
    for key, g, r in zip(keys, ours, ref, strict=True):
        if key.startswith("transformer.decoder.bbox_embed."):
            continue  # the tied copy: its gradient is bbox_embed's
        assert g is not None and r is not None, key
        torch.testing.assert_close(g, r, **TOL, msg=key)


@pytest.mark.parametrize("flag", ["box_on_detached_ref", "refine_normed"])
def test_the_comparison_detects_the_earlier_reference_path(monkeypatch, flag) -> None:
    """Planted deviations in the reference (our earlier behaviour) move the box head's and the
    anchors' gradients far beyond the tolerance."""
    net = tiny_net(DenoisingConfig(groups=2)).train()
    keys, (ours, ref) = loss_and_grads(net, official_state(), monkeypatch, **{flag: True})
    by_key = dict(zip(keys, zip(ours, ref, strict=True), strict=True))
    for key in ("bbox_embed.layers.2.weight", "refpoint_embed.weight"):
        g, r = by_key[key]
        assert (g - r).abs().max() > 1e-3 * r.abs().max(), key


def test_a_checkpoint_of_the_earlier_decoder_is_refused(tmp_path) -> None:
    module = make_module(
        DNDETR,
        3,
        backbone=BackboneConfig("conv", channels=[8, 8], return_strides=[4]),
        d_model=16,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=16,
        num_queries=5,
    )
    ckpt = tmp_path / "old.ckpt"
    state = module.state_dict()
    for key in [k for k in state if ".self_attn.proj." in k]:
        del state[key]
    state["net.decoder.layers.0.self_attn.in_proj_weight"] = torch.zeros(48, 16)
    state["net.decoder.layers.0.self_attn.in_proj_bias"] = torch.zeros(48)
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": dict(module.hparams),
            "model_class": "detr_lineage.lit.DNDETR",
            "pytorch-lightning_version": lightning.__version__,
        },
        ckpt,
    )
    with pytest.raises(ValueError, match="written before the decoder followed the official"):
        load_detector(str(ckpt))


@pytest.mark.slow
def test_convert_cli_writes_a_dn_detr_checkpoint_that_detects(tmp_path, capsys) -> None:
    """``convert --from official --variant dn-detr-r50``: a file with the official R50 key list
    -> a checkpoint ``load_detector`` reads back with the same weights, which runs."""
    from tests.test_convert import official_state as official_r50

    state = official_r50("dn-detr-r50")
    source, out = tmp_path / "checkpoint.pth", tmp_path / "ours.ckpt"
    torch.save({"model": state}, source)
    main(["--from", "official", "--variant", "dn-detr-r50", str(source), str(out)])
    model = load_detector(str(out))
    assert torch.equal(model.net.anchors.weight, state["refpoint_embed.weight"])
    assert torch.equal(model.net.label_embed.weight[80], state["label_enc.weight"][91])
    with torch.no_grad():
        outputs = model.net(torch.rand(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    assert outputs["pred_logits"].shape == (1, 300, 80)
    with pytest.raises(SystemExit):
        main(["--from", "hf", "--variant", "dn-detr-r50", str(source), str(out)])
    assert "official checkpoint only" in capsys.readouterr().err
