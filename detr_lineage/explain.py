"""``detr-lineage explain``: the tensor flow of a configured detector, shapes read off one forward.

One forward pass runs with forward hooks on the network's modules; every line printed comes
from a tensor that a hooked module really received or returned, never from a table of
expected shapes. What is hooked and how it is named is a small per-variant description
(``VARIANTS``: a list of ``Probe`` s, module-name patterns with the papers' short names), so a
new variant plugs in by adding one entry. ``Trace`` keeps the recorded tensors for the figures
(``analysis/attention_figures.py``).

    detr-lineage explain --config experiments/coco/rtdetrv2_r50.yaml --denoising on
    detr-lineage explain --config experiments/toy/rtdetr_v2.yaml --ckpt_path last.ckpt \
        --format md --out flow.md --figures figs/
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from .nn.transformer import ConditionalCrossAttention, DenseCrossAttention, Memory

# -- recording ----------------------------------------------------------------------------------


@dataclass
class Call:
    """One call of a hooked module: what it received and returned (detached tensors)."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any = None
    layer: int | None = None  # decoder layer this call belongs to (see Probe.layer)
    count: int = 0  # how many times this module was called before in the forward


@dataclass
class Trace:
    """Everything one hooked forward pass recorded, in call order (outer module first)."""

    variant: str
    image: Tensor  # [3,H,W] in [0,1], the input the network saw
    calls: list[tuple[Probe, Call]]
    outputs: dict
    denoising: int  # d: number of denoising queries in the decoder input (0 when off)
    num_groups: int = 0
    slots_per_group: int = 0
    softmax: bool = False  # class scores: softmax with a no-object class (DETR) or sigmoid

    def scores(self) -> Tensor:
        """``[B,K]`` best class probability of each matching query (no-object excluded)."""
        logits = self.outputs["pred_logits"]
        prob = logits.softmax(-1)[..., :-1] if self.softmax else logits.sigmoid()
        return prob.max(-1).values

    def find(self, pattern: str) -> list[Call]:
        """Recorded calls whose module name fully matches ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        return [c for _, c in self.calls if regex.fullmatch(c.name)]

    def first(self, pattern: str) -> Call:
        calls = self.find(pattern)
        if not calls:
            raise KeyError(f"no module matching {pattern!r} ran in this {self.variant} forward")
        return calls[0]

    @property
    def batch_size(self) -> int:
        return int(self.outputs["pred_boxes"].shape[0])

    @property
    def num_matching(self) -> int:
        """K: the matching (non-denoising) queries of the last decoder layer."""
        return int(self.outputs["pred_boxes"].shape[1])


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


@dataclass(frozen=True)
class Probe:
    """A module to hook and how to describe it.

    pattern: regex fully matching the module's name in the network (``decoder.layers.3.ffn``).
    stage: section title; ``{layer}`` is the decoder layer of the call.
    describe: ``(call, trace) -> lines`` of ``(short name, shapes)``.
    layer: how a call finds its decoder layer: "name" (the pattern's ``layer`` group),
        "count" (n-th call of the module; the query-position head runs once per layer before
        it), "context" (the last decoder layer entered; a box head runs after its layer).
    """

    pattern: str
    stage: str
    describe: Callable[[Call, Trace], list[tuple[str, str]]]
    layer: str = "name"


DECODER_LAYER = r"decoder\.layers\.(?P<layer>\d+)"


class Recorder:
    """Registers the probes' hooks on a network and collects the calls of one forward."""

    def __init__(self, net: nn.Module, probes: Sequence[Probe]) -> None:
        self.calls: list[tuple[Probe, Call]] = []
        self.handles = []
        self.layer: int | None = None
        self.counts: dict[int, int] = {}
        compiled = [(p, re.compile(p.pattern)) for p in probes]
        layer_re = re.compile(DECODER_LAYER)
        for name, module in net.named_modules():
            if layer_re.fullmatch(name):
                index = int(layer_re.fullmatch(name).group("layer"))
                self.handles.append(module.register_forward_pre_hook(self._enter_layer(index)))
            for probe, regex in compiled:
                match = regex.fullmatch(name)
                if match:
                    self._hook(name, module, probe, match)
                    break

    def _enter_layer(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.layer = index

        return hook

    def _hook(self, name: str, module: nn.Module, probe: Probe, match: re.Match) -> None:
        pending: list[Call] = []

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            count = self.counts.get(id(mod), 0)
            self.counts[id(mod)] = count + 1
            if probe.layer == "count":
                layer = count
            elif probe.layer == "context":
                layer = self.layer
            else:
                layer = int(match.group("layer")) if "layer" in match.groupdict() else None
            call = Call(name, mod, _detach(args), _detach(kwargs), layer=layer, count=count)
            pending.append(call)
            self.calls.append((probe, call))

        def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            pending.pop().output = _detach(output)

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# -- shapes as text ----------------------------------------------------------------------------


@dataclass
class Symbols:
    """How dimensions are written: the batch as B, the decoder queries as K+d."""

    batch: int
    queries: int | None = None  # K + d
    matching: int = 0
    denoising: int = 0

    def dim(self, size: int, axis: int, query_axis: int | None) -> str:
        if axis == 0 and size == self.batch and query_axis != 0:
            return "B"
        if axis == query_axis and self.denoising and size == self.queries:
            return f"{self.matching}+{self.denoising}"
        return str(size)


def mask_shape(mask: Tensor, sym: Symbols) -> str:
    """A ``[Q,Q]`` attention mask's shape, both axes written as queries."""
    q = sym.dim(int(mask.shape[0]), 1, 1)
    return f"({q}, {q})"


def shape(x: Any, sym: Symbols, query_axis: int | None = None) -> str:
    """``(B, 300+200, 96)``-style text of a tensor (or a list of tensors)."""
    if isinstance(x, Memory):
        return shape(x.value, sym, None)
    if isinstance(x, (list, tuple)):
        return ", ".join(shape(v, sym, query_axis) for v in x)
    if not isinstance(x, Tensor):
        return str(x)
    dims = [sym.dim(int(s), i, query_axis) for i, s in enumerate(x.shape)]
    return "(" + ", ".join(dims) + ")"


# -- per-variant descriptions --------------------------------------------------------------------
# Each describe function returns (short name, shapes) lines for one call; ``T.sym`` writes dims.


def _sym(trace: Trace) -> Symbols:
    return Symbols(
        trace.batch_size,
        trace.num_matching + trace.denoising,
        trace.num_matching,
        trace.denoising,
    )


def _io(label: str, query_axis: int | None = None) -> Callable:
    def describe(call: Call, trace: Trace) -> list[tuple[str, str]]:
        sym = _sym(trace)
        tensors = [a for a in call.args if isinstance(a, (Tensor, Memory))]
        return [
            (
                label,
                f"{shape(tensors, sym, query_axis)} -> {shape(call.output, sym, query_axis)}",
            )
        ]

    return describe


def _level_name(stride: int, prefix: str) -> str:
    return f"{prefix}{int(round(math.log2(stride)))} (stride {stride})"


def _backbone(prefix: str) -> Callable:
    def describe(call: Call, trace: Trace) -> list[tuple[str, str]]:
        sym = _sym(trace)
        lines = [("image (pixels in [0,1])", shape(call.args[0], sym))]
        strides = getattr(call.module, "strides", None) or [0] * len(call.output)
        for stride, feat in zip(strides, call.output):
            lines.append((_level_name(stride, prefix) if stride else "map", shape(feat, sym)))
        return lines

    return describe


def _hw(t: Tensor) -> str:
    return "x".join(str(int(s)) for s in t.shape[-2:])


def _aifi(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    x = call.args[0]
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    n = len(call.module.layers)
    return [
        (
            f"AIFI: flatten {_hw(x)} -> {n} layer(s) -> reshape",
            f"{shape(x, sym)} -> {shape(tokens, sym)} -> {shape(call.output, sym)}",
        )
    ]


def _encoder_layer(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    src = call.args[0]
    pos = call.args[1] if len(call.args) > 1 else call.kwargs.get("pos")
    lines = [(f"layer {call.name.rsplit('.', 1)[-1]}: self-attn + FFN", shape(src, sym))]
    if pos is not None and call.count == 0 and call.name.endswith(".0"):
        lines.append(("  + 2D sine position (q, k only)", shape(pos, sym)))
    return lines


def _csp(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    blocks = len(getattr(call.module, "bottlenecks", []))
    return [
        (
            f"CSP block ({blocks} RepVGG) on concat",
            f"{shape(call.args[0], sym)} -> {shape(call.output, sym)}",
        )
    ]


def _memory(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    maps = [c.output for c in trace.find(r"input_proj\.\d+")]
    levels = " + ".join(_hw(m) for m in maps)
    total = sum(int(m.shape[-1] * m.shape[-2]) for m in maps)
    return [
        (f"flatten + concat {len(maps)} levels", f"{levels} = {total} tokens"),
        ("memory", shape(call.args[0], sym)),
        ("enc_output: Linear + LayerNorm", shape(call.output, sym)),
    ]


def _decoder_input(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    bound = inspect.signature(call.module.forward).bind(*call.args, **call.kwargs).arguments
    tgt, memory = bound["tgt"], bound["memory"]
    ref, query_pos = bound.get("ref_boxes"), bound.get("query_pos")
    mask = bound.get("self_attn_mask")
    d, k = trace.denoising, trace.num_matching
    lines = []
    if trace.find(r"enc_score_head"):
        scores = trace.first(r"enc_score_head").output
        lines.append(
            (
                f"top-k query selection (K={k} of {scores.shape[1]} tokens)",
                f"content (B, {k}, {tgt.shape[-1]}), boxes (B, {k}, 4)",
            )
        )
    if d:
        lines.append(
            (
                f"denoising: {trace.num_groups} groups x {trace.slots_per_group} slots = d",
                f"d = {d} queries",
            )
        )
    zero = " = 0" if not tgt.any() else ""
    lines.append((f"decoder input (content){zero}", shape(tgt, sym, 1)))
    if ref is not None:
        lines.append(("reference boxes (cx, cy, w, h)", shape(ref, sym, 1)))
    if query_pos is not None:
        what = "[denoising | learned]" if d else "learned"
        lines.append((f"query position ({what})", shape(query_pos, sym, 1)))
    mem = memory.value if isinstance(memory, Memory) else memory
    lines.append(("memory (keys / values)", shape(mem, sym)))
    if memory.spatial_shapes is not None:
        lines.append(
            ("levels (h, w)", str([tuple(int(v) for v in s) for s in memory.spatial_shapes]))
        )
    if mask is not None:
        blocked = int(mask[-1].sum())
        lines.append(
            (
                "self-attn mask (True = blocked)",
                f"{mask_shape(mask, sym)}; matching queries blind to {blocked}",
            )
        )
    return lines


def _query_pos(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    ref = call.args[0]
    pos, cross = call.output
    lines = [("query pos = head(ref box)", f"{shape(ref, sym, 1)} -> {shape(pos, sym, 1)}")]
    if cross is not None:
        lines.append(("cross-attn pos (sine, w/h modulated)", shape(cross, sym, 1)))
    return lines


def _self_attn(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    if isinstance(call.module, nn.MultiheadAttention):
        mask, out, how = call.kwargs.get("attn_mask"), call.output[0], "q = k = tgt + pos"
    else:  # ContentPositionSelfAttention(x, pos, attn_mask): DAB / DN-DETR
        mask = call.args[2] if len(call.args) > 2 else call.kwargs.get("attn_mask")
        out, how = call.output, "q, k = content + position projections"
    text = f"{shape(call.args[0], sym, 1)} -> {shape(out, sym, 1)}"
    if mask is not None:
        text += f", mask {mask_shape(mask, sym)}"
    return [(f"self-attn ({call.module.num_heads} heads), {how}", text)]


def _dense_cross(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    query, memory = call.args[0], call.args[2]
    heads = call.module.attn.num_heads
    b, q = query.shape[:2]
    s = memory.value.shape[1]
    attn = torch.empty(b, heads, q, s, device="meta")
    return [
        (
            "cross-attn: queries x all memory tokens",
            f"{shape(query, sym, 1)} x {shape(memory.value, sym)} -> {shape(call.output, sym, 1)}",
        ),
        (f"  attention map ({heads} heads)", shape(attn, sym, 2)),
    ]


def _conditional_cross(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    query, memory = call.args[0], call.args[2]
    heads = call.module.nhead
    b, q, d = query.shape
    s = memory.value.shape[1]
    per_head_q = torch.empty(b, heads, q, 2 * d // heads, device="meta")
    per_head_k = torch.empty(b, heads, s, 2 * d // heads, device="meta")
    return [
        ("cross-attn (conditional)", f"{shape(query, sym, 1)} -> {shape(call.output, sym, 1)}"),
        ("  q = [content | sine pos] per head", shape(per_head_q, sym, 2)),
        ("  k = [content | memory pos] per head", shape(per_head_k, sym)),
        (
            f"  attention map ({heads} heads)",
            shape(torch.empty(b, heads, q, s, device="meta"), sym, 2),
        ),
    ]


def _msdeform(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    m = call.module
    query, reference, value = call.args[:3]
    v = value.view(*value.shape[:2], m.n_heads, m.head_dim)
    points = m.num_points[0] if len(set(m.num_points)) == 1 else m.num_points
    return [
        (
            f"MSDeformAttn: {m.n_heads} heads x {m.n_levels} levels x {points} points",
            f"query {shape(query, sym, 1)}, ref {shape(reference, sym, 1)}",
        ),
        ("  value per head", f"{shape(value, sym)} -> {shape(v, sym)}"),
    ]


def _offsets(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    parent = _parent(trace, call)
    note = f" = {parent.n_heads} heads x {sum(parent.num_points)} points x 2"
    text = f"{shape(call.args[0], sym, 1)} -> {shape(call.output, sym, 1)}{note}"
    return [("  sampling offsets = Linear(q)", text)]


def _weights(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    m = _parent(trace, call)
    note = f" = {m.n_heads} heads x {m.n_levels} levels x {m.num_points[0]} points"
    if len(set(m.num_points)) > 1:
        note = f" = {m.n_heads} heads x points {m.num_points}"
    text = f"{shape(call.args[0], sym, 1)} -> {shape(call.output, sym, 1)}{note}"
    return [("  attention weights = Linear(q)", text)]


def _softmax(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    return [("  softmax over each head's points", shape(call.output, sym, 1))]


def _locations(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    loc = call.output
    grid = 2 * loc - 1
    return [
        ("  sampling locations (ref + offsets)", f"{shape(loc, sym, 1)} in map coords [0,1]"),
        (
            "  grid = 2*loc - 1 for grid_sample",
            f"{shape(grid, sym, 1)}, values in [{grid.min():.2f}, {grid.max():.2f}]",
        ),
    ]


def _out_proj(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    return [
        (
            "  weighted bilinear samples -> out proj",
            f"{shape(call.args[0], sym, 1)} -> {shape(call.output, sym, 1)}",
        )
    ]


def _parent(trace: Trace, call: Call) -> nn.Module:
    return trace.first(re.escape(call.name.rsplit(".", 1)[0])).module


def _ffn(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    hidden = call.module.linear1.out_features
    x = call.args[0]
    mid = torch.empty(*x.shape[:-1], hidden, device="meta")
    return [
        (
            "FFN",
            f"{shape(x, sym, 1)} -> {shape(mid, sym, 1)} -> {shape(call.output, sym, 1)}",
        )
    ]


def _box_refine(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    return [
        (
            "box refinement: sigmoid(MLP(h) + logit(ref))",
            f"{shape(call.args[0], sym, 1)} -> delta {shape(call.output, sym, 1)}",
        )
    ]


def _label_embed(call: Call, trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    what = "denoising: noised GT labels" if call.count else "matching: 'unknown' label"
    if trace.denoising == 0:
        what = "matching: 'unknown' label"
    text = f"{shape(call.args[0], sym)} -> {shape(call.output, sym)} + 1 indicator bit"
    return [(f"{what} embedding", text)]


def _head(label: str) -> Callable:
    def describe(call: Call, trace: Trace) -> list[tuple[str, str]]:
        sym = _sym(trace)
        name = label.format(layer=call.layer)
        x, y = call.args[0], call.output
        if x.dim() == 4:  # [L,B,Q,d]: all decoder layers at once
            layers = f"L={x.shape[0]} x "
            return [(name, f"{layers}{shape(x[0], sym, 1)} -> {layers}{shape(y[0], sym, 1)}")]
        return [(name, f"{shape(x, sym, 1)} -> {shape(y, sym, 1)}")]

    return describe


def _outputs(trace: Trace) -> list[tuple[str, str]]:
    sym = _sym(trace)
    out = trace.outputs
    lines = [
        ("pred_logits", shape(out["pred_logits"], sym)),
        ("pred_boxes (sigmoid cx, cy, w, h)", shape(out["pred_boxes"], sym)),
    ]
    if out.get("aux_outputs"):
        lines.append(("aux_outputs (earlier layers)", f"{len(out['aux_outputs'])} x the same"))
    if "enc_outputs" in out:
        enc = out["enc_outputs"]
        lines.append(
            ("enc_outputs (top-k proposals)", shape([enc["pred_logits"], enc["pred_boxes"]], sym))
        )
    if "dn_outputs" in out:
        dn = out["dn_outputs"]
        lines.append(
            ("dn_outputs (split off, own loss)", shape([dn["pred_logits"], dn["pred_boxes"]], sym))
        )
    return lines


DECODER_PROBES = [
    Probe(r"decoder", "Decoder input", _decoder_input),
    Probe(r"decoder\.query_pos_head", "Decoder layer {layer}", _query_pos, layer="count"),
    Probe(DECODER_LAYER + r"\.self_attn", "Decoder layer {layer}", _self_attn),
    Probe(DECODER_LAYER + r"\.cross_attn", "Decoder layer {layer}", lambda c, t: []),
    Probe(DECODER_LAYER + r"\.ffn", "Decoder layer {layer}", _ffn),
]

DEFORMABLE_PROBES = [
    Probe(
        DECODER_LAYER + r"\.cross_attn\.attn\.sampling_offsets", "Decoder layer {layer}", _offsets
    ),
    Probe(
        DECODER_LAYER + r"\.cross_attn\.attn\.attention_weights", "Decoder layer {layer}", _weights
    ),
    Probe(DECODER_LAYER + r"\.cross_attn\.attn\.weights_tap", "Decoder layer {layer}", _softmax),
    Probe(
        DECODER_LAYER + r"\.cross_attn\.attn\.locations_tap", "Decoder layer {layer}", _locations
    ),
    Probe(DECODER_LAYER + r"\.cross_attn\.attn\.output_proj", "Decoder layer {layer}", _out_proj),
    Probe(DECODER_LAYER + r"\.cross_attn\.attn", "Decoder layer {layer}", _msdeform),
]


def _cross_probe(describe: Callable) -> Probe:
    return Probe(DECODER_LAYER + r"\.cross_attn", "Decoder layer {layer}", describe)


SINGLE_SCALE_ENCODER = [
    Probe(r"encoder\.backbone", "Backbone", _backbone("C")),
    Probe(r"encoder\.input_proj", "Input projection", _io("1x1 conv to d_model")),
    Probe(
        r"encoder\.layers\.\d+",
        "Transformer encoder (flattened map + sine positions)",
        _encoder_layer,
    ),
]


@dataclass(frozen=True)
class Variant:
    """How one network class is explained: its title and its probes (first match wins);
    ``softmax``: class scores are a softmax with a last no-object class (else sigmoids)."""

    title: str
    probes: list[Probe] = field(default_factory=list)
    softmax: bool = False


VARIANTS: dict[str, Variant] = {
    "DETRNet": Variant(
        "DETR",
        [
            *SINGLE_SCALE_ENCODER,
            Probe(
                r"dn_query_pos",
                "Denoising queries (optional on DETR)",
                _io("noised GT labels, boxes -> query pos"),
            ),
            _cross_probe(_dense_cross),
            *DECODER_PROBES,
            Probe(
                r"class_head", "Heads (shared by all layers)", _head("class head (C + no-object)")
            ),
            Probe(r"box_head", "Heads (shared by all layers)", _head("box head MLP + sigmoid")),
        ],
        softmax=True,
    ),
    "DNDETRNet": Variant(
        "DN-DETR (on DAB-DETR)",
        [
            *SINGLE_SCALE_ENCODER,
            _cross_probe(_conditional_cross),
            *DECODER_PROBES,
            Probe(r"box_head", "Decoder layer {layer}", _box_refine, layer="context"),
            Probe(r"label_embed", "Decoder queries", _label_embed),
            Probe(r"class_head", "Heads (shared by all layers)", _head("class head (sigmoid)")),
        ],
    ),
    "RTDETRv2Net": Variant(
        "RT-DETRv2",
        [
            Probe(r"backbone", "Backbone", _backbone("S")),
            Probe(
                r"encoder\.input_proj\.\d+",
                "Hybrid encoder: input projections",
                _io("1x1 conv + BN"),
            ),
            Probe(
                r"encoder\.encoder\.\d+",
                "Hybrid encoder: AIFI (self-attention on the coarsest level)",
                _aifi,
            ),
            Probe(
                r"encoder\.encoder\.\d+\.layers\.\d+",
                "Hybrid encoder: AIFI (self-attention on the coarsest level)",
                _encoder_layer,
            ),
            Probe(
                r"encoder\.lateral_convs\.\d+",
                "CCFF fusion: top-down (FPN)",
                _io("lateral 1x1 conv"),
            ),
            Probe(r"encoder\.fpn_blocks\.\d+", "CCFF fusion: top-down (FPN)", _csp),
            Probe(
                r"encoder\.downsample_convs\.\d+",
                "CCFF fusion: bottom-up (PAN)",
                _io("3x3 stride-2 conv"),
            ),
            Probe(r"encoder\.pan_blocks\.\d+", "CCFF fusion: bottom-up (PAN)", _csp),
            Probe(r"input_proj\.\d+", "Projections to the decoder width", _io("1x1 conv + BN")),
            Probe(r"enc_output", "Flatten + concat levels, query selection", _memory),
            Probe(
                r"enc_score_head",
                "Flatten + concat levels, query selection",
                _io("class scores per token"),
            ),
            Probe(
                r"enc_bbox_head",
                "Flatten + concat levels, query selection",
                _io("box per token (MLP + anchor)"),
            ),
            Probe(
                r"denoising_class_embed",
                "Denoising queries (contrastive)",
                _io("noised GT labels -> embeddings"),
            ),
            _cross_probe(lambda c, t: []),
            *DEFORMABLE_PROBES,
            *DECODER_PROBES,
            Probe(
                r"(decoder\.box_heads|dec_bbox_heads)\.\d+",
                "Decoder layer {layer}",
                _box_refine,
                layer="context",
            ),
            Probe(
                r"dec_score_heads\.(?P<layer>\d+)",
                "Heads (one per decoder layer)",
                _head("class head {layer}"),
            ),
        ],
    ),
}


# -- attention maps of dense / conditional cross-attention ---------------------------------------


@torch.no_grad()
def cross_attention_weights(call: Call) -> Tensor:
    """``[B, heads, Q, S]`` weights of a recorded DETR / DN-DETR cross-attention call.

    The modules compute attention without returning weights (``need_weights=False`` /
    scaled_dot_product_attention), so the weights are recomputed from the recorded inputs with
    the module's own projections. ``tests/test_explain.py`` checks that weights x
    values reproduce the module's recorded output.
    """
    module = call.module
    query, query_pos, memory = call.args[:3]
    cross_pos = call.args[4] if len(call.args) > 4 else call.kwargs.get("cross_pos")
    if isinstance(module, DenseCrossAttention):
        q = query if query_pos is None else query + query_pos
        k = memory.value if memory.pos is None else memory.value + memory.pos
        _, weights = module.attn(
            q,
            k,
            memory.value,
            key_padding_mask=memory.padding_mask,
            need_weights=True,
            average_attn_weights=False,
        )
        return weights
    if isinstance(module, ConditionalCrossAttention):
        h = module.nhead
        q = module.q_content(query)
        k = module.k_content(memory.value)
        k_pos = module.k_pos(memory.pos)
        if module.q_pos is not None:
            q = q + module.q_pos(query_pos)
            k = k + k_pos

        def heads(x: Tensor) -> Tensor:
            return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

        q = torch.cat([heads(q), heads(module.q_sine(cross_pos))], -1)
        k = torch.cat([heads(k), heads(k_pos)], -1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if memory.padding_mask is not None:
            logits = logits.masked_fill(memory.padding_mask[:, None, None, :], float("-inf"))
        return logits.softmax(-1)
    raise TypeError(f"{call.name}: no dense attention map for {type(module).__name__}")


# -- running -------------------------------------------------------------------------------------


def variant_of(net: nn.Module) -> Variant:
    """The description of ``net``'s class; a new variant adds an entry to ``VARIANTS``."""
    name = type(net).__name__
    if name not in VARIANTS:
        raise ValueError(
            f"explain has no description of {name}; add one to detr_lineage.explain.VARIANTS "
            f"(known: {', '.join(sorted(VARIANTS))})"
        )
    return VARIANTS[name]


def _set_denoising_mode(net: nn.Module) -> None:
    """Training-mode graph (denoising queries exist only in training) without its randomness:
    dropout off and BatchNorm on its running statistics, so one forward changes nothing."""
    net.train()
    for module in net.modules():
        if isinstance(module, (nn.Dropout, nn.modules.batchnorm._BatchNorm)):
            module.eval()


@torch.no_grad()
def trace_forward(
    net: nn.Module,
    image: Tensor,
    targets: list[dict] | None = None,
    denoising: bool = False,
) -> Trace:
    """One forward of ``net`` on ``image [3,H,W]`` (or ``[B,3,H,W]``) with every probe hooked.

    ``denoising=True`` runs the training graph (needs ``targets`` and ``net.denoising``) with
    dropout and BatchNorm updates off; otherwise the eval graph. The network's mode is restored.
    """
    variant = variant_of(net)
    images = image[None] if image.dim() == 3 else image
    if denoising and getattr(net, "denoising", None) is None:
        raise ValueError(
            f"{type(net).__name__} has no denoising configured (denoising: null); "
            "use --denoising off or a config with a denoising section"
        )
    if denoising and not targets:
        raise ValueError("denoising queries are made from ground-truth targets; none were given")
    was_training = net.training
    recorder = Recorder(net, variant.probes)
    try:
        if denoising:
            _set_denoising_mode(net)
        else:
            net.eval()
        masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        outputs = net(images, masks.to(images.device), targets if denoising else None)
    finally:
        recorder.remove()
        net.train(was_training)
    meta = outputs.get("dn_meta")
    return Trace(
        variant.title,
        images[0].detach().cpu(),
        recorder.calls,
        _detach({k: v for k, v in outputs.items() if k != "dn_meta"}),
        denoising=0 if meta is None else int(meta.num_queries),
        num_groups=0 if meta is None else int(meta.num_groups),
        slots_per_group=0 if meta is None else int(meta.slots_per_group),
        softmax=variant.softmax,
    )


@dataclass
class Section:
    title: str
    lines: list[tuple[str, str]]


def sections(trace: Trace) -> list[Section]:
    """The recorded calls as titled sections, in the order the network ran them."""
    out: list[Section] = []
    for probe, call in trace.calls:
        if call.output is None:  # the module raised or never returned
            continue
        lines = probe.describe(call, trace)
        if not lines:
            continue
        title = probe.stage.format(layer=call.layer)
        if not out or out[-1].title != title:
            out.append(Section(title, []))
        out[-1].lines.extend(lines)
    out.append(Section("Outputs", _outputs(trace)))
    return out


def overview(trace: Trace) -> list[tuple[str, str]]:
    """One (stage, shape it hands on) pair per section: the pipeline at a glance."""
    out = []
    for sec in sections(trace):
        keys = [text for name, text in sec.lines if name.strip().startswith(HANDS_ON)]
        last_name = sec.lines[-1][0]
        # several levels side by side (backbone maps, per-level projections): all of them
        levels = [t for n, t in sec.lines if "(stride" in n or n == last_name]
        shapes = [keys[0]] if keys else levels
        out.append((sec.title, ", ".join(t.split(" -> ")[-1] for t in shapes)))
    return out


HANDS_ON = ("AIFI", "memory", "decoder input", "FFN", "pred_logits")
"""Lines whose shape is what a section hands on (else its last line's)."""


def header(trace: Trace, source: str) -> list[str]:
    k, d = trace.num_matching, trace.denoising
    img = tuple(trace.image.shape)
    size = f"(B, {img[0]}, {img[1]}, {img[2]})"
    lines = [f"{trace.variant} ({source}): input {size}, B = {trace.batch_size}"]
    if d:
        lines.append(
            f"denoising on: d = {d} queries ({trace.num_groups} groups x "
            f"{trace.slots_per_group} slots) join the K = {k} matching ones, written {k}+{d}"
        )
    else:
        lines.append(f"denoising off: K = {k} queries")
    return lines


def render_text(trace: Trace, source: str, stages: Sequence[str] | None = None) -> str:
    """The explanation as text; ``stages``: only sections whose title starts with one of them."""
    secs = sections(trace)
    if stages is not None:
        secs = [s for s in secs if any(s.title.startswith(p) for p in stages)]
    width = max(len(name) for s in secs for name, _ in s.lines) + 2
    out = header(trace, source)
    for section in secs:
        out.append(f"== {section.title} ==")
        out.extend(f"  {name:<{width}}{text}" for name, text in section.lines)
    return "\n".join(out) + "\n"


def _mermaid_label(text: str) -> str:
    return text.replace('"', "'")


def render_markdown(trace: Trace, source: str) -> str:
    """Markdown: a Mermaid flowchart of the stages (first and last shapes), then every line."""
    secs = sections(trace)
    out = [f"# Tensor flow of {trace.variant}", "", *[f"- {h}" for h in header(trace, source)]]
    out += ["", "```mermaid", "flowchart TD"]
    for i, (title, last) in enumerate(overview(trace)):
        out.append(f'  s{i}["{_mermaid_label(title)}<br/>{_mermaid_label(last)}"]')
        if i:
            out.append(f"  s{i - 1} --> s{i}")
    out += ["```", ""]
    for sec in secs:
        out += [f"## {sec.title}", "", "| step | shapes |", "|---|---|"]
        out += [f"| {name.strip()} | `{text}` |" for name, text in sec.lines]
        out.append("")
    return "\n".join(out)


# -- building the model and its input ------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(paths: Sequence[str | Path]) -> dict:
    """Several YAMLs merged in order (later ones win, as with repeated ``--config``)."""
    config: dict = {}
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"config file not found: {file}")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: expected a mapping at the top level")
        config = _merge(config, loaded)
    if "model" not in config:
        raise ValueError(f"{', '.join(map(str, paths))}: no 'model' section")
    return config


def build_model(config: dict, ckpt_path: str | None = None) -> nn.Module:
    """The config's LightningModule (random init), with the checkpoint's weights if given."""
    from jsonargparse import ArgumentParser

    from .lit import DetectionModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DetectionModule, "model")
    try:
        parsed = parser.parse_object({"model": config["model"]})
    except argparse.ArgumentError as err:  # jsonargparse's message is long; keep its key line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        key = [line for line in lines if "not accepted" in line or "Expected" in line]
        raise ValueError(f"the config's model section does not parse: {(key or lines)[0]}") from err
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    model = instantiate(parsed).model
    if ckpt_path:
        file = Path(ckpt_path)
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint not found: {file}")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if "state_dict" not in state:
            raise ValueError(f"{file}: not a Lightning checkpoint (no 'state_dict')")
        weights, own = state["state_dict"], model.state_dict()
        differ = [k for k in own.keys() ^ weights.keys() if not k.startswith("map_metric")]
        differ += [k for k in own.keys() & weights.keys() if own[k].shape != weights[k].shape]
        if differ:
            raise ValueError(
                f"{file}: does not fit the model of the config ({len(differ)} keys differ in "
                f"name or shape, e.g. {sorted(differ)[:3]})"
            )
        model.load_state_dict(weights, strict=False)
    return model.eval()


def image_size_of(config: dict) -> int:
    """The square input side the config trains at: toy ``image_size``, RT-DETR ``rtdetr_size``."""
    args = (config.get("data") or {}).get("init_args") or {}
    for key in ("image_size", "rtdetr_size"):
        if args.get(key):
            return int(args[key])
    return 640


def toy_image(size: int, index: int = 0, preset: str = "easy") -> tuple[Tensor, dict]:
    """A toy-shapes validation image at ``size`` px and its target (the default input)."""
    from dataclasses import replace

    from .data.toy_shapes import ToyShapesDataset, get_preset

    config = replace(get_preset(preset), image_size=size)
    return ToyShapesDataset(config, "val", index + 1, seed=0)[index]


def read_image(path: str | Path, size: int) -> Tensor:
    """An image file as ``[3,size,size]`` in [0,1] (resized without keeping the aspect ratio)."""
    from torchvision.io import ImageReadMode, decode_image

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image not found: {file}")
    try:
        image = decode_image(str(file), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"{file}: cannot decode the image ({err})") from err
    image = image.float()[None] / 255.0
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True)[0]


def placeholder_targets(n: int) -> dict:
    """``n`` boxes on a grid (label 0): denoising queries for an image without annotations."""
    side = math.ceil(math.sqrt(n))
    centres = [((i % side + 0.5) / side, (i // side + 0.5) / side) for i in range(n)]
    boxes = torch.tensor([[x, y, 0.5 / side, 0.5 / side] for x, y in centres])
    return {"labels": torch.zeros(n, dtype=torch.long), "boxes": boxes}


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="detr-lineage explain",
        description="One forward pass with hooks: the tensor flow of a configured detector, "
        "stage by stage, with the real shapes; optionally figures of where its queries look.",
    )
    parser.add_argument("--config", action="append", required=True, help="YAML (repeatable)")
    parser.add_argument(
        "--ckpt_path", help="checkpoint whose weights to load (default: random init)"
    )
    parser.add_argument("--image", help="image file (default: a toy-shapes image)")
    parser.add_argument("--size", type=int, help="square input side (default: the config's)")
    parser.add_argument(
        "--denoising",
        choices=["on", "off"],
        help="training graph with denoising queries (default: on if the config has denoising)",
    )
    parser.add_argument(
        "--dn_objects",
        type=int,
        default=4,
        help="with --image and denoising on: placeholder ground-truth boxes (default 4)",
    )
    parser.add_argument("--format", choices=["text", "md"], default="text")
    parser.add_argument("--out", help="write the text / Markdown here instead of stdout")
    parser.add_argument("--figures", help="directory for the figures (eval graph, no denoising)")
    parser.add_argument("--query", type=int, help="query for the figures (default: best-scoring)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config)
        model = build_model(config, args.ckpt_path)
        net = model.net
        size = args.size or image_size_of(config)
        if args.image:
            image, target = read_image(args.image, size), placeholder_targets(args.dn_objects)
            source = f"{args.image} at {size} px"
        else:
            image, target = toy_image(size)
            source = f"toy-shapes val image 0 at {size} px"
        has_dn = getattr(net, "denoising", None) is not None
        if args.denoising == "on" and not has_dn:
            raise ValueError(
                f"{', '.join(args.config)}: model.init_args.net.denoising is null (or the variant "
                "has none), so there are no denoising queries to show; use --denoising off"
            )
        denoising = has_dn if args.denoising is None else args.denoising == "on"
        weights = args.ckpt_path or "random init"
        trace = trace_forward(net, image, [target], denoising=denoising)
        what = f"{', '.join(args.config)}; {weights}; {source}"
        text = render_markdown(trace, what) if args.format == "md" else render_text(trace, what)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        if args.figures:
            from .analysis.attention_figures import save_figures

            eval_trace = trace if not denoising else trace_forward(net, image)
            for path in save_figures(eval_trace, args.figures, query=args.query):
                print(f"wrote {path}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"detr-lineage explain: error: {err}")


if __name__ == "__main__":
    main()
