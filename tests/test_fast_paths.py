"""The optimised paths equal the reference (fp32 eager / nn.MultiheadAttention), forward and grads.

Tolerances: the direct attention path against ``nn.MultiheadAttention`` in float64 to 1e-10
(the same arithmetic, reordered); bf16 autocast against fp32 in relative terms stated per test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detr_lineage.nn.transformer import attention


def _mha_pair(d: int = 32, h: int = 4, dropout: float = 0.0) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(d, h, dropout=dropout, batch_first=True).double()
    with torch.no_grad():  # non-zero biases, so a wrong bias slice would show
        mha.in_proj_bias.uniform_(-0.5, 0.5)
        mha.out_proj.bias.uniform_(-0.5, 0.5)
    return mha


def _grads(module: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("sharing", ["q=k=v", "q=k", "separate"])
@pytest.mark.parametrize("masks", ["none", "padding", "attn", "both", "padding all false"])
def test_attention_equals_multihead_attention(sharing: str, masks: str) -> None:
    mha = _mha_pair()
    g = torch.Generator().manual_seed(1)
    b, q_len, s_len, d = 3, 5, 7 if sharing == "separate" else 5, 32
    x = torch.randn(b, q_len, d, generator=g, dtype=torch.float64, requires_grad=True)
    mem = torch.randn(b, s_len, d, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(b, q_len, d, generator=g, dtype=torch.float64)
    kpm = torch.zeros(b, s_len, dtype=torch.bool)
    if masks in ("padding", "both"):
        kpm[0, -2:] = True
        kpm[2, -1] = True
    attn_mask = None
    if masks in ("attn", "both"):
        attn_mask = torch.zeros(q_len, s_len, dtype=torch.bool)
        attn_mask[1, :2] = True
        attn_mask[3, 3:] = True
    padding = None if masks in ("none", "attn") else kpm

    def run(fn):
        for p in mha.parameters():
            p.grad = None
        x.grad = mem.grad = None
        if sharing == "q=k=v":
            q = k = v = x
        elif sharing == "q=k":
            q = k = x + pos
            v = x
        else:
            q, k, v = x + pos, mem, mem * 2
        out = fn(q, k, v)
        (out * torch.linspace(-1, 1, d, dtype=torch.float64)).sum().backward()
        return out.detach(), _grads(mha, [x, mem] if sharing == "separate" else [x])

    ref, ref_grads = run(
        lambda q, k, v: mha(
            q, k, v, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False
        )[0]
    )
    out, grads = run(lambda q, k, v: attention(mha, q, k, v, padding, attn_mask))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_attention_dropout_only_in_training() -> None:
    mha = _mha_pair(dropout=0.5)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mha.eval()
    ref = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(attention(mha, x, x, x), ref, rtol=0, atol=1e-10)
    mha.train()
    torch.manual_seed(0)
    a = attention(mha, x, x, x)
    torch.manual_seed(1)
    b = attention(mha, x, x, x)
    assert not torch.allclose(a, b), "dropout must act in training"


# ---- bf16 autocast against fp32 ---------------------------------------------------------------
def _toy_model(variant: str):
    from detr_lineage.denoising import DenoisingConfig
    from detr_lineage.lit import DETR, RTDETRv2
    from detr_lineage.models.detr import DETRConfig
    from detr_lineage.models.rtdetr_v2 import RTDETRv2Config
    from detr_lineage.nn.backbone import BackboneConfig

    torch.manual_seed(0)
    if variant == "detr":
        net = DETRConfig(
            num_classes=3,
            backbone=BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[8]),
            d_model=32,
            nhead=4,
            num_encoder_layers=1,
            num_decoder_layers=2,
            dim_feedforward=64,
            dropout=0.0,
            num_queries=6,
        )
        return DETR(net)
    net = RTDETRv2Config(
        num_classes=3,
        backbone=BackboneConfig(name="conv", channels=[8, 16, 32], return_strides=[2, 4, 8]),
        hidden_dim=32,
        encoder_dim=32,
        nhead=4,
        encoder_dim_feedforward=64,
        expansion=0.5,
        num_queries=1000,  # every token (84 at 16 px): top-k selection becomes a permutation
        num_decoder_layers=2,
        dim_feedforward=64,
        denoising=DenoisingConfig(query_budget=8, contrastive=True),
    )
    return RTDETRv2(net, num_select=6)


def _batch(size: int):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, size, size, generator=g)
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[1, :, size * 3 // 4 :] = True  # one padded image: the masked attention path runs too
    targets = [
        {
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[0.4, 0.5, 0.3, 0.4]]), "labels": torch.tensor([1])},
    ]
    return images, masks, targets


@pytest.mark.parametrize("variant", ["detr", "rtdetr_v2"])
def test_bf16_autocast_matches_fp32(variant: str) -> None:
    """Under CPU bf16 autocast (``trainer.precision: bf16-mixed``): boxes and losses stay fp32,
    and predictions, loss and gradients agree with the fp32 step. Tolerances: boxes within 0.02,
    logits within 0.1, loss within 3% and the gradient within cosine 0.98 / norm 10% (bf16 keeps
    8 mantissa bits, ~0.4% per rounding; the trunk's convolution gradients, through
    training-mode BatchNorm over two tiny images, differ by ~15% per tensor: the usual bf16
    noise, largest at this tiny batch). RT-DETRv2 selects every encoder token as a query, so
    that bf16 rounding cannot flip its discrete top-k choice (a permutation leaves the loss
    unchanged); its boxes are compared on the denoising queries, whose order is fixed."""
    model = _toy_model(variant)
    model.train()
    images, masks, targets = _batch(32 if variant == "detr" else 16)

    def step(bf16: bool):
        model.zero_grad()
        torch.manual_seed(5)  # the same denoising noise both times
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model.net(images, masks, targets)
            losses = model.criterion(out, targets)
        losses["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return out, losses, grad

    ref_out, ref_losses, ref_grad = step(False)
    out, losses, grad = step(True)
    assert out["pred_boxes"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())
    if variant != "detr":
        out, ref_out = out["dn_outputs"], ref_out["dn_outputs"]
    torch.testing.assert_close(out["pred_boxes"], ref_out["pred_boxes"], rtol=0, atol=0.02)
    torch.testing.assert_close(out["pred_logits"].float(), ref_out["pred_logits"], rtol=0, atol=0.1)
    torch.testing.assert_close(losses["loss"], ref_losses["loss"], rtol=0.03, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)
    assert cosine > 0.98, f"gradient direction differs under bf16: cosine {cosine:.4f}"
    # norm within 10%: DETR's first decoder layer starts from zero queries, so its post-norm
    # LayerNorm sees nearly constant vectors and amplifies rounding (its self-attention biases
    # carry most of the gradient norm at init, in fp32 as in bf16)
    assert abs(grad.norm() / ref_grad.norm() - 1) < 0.1


def test_bf16_attention_runs_in_fp32_and_returns_bf16() -> None:
    mha = _mha_pair().float()
    x = torch.randn(2, 5, 32)
    ref = mha(x, x, x, need_weights=False)[0]
    with torch.autocast("cpu", torch.bfloat16):
        out = attention(mha, x, x, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.05)


def test_configured_optimizer_is_fused_adamw_and_equals_the_reference() -> None:
    """``configure_optimizers`` uses the fused AdamW kernel; three steps of it equal the
    per-tensor reference AdamW (same groups) within 1e-6, and it allows gradient clipping
    under mixed precision (no internal unscaling)."""
    model = _toy_model("detr")
    model.hparams.lr_drop_epochs = None
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
    assert not getattr(optimizer, "_step_supports_amp_scaling", False)
    reference = _toy_model("detr")
    ref_opt = torch.optim.AdamW(reference.parameter_groups(), lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, r in zip(model.net.parameters(), reference.net.parameters()):
            grad = torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad.clone(), grad.clone()
        optimizer.step()
        ref_opt.step()
    for p, r in zip(model.net.parameters(), reference.net.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert any(
        not torch.equal(p, r)
        for p, r in zip(_toy_model("detr").net.parameters(), model.net.parameters())
    )
