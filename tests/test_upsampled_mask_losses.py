"""The full-resolution mask losses tile by tile: the tiles' upsampling against F.interpolate and
hand-computed weights, the per-mask pixel sums against each loss, and the tiled losses and
gradients against the whole-image computation and the hand-computed criterion losses."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from mask_former.modeling import upsampled_mask_losses as tiled_module
from mask_former.modeling.criterion import SetCriterion, stacked_target_masks
from mask_former.modeling.mask_losses import MASK_LOSSES, MaskLossType
from mask_former.modeling.upsampled_mask_losses import (
    tiled_upsampled_mask_losses,
    tiled_upsampled_mask_losses_enabled,
    tiling_supported,
    upsampled_mask_losses,
    upsampled_tile,
    upsampling_weights,
)
from model_utils import tiny_cfg
from test_criterion import ALL_MASK_LOSSES, FixedMatcher, as_lists, assert_losses, random_targets, reference_losses
from test_model import make_batch


def whole_upsampling(masks, factor):
    return F.interpolate(masks[:, None], scale_factor=factor, mode="bilinear", align_corners=False)[:, 0]


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
@pytest.mark.parametrize("low_size", [(1, 3), (2, 2), (5, 7), (16, 9)])
def test_tiles_are_the_rows_of_the_whole_upsampling(factor, low_size):
    # the same source coordinates and weights: equal to float rounding (PyTorch's kernel may
    # order its arithmetic differently for different sizes; for factor 4 it was bitwise)
    generator = torch.Generator().manual_seed(factor)
    masks = torch.randn(3, *low_size, generator=generator) * 5
    whole = whole_upsampling(masks, factor)
    height = low_size[0]
    for start in range(height):
        for stop in range(start + 1, height + 1):
            tile = upsampled_tile(masks, start, stop, factor, low_size[1] * factor)
            torch.testing.assert_close(tile, whole[:, start * factor : stop * factor], rtol=1e-6, atol=1e-6)


def test_upsampling_weights_by_hand():
    # factor 2, align_corners=False: output 2k reads 0.25 x[k-1] + 0.75 x[k], output 2k+1 reads
    # 0.75 x[k] + 0.25 x[k+1], the indices clamped at the edges
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.75, 0.25, 0.0],
            [0.25, 0.75, 0.0],
            [0.0, 0.75, 0.25],
            [0.0, 0.25, 0.75],
            [0.0, 0.0, 1.0],
        ]
    )
    assert torch.equal(upsampling_weights(3, 6, torch.empty(0)), expected)
    # factor 4: output j reads source (j + 0.5) / 4 - 0.5 (clamped at 0), linearly between its neighbours
    weights = upsampling_weights(3, 12, torch.empty(0))
    for j in range(12):
        source = max((j + 0.5) / 4 - 0.5, 0.0)
        low = int(source)
        high = min(low + 1, 2)
        row = [0.0, 0.0, 0.0]
        row[low] += 1 - (source - low)
        row[high] += source - low
        assert weights[j].tolist() == pytest.approx(row, abs=1e-7), j


@pytest.mark.parametrize("name", ALL_MASK_LOSSES)
def test_pixel_sums_over_any_split_give_the_loss(name):
    kind = MASK_LOSSES[name]
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 50, generator=generator) * 4
    targets = (torch.rand(4, 50, generator=generator) > 0.6).float()
    sums = kind.pixel_sums(inputs[:, :17], targets[:, :17]) + kind.pixel_sums(inputs[:, 17:], targets[:, 17:])
    got = kind.loss_from_sums(sums, 50, 3.0)
    torch.testing.assert_close(got, kind.loss(inputs, targets, 3.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL_MASK_LOSSES)
def test_closed_form_gradients_of_the_pixel_sums_equal_autograd(name):
    kind = MASK_LOSSES[name]
    generator = torch.Generator().manual_seed(2)
    inputs = (torch.randn(4, 60, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    # binary targets and soft ones (padding zeros, bilinear values)
    targets = torch.cat([(torch.rand(2, 60, generator=generator) > 0.5).double(),
                         torch.rand(2, 60, generator=generator, dtype=torch.float64)])
    sums = kind.pixel_sums(inputs, targets)
    coefficients = torch.randn(sums.shape, generator=generator, dtype=torch.float64)
    (expected,) = torch.autograd.grad((sums * coefficients).sum(), inputs)
    got = kind.pixel_sums_grad(inputs.detach(), targets, coefficients)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_mask_loss_type_needs_both_sum_functions():
    kind = MASK_LOSSES["bce"]
    with pytest.raises(ValueError, match="pixel_sums and loss_from_sums"):
        MaskLossType(kind.loss, kind.cost, "loss_x", True, "X_WEIGHT", pixel_sums=kind.pixel_sums)
    with pytest.raises(ValueError, match="pixel_sums_grad needs pixel_sums"):
        MaskLossType(kind.loss, kind.cost, "loss_x", True, "X_WEIGHT", pixel_sums_grad=kind.pixel_sums_grad)


def losses_and_gradient(src, tgt, kinds, tiled):
    src = src.detach().requires_grad_()
    with tiled_upsampled_mask_losses(tiled):
        losses = upsampled_mask_losses(src, tgt, kinds, 2.5)
    weights = torch.arange(1.0, len(losses) + 1)
    (grad,) = torch.autograd.grad(sum(w * loss for w, loss in zip(weights, losses)), src)
    return torch.stack(losses), grad


@pytest.mark.parametrize("names", [("focal", "dice"), ("bce",), ("brier", "dice"), ALL_MASK_LOSSES])
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("tile_values", [64, 1000, 1 << 19])
@pytest.mark.parametrize("closed_form", [True, False])
def test_tiled_losses_and_gradients_equal_the_whole_images(monkeypatch, names, factor, tile_values, closed_form):
    # small tiles: several groups of masks and bands of rows (with a short last band); the backward
    # by the closed-form gradients or by autograd on the pixel sums (a loss without the former)
    monkeypatch.setattr(tiled_module, "TILE_VALUES", tile_values)
    monkeypatch.setattr(tiled_module, "MIN_TILE_ROWS", 2)
    generator = torch.Generator().manual_seed(factor)
    kinds = [MASK_LOSSES[name] for name in names]
    if not closed_form:
        kinds = [dataclasses.replace(kind, pixel_sums_grad=None) for kind in kinds]
    src = torch.randn(5, 9, 6, generator=generator) * 3
    tgt = (torch.rand(5, 9 * factor, 6 * factor, generator=generator) > 0.5).float()
    tiled = []
    monkeypatch.setattr(tiled_module._TiledMaskLosses, "apply", _spy(tiled_module._TiledMaskLosses.apply, tiled))
    losses, grad = losses_and_gradient(src, tgt, kinds, tiled=True)
    assert tiled, "the tiled computation ran"
    expected_losses, expected_grad = losses_and_gradient(src, tgt, kinds, tiled=False)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7 * expected_grad.abs().max().item())


def _spy(function, calls):
    def wrapper(*args):
        calls.append(args)
        return function(*args)

    return wrapper


def test_tiling_needs_a_power_of_two_factor_and_sum_functions(monkeypatch):
    focal = MASK_LOSSES["focal"]
    assert tiling_supported((4, 4), (16, 16), [focal])
    assert tiling_supported((4, 5), (4, 5), [focal])
    assert not tiling_supported((4, 4), (12, 12), [focal])  # factor 3
    assert not tiling_supported((4, 4), (16, 8), [focal])  # not the same along both axes
    assert not tiling_supported((4, 4), (18, 18), [focal])  # not an integer factor
    without_sums = MaskLossType(focal.loss, focal.cost, "loss_x", True, "X_WEIGHT")
    assert not tiling_supported((4, 4), (16, 16), [focal, without_sums])

    calls = []
    monkeypatch.setattr(tiled_module._TiledMaskLosses, "apply", _spy(tiled_module._TiledMaskLosses.apply, calls))
    src, tgt = torch.randn(2, 4, 4), torch.ones(2, 12, 12)
    with tiled_upsampled_mask_losses():
        (loss,) = upsampled_mask_losses(src, tgt, [focal], 1.0)  # factor 3: whole images
    assert not calls
    up = F.interpolate(src[:, None], size=(12, 12), mode="bilinear", align_corners=False).flatten(1)
    torch.testing.assert_close(loss, focal.loss(up, tgt.flatten(1), 1.0))
    # outside the context: whole images too
    upsampled_mask_losses(src, torch.ones(2, 16, 16), [focal], 1.0)
    assert not calls


def test_context_switch_is_scoped():
    assert not tiled_upsampled_mask_losses_enabled()
    with tiled_upsampled_mask_losses():
        assert tiled_upsampled_mask_losses_enabled()
        with tiled_upsampled_mask_losses(False):
            assert not tiled_upsampled_mask_losses_enabled()
        assert tiled_upsampled_mask_losses_enabled()
    assert not tiled_upsampled_mask_losses_enabled()


def test_criterion_tiled_losses_equal_hand_computed_ones(monkeypatch):
    # the criterion's padded targets and 2x upsampled predictions, tile by tile (tiles of one
    # mask by a few rows), against the loop-by-loop reference
    monkeypatch.setattr(tiled_module, "TILE_VALUES", 8)
    monkeypatch.setattr(tiled_module, "MIN_TILE_ROWS", 1)
    generator = torch.Generator().manual_seed(0)
    pred_logits = torch.randn(2, 3, 4, generator=generator)
    pred_masks = (torch.randn(2, 3, 3, 3, generator=generator) * 2).requires_grad_()
    targets = [random_targets(generator, [2], 6, 6), random_targets(generator, [0, 1], 5, 6)]
    indices = [([2], [0]), ([0, 1], [1, 0])]
    criterion = SetCriterion(3, FixedMatcher(indices), 0.1, mask_losses=ALL_MASK_LOSSES)
    calls = []
    monkeypatch.setattr(tiled_module._TiledMaskLosses, "apply", _spy(tiled_module._TiledMaskLosses.apply, calls))
    with tiled_upsampled_mask_losses():
        losses = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)
    assert len(calls) == 1
    expected = reference_losses(
        pred_logits.tolist(), pred_masks.tolist(), as_lists(targets), indices, 0.1,
        ["loss_mask", "loss_bce", "loss_brier", "loss_dice"], num_masks=3,
    )
    assert_losses(losses, expected)
    sum(losses.values()).backward()
    # query 2 of image 1 is unmatched: its mask gets no gradient
    assert pred_masks.grad[1, 2].abs().sum() == 0 and pred_masks.grad[0, 2].abs().sum() > 0


@pytest.mark.parametrize("tiled", [True, False])
def test_targets_read_from_a_table_by_row(monkeypatch, tiled):
    # each pair's target given as a row of a table (rows repeated and out of order) gives the losses
    # and gradients of the same targets copied out
    monkeypatch.setattr(tiled_module, "TILE_VALUES", 200)
    monkeypatch.setattr(tiled_module, "MIN_TILE_ROWS", 2)
    generator = torch.Generator().manual_seed(3)
    kinds = [MASK_LOSSES["focal"], MASK_LOSSES["dice"]]
    table = (torch.rand(4, 16, 12, generator=generator) > 0.5).float()
    rows = torch.tensor([3, 0, 3, 1, 2])
    src = torch.randn(5, 4, 3, generator=generator).requires_grad_()
    with tiled_upsampled_mask_losses(tiled):
        by_row = torch.stack(upsampled_mask_losses(src, table, kinds, 2.0, target_rows=rows))
        copied = torch.stack(upsampled_mask_losses(src, table[rows], kinds, 2.0))
    torch.testing.assert_close(by_row, copied, rtol=1e-6, atol=1e-7)
    (grad_by_row,) = torch.autograd.grad(by_row.sum(), src)
    (grad_copied,) = torch.autograd.grad(copied.sum(), src)
    torch.testing.assert_close(grad_by_row, grad_copied, rtol=1e-6, atol=1e-9)


def test_stacked_target_masks_pads_each_image_like_the_matched_targets():
    first = torch.tensor([[[1, 0, 1], [0, 1, 1]]], dtype=torch.bool)  # 1 x 2 x 3
    second = torch.tensor([[[1, 1], [0, 0], [1, 0]], [[0, 1], [1, 1], [0, 0]]], dtype=torch.bool)  # 2 x 3 x 2
    table, first_rows = stacked_target_masks([{"masks": first}, {"masks": second}], torch.device("cpu"))
    expected = torch.tensor(
        [
            [[1, 0, 1], [0, 1, 1], [0, 0, 0]],
            [[1, 1, 0], [0, 0, 0], [1, 0, 0]],
            [[0, 1, 0], [1, 1, 0], [0, 0, 0]],
        ],
        dtype=torch.float32,
    )
    assert first_rows == [0, 1] and torch.equal(table, expected)
    same_size = [{"masks": torch.ones(2, 4, 4)}, {"masks": torch.zeros(1, 4, 4)}]
    table, first_rows = stacked_target_masks(same_size, torch.device("cpu"))
    assert first_rows == [0, 2] and torch.equal(table, torch.cat([torch.ones(2, 4, 4), torch.zeros(1, 4, 4)]))
    # one image's float32 masks are the table itself
    alone = torch.rand(3, 4, 4)
    table, first_rows = stacked_target_masks([{"masks": alone}], torch.device("cpu"))
    assert table is alone and first_rows == [0]


def test_no_double_backward_through_the_tiles():
    src = torch.randn(2, 4, 4, requires_grad=True)
    tgt = (torch.rand(2, 16, 16) > 0.5).float()
    with tiled_upsampled_mask_losses():
        (loss,) = upsampled_mask_losses(src, tgt, [MASK_LOSSES["dice"]], 1.0)
    (grad,) = torch.autograd.grad(loss, src, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


@pytest.mark.parametrize("optimize_training", [True, False])
def test_maskformer_training_tiles_its_losses_only_when_optimized(monkeypatch, optimize_training):
    # images of two sizes (padded targets); the tiled losses equal the whole-image ones
    calls = []
    monkeypatch.setattr(tiled_module._TiledMaskLosses, "apply", _spy(tiled_module._TiledMaskLosses.apply, calls))
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    model.optimize_training = optimize_training
    torch.manual_seed(1)
    losses = model(make_batch())
    # one call per decoder layer (the final one and its auxiliary one)
    assert len(calls) == (2 if optimize_training else 0)
    if optimize_training:
        with tiled_upsampled_mask_losses(False):
            torch.manual_seed(1)
            criterion_inputs = []
            hook = model.criterion.register_forward_pre_hook(lambda module, args: criterion_inputs.append(args))
            model(make_batch())
            hook.remove()
        with tiled_upsampled_mask_losses(False):
            whole = model.criterion(*criterion_inputs[0])
        for key in ("loss_mask", "loss_dice"):
            assert losses[key].item() == pytest.approx(whole[key].item() * model.loss_weights[key], rel=1e-5)


def test_tiles_cover_every_mask_and_row_once_and_are_larger_off_the_cpu():
    assert tiled_module.tile_values(torch.device("cpu")) == tiled_module.TILE_VALUES
    assert tiled_module.tile_values(torch.device("cuda")) == tiled_module.TILE_VALUES_ACCELERATOR
    # COCO-sized: 100 masks of 256 x 256 logits upsampled 4x
    for values in (tiled_module.TILE_VALUES, tiled_module.TILE_VALUES_ACCELERATOR):
        covered = torch.zeros(100, 256, dtype=torch.int64)
        tiles = list(tiled_module._tiles(100, 256, 4, 1024, values))
        for masks, start, stop in tiles:
            covered[masks, start:stop] += 1
        assert torch.equal(covered, torch.ones_like(covered))
        if values == tiled_module.TILE_VALUES_ACCELERATOR:
            assert len(tiles) <= 16  # few kernel launches per layer off the CPU


def test_bad_shapes_name_themselves():
    dice = [MASK_LOSSES["dice"]]
    src = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match=r"N x h x w logits .* got shapes \(2, 16\) and \(2, 16, 16\)"):
        upsampled_mask_losses(src.flatten(1), torch.ones(2, 16, 16), dice, 1.0)
    with pytest.raises(ValueError, match="2 predicted masks but 3 targets"):
        upsampled_mask_losses(src, torch.ones(3, 16, 16), dice, 1.0)
    with pytest.raises(ValueError, match=r"one row per predicted mask \(2\), got shape \(3,\)"):
        upsampled_mask_losses(src, torch.ones(3, 16, 16), dice, 1.0, target_rows=torch.tensor([0, 1, 2]))
    with tiled_upsampled_mask_losses(), pytest.raises(ValueError, match=r"in \[0, 3\).* got 1 to 3"):
        upsampled_mask_losses(src, torch.ones(3, 16, 16), dice, 1.0, target_rows=torch.tensor([3, 1]))
