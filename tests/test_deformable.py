"""Multi-scale deformable attention against an independent loop-based reference."""

from __future__ import annotations

import math

import pytest
import torch

from detr_lineage.nn.deformable import MSDeformableAttention, ms_deform_attn

# non-square levels, unequal points per level (level 0's points first)
SHAPES = [(5, 7), (3, 4), (2, 3)]
NUM_POINTS = [4, 2, 3]
S = sum(h * w for h, w in SHAPES)
P = sum(NUM_POINTS)


def naive_ms_deform_attn(value, shapes, locations, weights, num_points, method):
    """Float64 loops: bilinear (align_corners=False, zeros outside) or official discrete rule."""
    value, locations, weights = value.double(), locations.double(), weights.double()
    b_size, q_size, n_heads, _ = weights.shape
    dh = value.shape[-1]
    out = torch.zeros(b_size, q_size, n_heads, dh, dtype=torch.float64)
    levels, starts, start = [], [], 0
    for lvl, ((h, w), n) in enumerate(zip(shapes, num_points)):
        levels += [lvl] * n
        starts.append(start)
        start += h * w

    def pixel(b, lvl, y, x, head):  # zero outside the map
        h, w = shapes[lvl]
        if 0 <= x < w and 0 <= y < h:
            return value[b, starts[lvl] + y * w + x, head]
        return torch.zeros(dh, dtype=torch.float64)

    for b in range(b_size):
        for q in range(q_size):
            for head in range(n_heads):
                for k, lvl in enumerate(levels):
                    h, w = shapes[lvl]
                    lx, ly = locations[b, q, head, k].tolist()
                    if method == "discrete":
                        x = min(max(math.floor(lx * w + 0.5), 0), w - 1)
                        y = min(max(math.floor(ly * h + 0.5), 0), h - 1)
                        sample = pixel(b, lvl, y, x, head)
                    else:  # pixel centres at (i + 0.5) / size
                        px, py = lx * w - 0.5, ly * h - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        sample = (
                            (1 - fx) * (1 - fy) * pixel(b, lvl, y0, x0, head)
                            + fx * (1 - fy) * pixel(b, lvl, y0, x0 + 1, head)
                            + (1 - fx) * fy * pixel(b, lvl, y0 + 1, x0, head)
                            + fx * fy * pixel(b, lvl, y0 + 1, x0 + 1, head)
                        )
                    out[b, q, head] += weights[b, q, head, k] * sample
    return out.reshape(b_size, q_size, n_heads * dh)


def random_inputs(b=2, q=5, heads=2, dh=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(b, S, heads, dh, generator=g, dtype=dtype)
    # some points fall outside the map to exercise the padding / clamping
    locations = torch.rand(b, q, heads, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.randn(b, q, heads, P, generator=g, dtype=dtype).softmax(-1)
    return value, locations, weights


def heads_major(value):
    """Same logical [B,S,H,Dh] tensor stored as [B,H,Dh,S] (the layout the module produces)."""
    return value.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["tokens", "heads_major"])
def test_matches_naive_reference(method, dtype, layout):
    value, locations, weights = random_inputs(dtype=dtype)
    expected = naive_ms_deform_attn(value, SHAPES, locations, weights, NUM_POINTS, method)
    if layout == "heads_major":
        value = heads_major(value)
    out = ms_deform_attn(value, SHAPES, locations, weights, NUM_POINTS, method=method)
    assert out.shape == (2, 5, 2 * 3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_spatial_shapes_as_tensor():
    value, locations, weights = random_inputs()
    as_list = ms_deform_attn(value, SHAPES, locations, weights, NUM_POINTS)
    as_tensor = ms_deform_attn(value, torch.tensor(SHAPES), locations, weights, NUM_POINTS)
    torch.testing.assert_close(as_list, as_tensor, atol=0, rtol=0)


def test_discrete_rounding_rule():
    """Official rule int(loc*size + 0.5): index 1 of a 4-wide map covers loc*4 in [0.5, 1.5)."""
    value = torch.arange(4.0).view(1, 4, 1, 1)  # one 1x4 level, token value = x index
    xs = torch.tensor([0.0, 0.12, 0.13, 0.37, 0.38, 0.99, 1.3, -0.5])
    locations = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, 8, 1, 1, 2)
    weights = torch.ones(1, 8, 1, 1)
    out = ms_deform_attn(value, [(1, 4)], locations, weights, [1], method="discrete")
    assert out.flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 0.0]


def test_gradcheck_default():
    shapes, num_points = [(3, 4), (2, 2)], [2, 1]
    s = sum(h * w for h, w in shapes)
    g = torch.Generator().manual_seed(1)
    value = torch.randn(1, s, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    locations = torch.rand(1, 3, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    locations.requires_grad_()
    weights = torch.rand(1, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(v, loc, w):
        return ms_deform_attn(v, shapes, loc, w, num_points)

    assert torch.autograd.gradcheck(fn, (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: fn(heads_major(v), loc, w), (value, locations, weights)
    )


def test_discrete_has_no_location_gradient_but_value_gradient():
    value, locations, weights = random_inputs()
    value.requires_grad_()
    weights.requires_grad_()
    locations.requires_grad_()
    out = ms_deform_attn(value, SHAPES, locations, weights, NUM_POINTS, method="discrete")
    out.sum().backward()
    assert locations.grad is None
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_rejects_inconsistent_inputs():
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="num_points"):
        ms_deform_attn(value, SHAPES, locations, weights, [4, 4, 4])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, [(5, 7), (3, 4), (2, 2)], locations, weights, NUM_POINTS)
    with pytest.raises(ValueError, match="method"):
        ms_deform_attn(value, SHAPES, locations, weights, NUM_POINTS, method="nearest")


# ---------------------------------------------------------------------------- module


def make_module(method="default", d=16, heads=2, seed=0):
    torch.manual_seed(seed)
    m = MSDeformableAttention(d, heads, n_levels=3, n_points=NUM_POINTS, method=method)
    # leave the zero init so offsets and attention weights depend on the query
    for lin in (m.sampling_offsets, m.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.1)
    return m


def module_inputs(b=2, q=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, q, d, generator=g)
    boxes = torch.cat(
        [torch.rand(b, q, 2, generator=g), 0.1 + 0.3 * torch.rand(b, q, 2, generator=g)], -1
    )
    value = torch.randn(b, S, d, generator=g)
    return query, boxes, value


def expected_module_output(m, query, locations, value, mask=None):
    """The module written out: projections, joint softmax, the functional core."""
    b, q, d = query.shape
    v = m.value_proj(value)
    if mask is not None:
        v = v.masked_fill(mask[..., None], 0.0)
    v = v.view(b, S, m.n_heads, d // m.n_heads)
    attn = m.attention_weights(query).view(b, q, m.n_heads, P).softmax(-1)
    return m.output_proj(ms_deform_attn(v, SHAPES, locations, attn, NUM_POINTS, m.method))


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_module_shape_and_box_reference_rule(method):
    m = make_module(method)
    query, boxes, value = module_inputs()
    out = m(query, boxes, value, SHAPES)
    assert out.shape == query.shape
    offsets = m.sampling_offsets(query).view(2, 6, 2, P, 2)
    per_point = torch.tensor([1 / n for n in NUM_POINTS for _ in range(n)])[:, None]  # [P,1]
    locations = (
        boxes[:, :, None, None, :2] + offsets * per_point * boxes[:, :, None, None, 2:] * 0.5
    )
    torch.testing.assert_close(out, expected_module_output(m, query, locations, value))
    # the official [B,Q,1,4] layout of reference boxes gives the same result
    torch.testing.assert_close(m(query, boxes[:, :, None], value, SHAPES), out)


def test_module_point_reference_rule():
    m = make_module()
    query, boxes, value = module_inputs()
    points = boxes[..., :2]
    out = m(query, points, value, torch.tensor(SHAPES))
    offsets = m.sampling_offsets(query).view(2, 6, 2, P, 2)
    wh = torch.tensor([(w, h) for (h, w), n in zip(SHAPES, NUM_POINTS) for _ in range(n)])
    locations = points[:, :, None, None, :] + offsets / wh
    torch.testing.assert_close(out, expected_module_output(m, query, locations, value))
    # per-level reference points [B,Q,L,2]: each point uses its own level's reference
    per_level = torch.stack([points, points.flip(-1), 1 - points], 2)  # [B,Q,L,2]
    out = m(query, per_level, value, SHAPES)
    level = torch.tensor([lvl for lvl, n in enumerate(NUM_POINTS) for _ in range(n)])
    locations = per_level[:, :, None, level] + offsets / wh
    torch.testing.assert_close(out, expected_module_output(m, query, locations, value))


def test_zero_size_boxes_equal_points_without_offsets():
    """A box of zero size ignores the offsets: same as a point with zero offsets."""
    m = make_module()
    query, boxes, value = module_inputs()
    flat = boxes.clone()
    flat[..., 2:] = 0
    out_boxes = m(query, flat, value, SHAPES)
    with torch.no_grad():
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.zero_()
    torch.testing.assert_close(m(query, boxes[..., :2], value, SHAPES), out_boxes)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_padding_mask_removes_padded_values(method):
    m = make_module(method)
    query, boxes, value = module_inputs()
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[0, 20:35] = True  # last 15 tokens of level 0 of image 0
    mask[1, 40:] = True  # levels 1-2 of image 1
    out = m(query, boxes, value, SHAPES, mask)
    changed = value.clone()
    changed[mask] = 100.0 * torch.randn(int(mask.sum()), 16)
    torch.testing.assert_close(m(query, boxes, changed, SHAPES, mask), out)
    assert not torch.allclose(m(query, boxes, changed, SHAPES), out)
    torch.testing.assert_close(
        out, expected_module_output(m, query, _locations(m, query, boxes), value, mask)
    )


def _locations(m, query, boxes):
    offsets = m.sampling_offsets(query).view(*query.shape[:2], m.n_heads, P, 2)
    return m._sampling_locations(boxes, offsets, SHAPES)


def test_module_backward_reaches_inputs():
    m = make_module()
    query, boxes, value = module_inputs()
    query.requires_grad_()
    value.requires_grad_()
    m(query, boxes, value, SHAPES).square().sum().backward()
    assert value.grad is not None and value.grad.abs().sum() > 0
    assert query.grad is not None and query.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_discrete_freezes_sampling_offsets():
    m = make_module("discrete")
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {"sampling_offsets.weight", "sampling_offsets.bias"}
    query, boxes, value = module_inputs()
    m(query, boxes, value, SHAPES).sum().backward()
    assert m.value_proj.weight.grad is not None and m.attention_weights.weight.grad is not None
    assert all(p.requires_grad for p in make_module("default").parameters())


def test_official_initialisation():
    m = MSDeformableAttention(256, 8, 3, [4, 2, 3])
    assert m.sampling_offsets.weight.abs().sum() == 0
    assert m.attention_weights.weight.abs().sum() == 0 and m.attention_weights.bias.abs().sum() == 0
    assert m.value_proj.bias.abs().sum() == 0 and m.output_proj.bias.abs().sum() == 0
    bias = m.sampling_offsets.bias.view(8, 9, 2)
    # head 0 points along +x, head 2 along +y, head 1 on the diagonal; k-th point of a level at k
    torch.testing.assert_close(bias[0, :, 0], torch.tensor([1.0, 2, 3, 4, 1, 2, 1, 2, 3]))
    torch.testing.assert_close(bias[0, :, 1], torch.zeros(9), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        bias[2, :4], torch.tensor([[0.0, 1], [0, 2], [0, 3], [0, 4]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(bias[1, 5], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(
        m.num_points_scale, torch.tensor([0.25] * 4 + [0.5] * 2 + [1 / 3] * 3)
    )
    assert "num_points_scale" in m.state_dict() and "point_level" not in m.state_dict()
