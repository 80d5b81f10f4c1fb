"""Multi-scale deformable attention (mask_former.layers) against a deliberately naive reference:
explicit loops over batch, heads, levels, queries and points, bilinear interpolation by hand.
The sampling runs two ways: ``grid_sample`` (as built, and whenever gradients are on) and the
gathered rows of ``inference_kernels()`` (inference); ``kernels`` runs a test under each."""
import contextlib
import importlib
import math

import pytest
import torch

from mask_former.layers import (
    DeformableTransformerEncoder,
    MSDeformAttn,
    MultiScaleDeformableEncoder,
    flatten_levels,
    inference_kernels,
    ms_deform_attn,
    split_levels,
)

SHAPES = [(5, 7), (3, 4), (1, 1)]  # odd sizes and a single pixel


@pytest.fixture(params=["grid_sample", "gathered"])
def kernels(request):
    """A context to run the sampling in: as built, or the inference kernels (gradients off)."""
    if request.param == "grid_sample":
        return contextlib.nullcontext
    return lambda: _gathered()


@contextlib.contextmanager
def _gathered():
    with torch.no_grad(), inference_kernels():
        yield


def bilinear(level: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample an H x W x D map at pixel coordinates (x, y) (pixel (i, j) is centred at (j, i)):
    the four neighbours, weighted by distance; neighbours outside the map count as zero."""
    h, w, d = level.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(d, dtype=level.dtype)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * level[yy, xx]
    return out


def naive_ms_deform_attn(value, shapes, locations, weights):
    """value B x S x M x D; locations B x Q x M x L x P x 2 (x, y) in [0, 1] of each level, whose
    edges are 0 and 1 (align_corners=False); weights B x Q x M x L x P. Returns B x Q x (M * D)."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for m in range(heads):
            start = 0
            for lvl, (h, w) in enumerate(shapes):
                level = value[b, start:start + h * w, m].reshape(h, w, dim)
                start += h * w
                for q in range(queries):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        out[b, q, m] += weights[b, q, m, lvl, p] * bilinear(level, x, y)
    return out.reshape(batch, queries, heads * dim)


def level_start_index(shapes):
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cumsum(sizes, 0) - sizes


def random_inputs(shapes, batch=2, heads=3, dim=4, queries=5, points=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, generator=g, dtype=dtype)
    # some points fall outside their map, partly or wholly
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * 1.8 - 0.4
    logits = torch.randn(batch, queries, heads, len(shapes) * points, generator=g, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, len(shapes), points)
    return value, locations, weights


def test_matches_naive_reference_fp32(kernels):
    value, locations, weights = random_inputs(SHAPES)
    expected = naive_ms_deform_attn(value, SHAPES, locations, weights)
    for shapes in (torch.tensor(SHAPES), SHAPES):  # tensor or pairs
        with kernels():
            out = ms_deform_attn(value, shapes, level_start_index(SHAPES), locations, weights)
        assert out.dtype == torch.float32 and out.shape == (2, 5, 12)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_matches_naive_reference_at_the_borders(kernels):
    """Points on and around every edge of every level, including the last level (whose clamped
    corners reach past the canvas of the gathered kernel if it had no spare row and column) and
    points far outside."""
    shapes = [(2, 3), (3, 1), (4, 6)]  # the widest level last
    edges = torch.tensor([-3.0, -0.25, 0.0, 0.1, 0.5, 0.9, 1.0, 1.25, 4.0])
    xy = torch.cartesian_prod(edges, edges)  # 81 points
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 3, generator=torch.Generator().manual_seed(3))
    locations = xy.view(1, 81, 1, 1, 1, 2).expand(1, 81, 2, len(shapes), 1, 2).contiguous()
    weights = torch.rand(1, 81, 2, len(shapes), 1, generator=torch.Generator().manual_seed(4))
    expected = naive_ms_deform_attn(value, shapes, locations, weights)
    with kernels():
        out = ms_deform_attn(value, shapes, None, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_pixel_convention(kernels):
    # one level, one head: a point on a pixel centre reads that pixel, a point half a pixel
    # outside the map's edge reads half of the edge pixel, points further out read zero.
    value = torch.arange(1.0, 7.0).view(1, 6, 1, 1)  # 2 x 3 map [[1, 2, 3], [4, 5, 6]]
    xy = [((1 + 0.5) / 3, (1 + 0.5) / 2), (0.5 / 3, 0.5 / 2), (0.0, 0.5 / 2), (-0.5 / 3, 0.5 / 2), (1.5, 0.5)]
    locations = torch.tensor(xy).view(1, len(xy), 1, 1, 1, 2)
    weights = torch.ones(1, len(xy), 1, 1, 1)
    with kernels():
        out = ms_deform_attn(value, [(2, 3)], None, locations, weights).flatten()
    torch.testing.assert_close(out, torch.tensor([5.0, 1.0, 0.5, 0.0, 0.0]))


def test_gathered_kernel_on_canvases_beyond_int32(monkeypatch):
    """The int64 gather indices that very large inputs take, forced here on small ones by lowering
    the limit: the same results, from one gather (through the functional op and the module)."""
    msda = importlib.import_module("mask_former.layers.ms_deform_attn")  # the module, not the function
    value, locations, weights = random_inputs(SHAPES)
    expected = naive_ms_deform_attn(value, SHAPES, locations, weights)
    gathered = []
    embedding_bag = msda.F.embedding_bag

    def recording_embedding_bag(index, *args, **kwargs):
        gathered.append(index.dtype)
        return embedding_bag(index, *args, **kwargs)

    monkeypatch.setattr(msda.F, "embedding_bag", recording_embedding_bag)
    with torch.no_grad(), inference_kernels():
        ms_deform_attn(value, SHAPES, None, locations, weights)
        monkeypatch.setattr(msda, "_INT32_INDICES", 4)
        out = ms_deform_attn(value, SHAPES, None, locations, weights)
    assert gathered == [torch.int32, torch.int64]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# 2 images x 3 heads x 4 corners x 3 levels x 3 points = 216 samples per query: 1 and 3 queries
@pytest.mark.parametrize("samples_at_a_time", [1, 3 * 2 * 3 * 4 * 3 * 3])
def test_gathered_kernel_in_chunks_of_queries(monkeypatch, samples_at_a_time):
    """The gather takes a few queries at a time on large inputs; forced here to one query and to
    three at a time (the last chunk shorter): the same results as the naive reference."""
    msda = importlib.import_module("mask_former.layers.ms_deform_attn")
    value, locations, weights = random_inputs(SHAPES)  # 5 queries
    expected = naive_ms_deform_attn(value, SHAPES, locations, weights)
    monkeypatch.setattr(msda, "_GATHERED_SAMPLES", samples_at_a_time)
    with torch.no_grad(), inference_kernels():
        out = ms_deform_attn(value, SHAPES, None, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gathered_kernel_edge_cases():
    """No queries, and NaN locations (a diverged model): the same as the modules as built."""
    value, locations, weights = random_inputs(SHAPES)
    with torch.no_grad(), inference_kernels():
        empty = ms_deform_attn(value, SHAPES, None, locations[:, :0], weights[:, :0])
    assert empty.shape == (2, 0, 12)
    locations[0, 1, 2, 0, 1] = float("nan")
    weights[1, 3, 0, 1, 2] = float("nan")
    expected = ms_deform_attn(value, SHAPES, None, locations, weights)
    with torch.no_grad(), inference_kernels():
        out = ms_deform_attn(value, SHAPES, None, locations, weights)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    locations[0, 1, 2, 0, 1] = 0.5  # NaN weights only: gathered, the NaN where it belongs
    expected = ms_deform_attn(value, SHAPES, None, locations, weights)
    with torch.no_grad(), inference_kernels():
        out = ms_deform_attn(value, SHAPES, None, locations, weights)
    assert out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_gathered_kernel_is_used_for_inference_only():
    """Under ``inference_kernels()`` the sampling is gathered (no ``grid_sample``) with gradients
    off, and ``grid_sample`` (differentiable) with them on."""
    value, locations, weights = random_inputs(SHAPES)

    def ops(grad: bool):
        with torch.autograd.set_grad_enabled(grad), inference_kernels(), torch.profiler.profile() as prof:
            ms_deform_attn(value, SHAPES, None, locations, weights)
        return {event.name for event in prof.events()}

    assert "aten::embedding_bag" in ops(False) or "aten::_embedding_bag_forward_only" in ops(False)
    assert "aten::grid_sampler_2d" not in ops(False)
    assert "aten::grid_sampler_2d" in ops(True)


def test_gradcheck_float64():
    shapes = [(3, 4), (2, 1)]
    value, locations, weights = random_inputs(shapes, batch=1, heads=2, dim=2, queries=2, points=2,
                                              dtype=torch.float64, seed=1)
    inputs = tuple(t.clone().requires_grad_() for t in (value, locations, weights))

    def fn(v, loc, w):
        return ms_deform_attn(v, shapes, None, loc, w)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_bfloat16_close_to_float32(kernels):
    value, locations, weights = random_inputs(SHAPES)
    ref = ms_deform_attn(value, SHAPES, None, locations, weights)
    with kernels():
        out = ms_deform_attn(value.bfloat16(), SHAPES, None, locations.bfloat16(), weights.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_rejects_inconsistent_shapes():
    value, locations, weights = random_inputs(SHAPES)
    with pytest.raises(ValueError, match="value has 48 tokens but spatial_shapes"):
        ms_deform_attn(value, [(5, 7), (3, 4)], None, locations, weights)
    with pytest.raises(ValueError, match="attention_weights has shape"):
        ms_deform_attn(value, SHAPES, None, locations, weights[..., :2])


def test_module_initialisation():
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    offsets = attn.sampling_offsets.bias.view(4, 3, 2, 2)
    # head m points along angle 2 pi m / 4, point p at distance p + 1 (max-norm), on every level
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected = directions[:, None, None, :] * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)
    torch.testing.assert_close(offsets, expected.expand(4, 3, 2, 2), atol=1e-6, rtol=0)
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    assert (attn.attention_weights.bias == 0).all() and (attn.value_proj.bias == 0).all()
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MSDeformAttn(d_model=10, n_heads=4)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_naive_reference(ref_dim, kernels):
    torch.manual_seed(0)
    d_model, heads, points, batch, queries = 8, 2, 3, 2, 4
    attn = MSDeformAttn(d_model, n_levels=len(SHAPES), n_heads=heads, n_points=points)
    for p in attn.parameters():  # random weights: locations and weights depend on the query
        torch.nn.init.normal_(p, std=0.5)
    tokens = sum(h * w for h, w in SHAPES)
    query = torch.randn(batch, queries, d_model)
    inputs = torch.randn(batch, tokens, d_model)
    reference = torch.rand(batch, queries, len(SHAPES), ref_dim)
    padding = torch.rand(batch, tokens) < 0.3
    spatial_shapes = torch.tensor(SHAPES)

    with kernels():  # the gathered sampling and the fused linear layers
        out = attn(query, reference, inputs, spatial_shapes, level_start_index(SHAPES), padding)
    assert out.shape == (batch, queries, d_model)

    with torch.no_grad():
        value = attn.value_proj(inputs).masked_fill(padding[..., None], 0.0).view(batch, tokens, heads, -1)
        offsets = attn.sampling_offsets(query).view(batch, queries, heads, len(SHAPES), points, 2)
        weights = attn.attention_weights(query).view(batch, queries, heads, -1).softmax(-1)
        weights = weights.view(batch, queries, heads, len(SHAPES), points)
        locations = torch.empty_like(offsets)
        for lvl, (h, w) in enumerate(SHAPES):
            ref = reference[:, :, None, lvl, None, :]
            if ref_dim == 2:  # offsets in pixels of the level
                locations[:, :, :, lvl] = ref + offsets[:, :, :, lvl] / torch.tensor([w, h])
            else:  # offsets in units of half the box size / n_points
                locations[:, :, :, lvl] = ref[..., :2] + offsets[:, :, :, lvl] * ref[..., 2:] * 0.5 / points
        expected = attn.output_proj(naive_ms_deform_attn(value, SHAPES, locations, weights))
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)

    # bfloat16 module: finite and close to float32
    with kernels():
        out_bf16 = attn.to(torch.bfloat16)(query.bfloat16(), reference, inputs.bfloat16(), spatial_shapes, None,
                                           padding)
    assert out_bf16.dtype == torch.bfloat16 and torch.isfinite(out_bf16).all()
    torch.testing.assert_close(out_bf16.float(), out.detach(), atol=0.2, rtol=0.1)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_gathers_once_and_falls_back_on_nan_queries(ref_dim):
    """In inference the module goes from its offsets straight to pixel coordinates and one gather
    (no ``grid_sample``); a query whose offsets are NaN (a diverged model) sends the call to the
    modules' own computation, whose result it then equals, NaN rows included."""
    torch.manual_seed(0)
    attn = MSDeformAttn(8, n_levels=len(SHAPES), n_heads=2, n_points=3)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    tokens = sum(h * w for h, w in SHAPES)
    query, inputs = torch.randn(2, 4, 8), torch.randn(2, tokens, 8)
    reference = torch.rand(2, 4, len(SHAPES), ref_dim)
    with torch.no_grad(), inference_kernels(), torch.profiler.profile() as prof:
        attn(query, reference, inputs, SHAPES, None)
    names = [event.name for event in prof.events()]
    assert names.count("aten::embedding_bag") == 1  # (which calls _embedding_bag_forward_only)
    assert "aten::grid_sampler_2d" not in names

    query[1, 2, 0] = float("nan")
    with torch.no_grad():
        expected = attn(query, reference, inputs, SHAPES, None)
        with inference_kernels():
            out = attn(query, reference, inputs, SHAPES, None)
    assert out[1, 2].isnan().all() and not out[0].isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_flatten_and_split_levels_round_trip():
    features = [torch.randn(2, 6, h, w) for h, w in SHAPES]
    level_embed = torch.randn(3, 6)
    flat = flatten_levels(features, level_embed=level_embed)
    assert flat.tokens.shape == (2, 48, 6) and flat.shapes == SHAPES
    assert flat.spatial_shapes.tolist() == [list(s) for s in SHAPES]
    assert flat.level_start_index.tolist() == [0, 35, 47]
    assert flat.padding_mask is None and (flat.valid_ratios == 1).all()
    torch.testing.assert_close(flat.pos[:, 35:47], level_embed[1].expand(2, 12, 6))
    for back, feature in zip(split_levels(flat.tokens, flat.spatial_shapes), features):
        assert torch.equal(back, feature)


def test_encoder_reference_points_are_pixel_centres():
    valid_ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 0.5]]])
    ref = DeformableTransformerEncoder.get_reference_points([(4, 2), (2, 1)], valid_ratios)
    assert ref.shape == (2, 10, 2, 2)
    # unpadded image: token (i, j) of a level refers to ((j + 0.5) / W, (i + 0.5) / H) on every level
    torch.testing.assert_close(ref[0, 3], torch.tensor([[0.75, 0.375], [0.75, 0.375]]))
    # padded image: normalized by the token's own level's valid size, scaled to each level's
    torch.testing.assert_close(ref[1, 3], torch.tensor([[0.75 / 0.5 * 0.5, 0.375 / 0.75 * 0.75],
                                                        [0.75 / 0.5 * 0.5, 0.375 / 0.75 * 0.5]]))


def test_encoder_shapes_and_padding_invariance():
    torch.manual_seed(0)
    shapes, valid = [(9, 11), (5, 6), (3, 3)], [(7, 8), (4, 4), (2, 2)]
    d_model = 16
    encoder = MultiScaleDeformableEncoder(num_levels=3, num_layers=2, d_model=d_model, n_heads=4,
                                          n_points=2, d_ffn=32).eval()
    features = [torch.randn(2, d_model, h, w) for h, w in shapes]
    pos = [torch.randn(2, d_model, h, w) for h, w in shapes]
    masks = []
    for (h, w), (vh, vw) in zip(shapes, valid):
        mask = torch.ones(2, h, w, dtype=torch.bool)
        mask[0] = False  # image 0 fills the batch, image 1 is padded at the bottom and right
        mask[1, :vh, :vw] = False
        masks.append(mask)

    with torch.no_grad():
        encoded, memory = encoder(features, masks, pos)
        perturbed = [f.masked_fill(m[:, None], 0.0) + 100.0 * m[:, None] for f, m in zip(features, masks)]
        encoded_perturbed, _ = encoder(perturbed, masks, pos)
    assert [tuple(e.shape) for e in encoded] == [(2, d_model, h, w) for h, w in shapes]
    assert memory.tokens.shape == (2, 99 + 30 + 9, d_model) and memory.padding_mask.shape == (2, 138)
    torch.testing.assert_close(memory.valid_ratios[1], torch.tensor([[8 / 11, 7 / 9], [4 / 6, 4 / 5], [2 / 3, 2 / 3]]))
    for out, out_perturbed, mask in zip(encoded, encoded_perturbed, masks):
        valid_mask = ~mask[:, None].expand_as(out)
        torch.testing.assert_close(out[valid_mask], out_perturbed[valid_mask], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[~valid_mask], out_perturbed[~valid_mask])
