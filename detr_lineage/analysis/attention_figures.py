"""Where a detector's queries look, drawn from a ``Trace`` of one hooked forward (``explain.py``).

- ``plot_query_selection``: RT-DETRv2's top-k encoder proposals (the decoder's initial boxes)
  and the encoder's per-token class score on each level;
- ``plot_sampling_points``: one query's deformable sampling points per head and level, sized
  by attention weight, with the reference box they are placed around;
- ``plot_box_refinement``: one query's box entering the decoder and after every layer;
- ``plot_cross_attention``: DETR / DN-DETR, one query's dense cross-attention map per head.

Every figure reads the recorded tensors only (nothing is recomputed but the dense attention
weights, see ``explain.cross_attention_weights``). Matplotlib ``Figure`` objects, no pyplot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ..explain import Trace, cross_attention_weights
from ..nn.transformer import ConditionalCrossAttention, DenseCrossAttention

DEFORMABLE = r"decoder\.layers\.{layer}\.cross_attn\.attn"


def _image(ax, trace: Trace) -> tuple[int, int]:
    """Draw the input image (pixel edges on integers); returns (h, w)."""
    h, w = trace.image.shape[-2:]
    ax.imshow(trace.image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, w, h, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    return int(h), int(w)


def _rect(box: torch.Tensor, h: int, w: int, **style) -> Rectangle:
    """A normalised cxcywh box as a patch in pixels."""
    cx, cy, bw, bh = box.tolist()
    return Rectangle(((cx - bw / 2) * w, (cy - bh / 2) * h), bw * w, bh * h, fill=False, **style)


def _decoder_refs(trace: Trace) -> torch.Tensor:
    """``[B,K,4]`` reference boxes of the matching queries entering the first decoder layer."""
    import inspect

    call = trace.first(r"decoder")
    bound = inspect.signature(call.module.forward).bind(*call.args, **call.kwargs).arguments
    ref = bound.get("ref_boxes")
    if ref is None:
        raise ValueError(f"{trace.variant}: the decoder has no reference boxes")
    return ref[:, trace.denoising :]


def _num_layers(trace: Trace) -> int:
    return len(trace.outputs.get("aux_outputs", [])) + 1


def _layer_index(trace: Trace, layer: int) -> int:
    n = _num_layers(trace)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range: the decoder ran {n} layers")
    return layer % n


def best_query(trace: Trace) -> int:
    """The matching query with the highest class score in the first image."""
    return int(trace.scores()[0].argmax())


def _check_query(trace: Trace, query: int | None) -> int:
    query = best_query(trace) if query is None else query
    if not 0 <= query < trace.num_matching:
        raise ValueError(f"query {query} out of range: {trace.num_matching} matching queries")
    return query


def plot_query_selection(trace: Trace, top: int = 30) -> Figure:
    """(a) RT-DETRv2 query selection: the ``top`` best of the K proposals the encoder hands the
    decoder (boxes, shaded by encoder score), and that score per token on every level."""
    logits = trace.first(r"enc_score_head").output[0]  # [S,C]
    token_scores = logits.sigmoid().max(-1).values  # [S]
    maps = [c.output for c in trace.find(r"input_proj\.\d+")]
    shapes = [tuple(int(s) for s in m.shape[-2:]) for m in maps]
    refs = _decoder_refs(trace)[0]  # [K,4], in top-k order (best first)
    k = refs.shape[0]
    chosen = token_scores.topk(k).values  # the same ranking the model used
    fig = Figure(figsize=(3.2 * (1 + len(shapes)), 3.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(shapes))
    h, w = _image(axes[0], trace)
    cmap = colormaps["plasma"]
    lo, hi = float(chosen[: min(top, k)].min()), float(chosen[0])
    for rank in reversed(range(min(top, k))):
        level = (float(chosen[rank]) - lo) / max(hi - lo, 1e-9)
        axes[0].add_patch(_rect(refs[rank], h, w, ec=cmap(level), lw=1.0 + level))
    axes[0].set_title(f"top {min(top, k)} of K={k} proposals\n(bright = higher score)", fontsize=8)
    start = 0
    for ax, (mh, mw) in zip(axes[1:], shapes):
        level_scores = token_scores[start : start + mh * mw].view(mh, mw)
        start += mh * mw
        ax.imshow(level_scores.numpy(), cmap="viridis", vmin=0, vmax=hi, extent=(0, w, h, 0))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"encoder score, {mh}x{mw} level", fontsize=8)
    fig.suptitle(f"{trace.variant}: query selection from {start} encoder tokens", fontsize=9)
    return fig


def plot_sampling_points(trace: Trace, query: int | None = None, layer: int = -1) -> Figure:
    """(b) One query's deformable sampling points in one decoder layer: a panel per level,
    a colour per head, marker area proportional to the attention weight; dashed: the
    reference box the points are placed around, solid: the box that layer predicts."""
    query = _check_query(trace, query)
    layer = _layer_index(trace, layer)
    name = DEFORMABLE.format(layer=layer)
    q = trace.denoising + query
    attn = trace.first(name)
    locations = trace.first(name + r"\.locations_tap").output[0, q]  # [H,P,2] in [0,1]
    weights = trace.first(name + r"\.weights_tap").output[0, q]  # [H,P]
    reference = attn.args[1][0, q]  # [4] cxcywh (RT-DETRv2) or [2] (points)
    module = attn.module
    levels = [c.output for c in trace.find(r"input_proj\.\d+")]
    fig = Figure(figsize=(3.3 * module.n_levels, 3.7), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, module.n_levels))
    cmap = colormaps["tab10"]
    start = 0
    scale = 40.0 * weights.shape[-1]  # uniform attention (1 / points) -> area 40 pt^2
    box = _layer_boxes(trace, query)[layer + 1]
    for lvl, (ax, n) in enumerate(zip(axes, module.num_points)):
        h, w = _image(ax, trace)
        if reference.numel() == 4:
            ax.add_patch(_rect(reference, h, w, ec="black", ls="--", lw=1.2))
        ax.add_patch(_rect(box, h, w, ec="white", lw=1.5))
        pts = locations[:, start : start + n]  # [H,n,2]
        wts = weights[:, start : start + n]
        for head in range(module.n_heads):
            ax.scatter(
                pts[head, :, 0] * w,
                pts[head, :, 1] * h,
                s=(wts[head] * scale).clamp(max=400).numpy(),
                color=cmap(head % 10),
                edgecolors="black",
                linewidths=0.4,
                alpha=0.85,
            )
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        size = f"{levels[lvl].shape[-2]}x{levels[lvl].shape[-1]}" if lvl < len(levels) else ""
        share = float(wts.sum()) / module.n_heads
        ax.set_title(f"level {lvl} {size}: {share:.0%} of the attention", fontsize=8)
        start += n
    handles = [
        Line2D([], [], ls="", marker="o", color=cmap(i % 10), label=f"head {i}")
        for i in range(module.n_heads)
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle(
        f"{trace.variant}: query {query}, decoder layer {layer}, sampling points "
        "(area = attention weight); black dashed: reference box, white: the layer's box",
        fontsize=9,
    )
    return fig


def _layer_boxes(trace: Trace, query: int) -> torch.Tensor:
    """``[1 + L, 4]``: the query's box entering the decoder (if any) and after every layer."""
    per_layer = [a["pred_boxes"] for a in trace.outputs.get("aux_outputs", [])]
    per_layer.append(trace.outputs["pred_boxes"])
    boxes = torch.stack([b[0, query] for b in per_layer])
    try:
        first = _decoder_refs(trace)[0, query][None]
    except ValueError:  # DETR: no reference box, the first row repeats layer 0's box
        first = boxes[:1]
    return torch.cat([first, boxes])


def plot_box_refinement(trace: Trace, query: int | None = None) -> Figure:
    """(c) One query's box entering the decoder (dashed) and after each layer, light to dark."""
    query = _check_query(trace, query)
    boxes = _layer_boxes(trace, query)
    fig = Figure(figsize=(4.4, 4.0), layout="constrained")
    ax = fig.subplots()
    h, w = _image(ax, trace)
    has_ref = _has_refs(trace)
    if has_ref:
        ax.add_patch(_rect(boxes[0], h, w, ec="black", ls="--", lw=1.2, label="decoder input"))
    cmap = colormaps["autumn"]
    n = len(boxes) - 1
    for i, box in enumerate(boxes[1:]):
        ax.add_patch(_rect(box, h, w, ec=cmap(i / max(n - 1, 1)), lw=1.5, label=f"layer {i}"))
    ax.legend(fontsize=7, loc="upper right", framealpha=0.6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    score = float(trace.scores()[0, query])
    ax.set_title(f"{trace.variant}: query {query} (score {score:.2f}) layer by layer", fontsize=8)
    return fig


def _has_refs(trace: Trace) -> bool:
    try:
        _decoder_refs(trace)
    except ValueError:
        return False
    return True


def plot_cross_attention(trace: Trace, query: int | None = None, layer: int = -1) -> Figure:
    """(d) DETR / DN-DETR: one query's cross-attention over the encoder map, mean of the heads
    and each head, upsampled onto the image, with the box that layer predicts."""
    query = _check_query(trace, query)
    layer = _layer_index(trace, layer)
    call = trace.first(rf"decoder\.layers\.{layer}\.cross_attn")
    memory = call.args[2]
    weights = cross_attention_weights(call)[0, :, trace.denoising + query]  # [heads,S]
    (mh, mw), *_ = memory.spatial_shapes
    maps = weights.view(-1, 1, mh, mw)
    h, w = trace.image.shape[-2:]
    up = F.interpolate(maps, size=(h, w), mode="nearest")[:, 0]  # [heads,H,W]
    panels = [("mean of heads", up.mean(0))] + [(f"head {i}", m) for i, m in enumerate(up)]
    columns = 3
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(2.6 * columns, 2.6 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    box = _layer_boxes(trace, query)[layer + 1]
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (title, heat) in zip(axes.flat, panels):
        ax.set_visible(True)
        _image(ax, trace)
        ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=(0, w, h, 0))
        ax.add_patch(_rect(box, h, w, ec="cyan", lw=1.2))
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        f"{trace.variant}: cross-attention of query {query}, decoder layer {layer}, over "
        f"the {mh}x{mw} encoder map (cyan: the layer's box)",
        fontsize=9,
    )
    return fig


def save_figures(
    trace: Trace, out_dir: str | Path, query: int | None = None, dpi: int = 120
) -> list[Path]:
    """Every figure that applies to the traced variant, as PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"box_refinement": plot_box_refinement(trace, query)}
    if trace.find(r"enc_score_head"):
        figures["query_selection"] = plot_query_selection(trace)
    if trace.find(r"decoder\.layers\.\d+\.cross_attn\.attn\.locations_tap"):
        figures["sampling_points"] = plot_sampling_points(trace, query)
    elif any(
        isinstance(c.module, (DenseCrossAttention, ConditionalCrossAttention))
        for c in trace.find(r"decoder\.layers\.\d+\.cross_attn")
    ):
        figures["cross_attention"] = plot_cross_attention(trace, query)
    paths = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
