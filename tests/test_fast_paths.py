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
