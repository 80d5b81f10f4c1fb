"""``layers.BilinearPoints``: bilinear samples gathered at points, against ``grid_sample`` (what
detectron2's ``point_sample`` runs) and against values worked out by hand."""
import pytest
import torch
import torch.nn.functional as F

import mask_former.layers.point_sampling as point_sampling
from mask_former.layers.point_sampling import BilinearPoints, interleaved_rows, raster_order


def grid_sample_points(maps, coords):
    """detectron2's point_sample(maps, coords, align_corners=False, padding_mode="border")."""
    grid = 2 * coords[:, :, None] - 1  # B x P x 1 x 2 in [-1, 1]
    return F.grid_sample(maps.float(), grid, align_corners=False, padding_mode="border")[..., 0]


def edge_coords(num_images, height, width, generator):
    """Random points plus the corners, the border pixel centres and points half a pixel around
    them, where the border clamp and the weight-0 corners matter."""
    xs = torch.tensor([0.0, 0.5 / width, 1 / width, 1 - 0.5 / width, 1 - 0.25 / width, 1.0, 0.5])
    ys = torch.tensor([0.0, 0.5 / height, 0.75 / height, 1 - 0.5 / height, 1.0, 0.5, 1 / height])
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), dim=-1).view(-1, 2)
    random = torch.rand(num_images, 50, 2, generator=generator)
    return torch.cat([grid.expand(num_images, -1, -1), random], dim=1)


@pytest.mark.parametrize("size", [(5, 7), (1, 4), (3, 1), (1, 1), (16, 16)])
def test_equals_grid_sample(size):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 6, *size, generator=generator)
    coords = edge_coords(3, *size, generator)
    samples = BilinearPoints(coords, *size).sample(maps)
    assert samples.shape == (3, 6, coords.shape[1]) and samples.dtype == torch.float32
    torch.testing.assert_close(samples, grid_sample_points(maps, coords), rtol=1e-6, atol=1e-6)


def test_values_by_hand():
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]  # 1 x 1 x 2 x 2
    # pixel centres at 1/4 and 3/4; beyond them the border pixel is read
    coords = torch.tensor([[[0.5, 0.5], [0.25, 0.25], [0.75, 0.25], [0.0, 0.0], [1.0, 1.0], [0.5, 0.25],
                            [0.25, 0.5], [0.625, 0.75]]])
    expected = [2.5, 1.0, 2.0, 1.0, 4.0, 1.5, 2.0, 3.0 + 0.75]
    samples = BilinearPoints(coords, 2, 2).sample(maps)
    assert samples[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_any_number_of_maps_dtypes_and_layouts():
    generator = torch.Generator().manual_seed(1)
    coords = torch.rand(2, 30, 2, generator=generator)
    points = BilinearPoints(coords, 8, 9)
    for channels in (1, 4, 11):
        maps = torch.randn(2, channels, 8, 9, generator=generator)
        torch.testing.assert_close(points.sample(maps), grid_sample_points(maps, coords), rtol=1e-6, atol=1e-6)
    half = torch.randn(2, 3, 8, 9, generator=generator).bfloat16()
    samples = points.sample(half)  # read in float32
    assert samples.dtype == torch.float32
    torch.testing.assert_close(samples, grid_sample_points(half.float(), coords), rtol=1e-6, atol=1e-6)
    # strided maps read the same: some of the channels of contiguous maps (copied pixel-major),
    # channels-last maps (read in place) and some of their channels (channels innermost, rows
    # longer than the channels: the layout of the training path's mask logits)
    maps = torch.randn(2, 10, 8, 9, generator=generator)
    channels_last = maps.contiguous(memory_format=torch.channels_last)
    assert points.pixel_table(channels_last).data_ptr() == channels_last.data_ptr()
    for strided in (maps[:, 3:7], channels_last, channels_last[:, 3:7]):
        torch.testing.assert_close(points.sample(strided), grid_sample_points(strided.contiguous(), coords),
                                   rtol=1e-6, atol=1e-6)


@pytest.fixture(params=["int32", "int64"])
def index_dtype(request, monkeypatch):
    """Runs a test with int32 indices and again with int64 ones (their limit lowered to 1)."""
    if request.param == "int64":
        monkeypatch.setattr(point_sampling, "_INT32_INDICES", 1)
    return request.param


def test_nan_coordinates_give_nan_samples(index_dtype):
    # the other points are unaffected, and the NaN point reads valid pixels (no index error), with
    # int32 and int64 indices
    generator = torch.Generator().manual_seed(3)
    coords = torch.rand(2, 6, 2, generator=generator)
    coords[0, 2, 0] = float("nan")
    coords[1, 4, 1] = float("nan")
    maps = torch.randn(2, 3, 5, 7, generator=generator)
    points = BilinearPoints(coords, 5, 7)
    assert str(points.indices.dtype) == f"torch.{index_dtype}"
    assert 0 <= int(points.indices.min()) and int(points.indices.max()) < 2 * 5 * 7
    samples = points.sample(maps)
    assert samples[0, :, 2].isnan().all() and samples[1, :, 4].isnan().all()
    finite = torch.ones(2, 6, dtype=torch.bool)
    finite[0, 2] = finite[1, 4] = False
    expected = grid_sample_points(maps, coords.nan_to_num(0.5))
    torch.testing.assert_close(samples.transpose(1, 2)[finite], expected.transpose(1, 2)[finite], rtol=1e-6, atol=1e-6)


def test_empty_maps_and_points():
    points = BilinearPoints(torch.rand(2, 5, 2), 4, 4)
    assert points.sample(torch.randn(2, 0, 4, 4)).shape == (2, 0, 5)
    assert BilinearPoints(torch.rand(2, 0, 2), 4, 4).sample(torch.randn(2, 3, 4, 4)).shape == (2, 3, 0)


def test_int64_indices_beyond_int32(monkeypatch):
    # batches with more pixels than int32 counts gather with int64 indices (lowered limit here)
    generator = torch.Generator().manual_seed(2)
    coords = edge_coords(2, 6, 5, generator)
    maps = torch.randn(2, 3, 6, 5, generator=generator)
    assert BilinearPoints(coords, 6, 5).indices.dtype == torch.int32
    monkeypatch.setattr(point_sampling, "_INT32_INDICES", 2 * 6 * 5)
    points = BilinearPoints(coords, 6, 5)
    assert points.indices.dtype == torch.int64
    torch.testing.assert_close(points.sample(maps), grid_sample_points(maps, coords), rtol=1e-6, atol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"coords must be B x P x 2 \(x, y\), got shape \(5, 2\)"):
        BilinearPoints(torch.rand(5, 2), 4, 4)
    with pytest.raises(ValueError, match="positive size, got 0 x 4"):
        BilinearPoints(torch.rand(1, 5, 2), 0, 4)
    points = BilinearPoints(torch.rand(2, 5, 2), 4, 4)
    with pytest.raises(ValueError, match=r"expected maps of shape 2 x C x 4 x 4, got \(2, 3, 4, 5\)"):
        points.sample(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"got \(1, 3, 4, 4\)"):
        points.sample(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"got \(16,\)"):
        points.sample(torch.randn(16))


def test_ranges_of_points_read_from_one_table_equal_all_points():
    generator = torch.Generator().manual_seed(9)
    maps = torch.randn(2, 4, 6, 7, generator=generator)
    points = BilinearPoints(torch.rand(2, 11, 2, generator=generator), 6, 7)
    # planar maps: a contiguous copy, pixel-major
    table = points.pixel_table(maps)
    assert table.is_contiguous() and table.shape == (2 * 6 * 7, 4)
    torch.testing.assert_close(table.view(2, 6, 7, 4), maps.permute(0, 2, 3, 1), rtol=0, atol=0)
    whole = points.sample(maps)
    parts = [points.sample_table(table, start, min(start + 4, 11)) for start in range(0, 11, 4)]
    assert [part.shape for part in parts] == [(2, 4, 4), (2, 4, 4), (2, 4, 3)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, rtol=0, atol=0)
    assert points.sample_table(table, 5, 5).shape == (2, 4, 0)
    # channels-last float32 maps are read in place
    channels_last = torch.randn(2, 4, 6, 7).contiguous(memory_format=torch.channels_last)
    assert points.pixel_table(channels_last).data_ptr() == channels_last.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_maps_are_read_in_place(dtype):
    # one layer's slice of the logits of all layers is read where it lies, in any dtype
    generator = torch.Generator().manual_seed(4)
    all_layers = torch.randn(2, 6, 7, 3 * 4, generator=generator).to(dtype).permute(0, 3, 1, 2)
    maps = all_layers[:, 4:8]
    coords = torch.cat([edge_coords(2, 6, 7, generator)[:, :5], torch.rand(2, 4, 2, generator=generator)], dim=1)
    points = BilinearPoints(coords, 6, 7)
    table = points.pixel_table(maps)
    assert not table.is_contiguous() and table.dtype == dtype and table.stride() == (12, 1)
    assert table.data_ptr() == maps.data_ptr()
    samples = points.sample_table(table, 0, 9)
    assert samples.dtype == torch.float32
    torch.testing.assert_close(samples, grid_sample_points(maps.float().contiguous(), coords), rtol=1e-6, atol=1e-6)
    parts = [points.sample_table(table, start, min(start + 4, 9)) for start in range(0, 9, 4)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), samples, rtol=0, atol=0)
    # maps with planar channels are copied
    assert points.pixel_table(maps.contiguous()).is_contiguous()


@pytest.mark.parametrize("channels, row_step", [(4, 12), (5, 12), (1, 3)])
def test_strided_float32_tables_are_read_from_their_memory(monkeypatch, index_dtype, channels, row_step):
    """A float32 table whose rows lie a multiple of C apart (4 of 12 channels: a layer's slice of
    3 layers' logits) goes to F.embedding_bag as the rows of the maps' own memory, not a copy; one
    whose rows lie otherwise (5 of 12) is gathered. Both equal grid_sample, with int32 and int64
    indices."""
    calls = []
    embedding_bag = F.embedding_bag

    def recording_embedding_bag(indices, weight, **kwargs):
        calls.append((weight.data_ptr(), weight.is_contiguous(), indices.dtype))
        return embedding_bag(indices, weight, **kwargs)

    monkeypatch.setattr(point_sampling.F, "embedding_bag", recording_embedding_bag)
    generator = torch.Generator().manual_seed(10)
    all_layers = torch.randn(2, 6, 7, row_step, generator=generator).permute(0, 3, 1, 2)
    maps = all_layers[:, row_step - channels:]  # the last layer: its rows end where the memory ends
    coords = edge_coords(2, 6, 7, generator)
    points = BilinearPoints(coords, 6, 7)
    table = points.pixel_table(maps)
    samples = points.sample_table(table, 3, coords.shape[1])
    torch.testing.assert_close(samples, grid_sample_points(maps.contiguous(), coords)[..., 3:], rtol=1e-6, atol=1e-6)
    if row_step % channels == 0:
        expected_dtype = torch.int32 if index_dtype == "int32" else torch.int64
        assert calls == [(maps.data_ptr(), True, expected_dtype)]
    else:
        assert calls == []


def test_any_table_layout_reads_the_same():
    # a table that is not contiguous (its transpose's transpose), read by gathering its rows,
    # equals the contiguous table read by F.embedding_bag
    generator = torch.Generator().manual_seed(6)
    points = BilinearPoints(torch.rand(3, 13, 2, generator=generator), 4, 5)
    contiguous = torch.randn(3 * 4 * 5, 6, generator=generator)
    transposed = contiguous.t().contiguous().t()
    assert not transposed.is_contiguous()
    torch.testing.assert_close(points.sample_table(transposed, 2, 11), points.sample_table(contiguous, 2, 11),
                               rtol=1e-6, atol=1e-6)


def test_selected_images_equal_points_made_from_their_coords(index_dtype):
    generator = torch.Generator().manual_seed(8)
    coords = torch.rand(6, 10, 2, generator=generator)
    points = BilinearPoints(coords, 5, 4)
    for start, stop in [(0, 2), (2, 4), (4, 6), (1, 6), (3, 3)]:
        selected, made = points.select_images(start, stop), BilinearPoints(coords[start:stop], 5, 4)
        assert selected.num_images == made.num_images == stop - start
        assert torch.equal(selected.indices, made.indices) and selected.indices.dtype == points.indices.dtype
        assert str(points.indices.dtype) == f"torch.{index_dtype}"
        assert torch.equal(selected.weights, made.weights)
        maps = torch.randn(stop - start, 3, 5, 4, generator=generator)
        torch.testing.assert_close(selected.sample(maps), grid_sample_points(maps, coords[start:stop]),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected 0 <= start <= stop <= 6, got start=4, stop=7"):
        points.select_images(4, 7)


def test_raster_order_sorts_points_by_pixel_and_keeps_ties_in_order():
    # a 2 x 3 map: pixel (row, column) covers x in [column / 3, (column + 1) / 3), y in [row / 2, ...)
    coords = torch.tensor([[[0.9, 0.9], [0.1, 0.6], [0.5, 0.1], [0.2, 0.3], [1.0, 1.0], [0.0, 0.0],
                            [0.15, 0.2], [0.4, 0.7]]])
    # pixels by hand: 5, 3, 1, 0, 5 (the far corner: the last pixel), 0, 0, 4
    expected = coords[:, [3, 5, 6, 2, 1, 7, 0, 4]]
    assert torch.equal(raster_order(coords, 2, 3), expected)


def test_raster_order_is_a_permutation_per_image_and_samples_the_same():
    generator = torch.Generator().manual_seed(3)
    coords = torch.rand(3, 200, 2, generator=generator)
    ordered = raster_order(coords, 7, 5)
    for image in range(3):  # the same points: sorted lexicographically, equal
        as_drawn = sorted(map(tuple, coords[image].tolist()))
        assert sorted(map(tuple, ordered[image].tolist())) == as_drawn
        pixels = (ordered[image, :, 1] * 7).floor().clamp(0, 6) * 5 + (ordered[image, :, 0] * 5).floor().clamp(0, 4)
        assert bool((pixels[1:] >= pixels[:-1]).all())
    maps = torch.randn(3, 4, 7, 5, generator=generator)
    sums = BilinearPoints(ordered, 7, 5).sample(maps).sum(-1)
    torch.testing.assert_close(sums, grid_sample_points(maps, coords).sum(-1), rtol=1e-5, atol=1e-5)


def layers_side_by_side(num_layers, batch, channels, height, width, generator):
    """num_layers B x C x H x W maps whose pixels hold all layers' channels side by side (the
    training path's mask logits: b x h x w x (L c) memory), as views of that memory."""
    memory = torch.randn(batch, height, width, num_layers, channels, generator=generator)
    return memory, list(memory.permute(3, 0, 4, 1, 2).unbind(0))


def test_interleaved_rows_is_the_memory_of_layers_side_by_side():
    generator = torch.Generator().manual_seed(11)
    memory, layers = layers_side_by_side(3, 2, 4, 5, 6, generator)
    points = BilinearPoints(torch.rand(2, 7, 2, generator=generator), 5, 6)
    tables = [points.pixel_table(maps) for maps in layers]
    rows, slots = interleaved_rows(tables)
    # row (b * H * W + pixel) * L + layer is that layer's row b * H * W + pixel, in place
    assert slots == [0, 1, 2]
    assert rows.shape == (2 * 5 * 6 * 3, 4) and rows.is_contiguous() and rows.data_ptr() == memory.data_ptr()
    for layer, table in enumerate(tables):
        assert torch.equal(rows[layer::3], table)
    # in another order (the criterion's: the last layer first), the same rows and each table's slot
    reordered_rows, reordered_slots = interleaved_rows([tables[2], tables[0], tables[1]])
    assert reordered_slots == [2, 0, 1] and reordered_rows.data_ptr() == memory.data_ptr()
    # not all the tables of one memory: None
    assert interleaved_rows(tables[:2]) is None  # 2 of 3 layers: their rows 3 layers apart
    assert interleaved_rows([tables[0], tables[0], tables[2]]) is None
    assert interleaved_rows([tables[0], tables[1], tables[2].clone()]) is None
    assert interleaved_rows([points.pixel_table(maps.contiguous()) for maps in layers]) is None
    assert interleaved_rows([]) is None


@pytest.mark.parametrize("num_layers, batch, order", [(3, 2, [0, 1, 2]), (3, 2, [2, 0, 1]), (1, 3, [0]),
                                                      (4, 1, [3, 1, 0, 2])])
def test_interleaved_points_read_all_layers_at_once(index_dtype, num_layers, batch, order):
    # the points of L x B images (layer-major, as the matcher draws them) read from the layers'
    # interleaved rows in one call equal each layer's maps read by grid_sample at its own points,
    # the layers taken in any order
    generator = torch.Generator().manual_seed(12)
    _, layers = layers_side_by_side(num_layers, batch, 5, 6, 7, generator)
    layers = [layers[i] for i in order]
    coords = edge_coords(num_layers * batch, 6, 7, generator)
    points = BilinearPoints(coords, 6, 7)
    rows, slots = interleaved_rows([points.select_images(0, batch).pixel_table(maps) for maps in layers])
    assert slots == order
    interleaved = points.interleave(slots)
    assert interleaved.indices.dtype == points.indices.dtype
    assert str(points.indices.dtype) == f"torch.{index_dtype}"
    expected = torch.cat(
        [grid_sample_points(maps, coords[layer * batch : (layer + 1) * batch]) for layer, maps in enumerate(layers)]
    )
    for start, stop in [(0, coords.shape[1]), (5, 31)]:
        torch.testing.assert_close(interleaved.sample_table(rows, start, stop), expected[..., start:stop],
                                   rtol=1e-6, atol=1e-6)
    six_images = BilinearPoints(torch.rand(6, 3, 2, generator=generator), 6, 7)
    for bad in ([0, 1, 2, 3], [0, 0, 1], []):
        with pytest.raises(ValueError, match=r"slots of a number of groups dividing the 6 images"):
            six_images.interleave(bad)


def test_raster_order_and_interleaved_rows_name_bad_shapes():
    with pytest.raises(ValueError, match=r"raster_order: coords must be B x P x 2 \(x, y\), got shape \(4, 2\)"):
        raster_order(torch.rand(4, 2), 3, 3)
    with pytest.raises(ValueError, match=r"raster_order: the map must have a positive size, got 0 x 3"):
        raster_order(torch.rand(1, 4, 2), 0, 3)
    with pytest.raises(ValueError, match=r"interleaved_rows: expected N x C pixel tables, got shape \(2, 3, 4\)"):
        interleaved_rows([torch.zeros(6, 4), torch.zeros(2, 3, 4)])
