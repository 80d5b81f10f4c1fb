"""Tests of the certified pixel owners of the pixel-wise panoptic merge.

Every result is compared with the plain formulation written out here:
``owner = (scores[:, None] * sigmoid(logits[kept]).flatten(1)).argmax(0)`` and
``own_area = (sigmoid(logits[kept]) >= 0.5).flatten(1).sum(1)``.
"""
import pytest
import torch

from mask_former.modeling import pixel_owners
from mask_former.modeling.pixel_owners import MAX_CERTIFIED_QUERIES, certified_pixel_owners
from mask_former.modeling.postprocessing import panoptic_inference
from test_postprocessing import reference_panoptic_inference


def plain_owners_and_areas(logits, kept_index, kept_scores):
    probs = logits[kept_index].sigmoid().flatten(1)
    return (kept_scores[:, None] * probs).argmax(0), (probs >= 0.5).sum(1)


def assert_plain_result(logits, kept_index, kept_scores):
    result = certified_pixel_owners(logits, kept_index, kept_scores)
    assert result is not None
    owner, own_area = result
    expected_owner, expected_area = plain_owners_and_areas(logits, kept_index, kept_scores)
    assert torch.equal(owner, expected_owner)
    assert torch.equal(own_area, expected_area)


class CallCounter:
    """Wraps a function of ``pixel_owners`` and counts its calls (to show a code path was taken)."""

    def __init__(self, monkeypatch, name):
        self.calls = 0
        self.function = getattr(pixel_owners, name)
        monkeypatch.setattr(pixel_owners, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "num_queries, num_kept, size, scale",
    [(1, 1, (1, 1), 4.0), (3, 2, (5, 7), 4.0), (100, 79, (64, 80), 4.0), (300, 256, (9, 11), 30.0),
     (20, 13, (37, 41), 0.5)],
)
def test_equals_plain_formulation_on_random_logits(num_queries, num_kept, size, scale, num_threads):
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        generator = torch.Generator().manual_seed(num_queries + num_kept)
        for _ in range(3):
            logits = torch.randn(num_queries, *size, generator=generator) * scale
            kept_index = torch.randperm(num_queries, generator=generator)[:num_kept].sort().values
            kept_scores = 0.5 + 0.5 * torch.rand(num_kept, generator=generator)
            assert_plain_result(logits, kept_index, kept_scores)
    finally:
        torch.set_num_threads(previous_threads)


def test_blocks_cover_an_image_that_is_not_a_multiple_of_the_block(monkeypatch):
    monkeypatch.setattr(pixel_owners, "_BLOCK_ELEMENTS_PER_THREAD", 1000)  # blocks of 32 or 64 pixels
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 13, 11, generator=generator) * 3  # 143 pixels
    assert_plain_result(logits, torch.arange(12), torch.rand(12, generator=generator) + 0.1)


def test_ties_and_near_ties_are_decided_again(monkeypatch):
    decided_again = CallCounter(monkeypatch, "_owners_from_both_paths")
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 16, 16, generator=generator)
    scores = torch.full((6,), 0.9)
    logits[1:5, 0, :4] = 8.0  # an exact tie of queries 1 to 4: the first wins
    logits[2, 1, :4] = 8.0  # 1 ulp below query 4: query 4 wins
    logits[4, 1, :4] = torch.nextafter(torch.tensor(8.0), torch.tensor(9.0))
    logits[0, 2, :4] = 8.0  # products 1 ulp apart with different scores
    logits[5, 2, :4] = 8.0
    scores[5] = torch.nextafter(scores[0], torch.tensor(1.0))
    assert_plain_result(logits, torch.arange(6), scores)
    assert decided_again.calls == 1


def test_tiny_products_are_decided_again(monkeypatch):
    decided_again = CallCounter(monkeypatch, "_owners_from_both_paths")
    logits = torch.full((3, 8, 8), 2.0)
    logits[2] = 3.0  # most pixels stay certain
    logits[:, 0, :3] = -75.0  # sigmoid about 3e-33: below the tiny-product bound (8e-31)
    logits[0, 0, 0], logits[1, 0, 1] = -76.0, -74.5
    assert_plain_result(logits, torch.arange(3), torch.tensor([0.9, 0.8, 0.85]))
    assert decided_again.calls == 1


def test_many_pixels_to_decide_again_are_left_to_the_plain_formulation():
    logits = torch.full((3, 8, 8), -75.0)  # every product tiny
    assert certified_pixel_owners(logits, torch.arange(3), torch.tensor([0.9, 0.8, 0.85])) is None


def test_probabilities_near_one_half_are_counted_again(monkeypatch):
    counted_again = CallCounter(monkeypatch, "_area_from_both_paths")
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 16, 16, generator=generator) * 4
    near_zero = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 2.0**-22, -(2.0**-22), 2.0**-20, -(2.0**-20), -3e-7])
    logits[1, 0, : near_zero.numel()] = near_zero
    logits[2, 5, : near_zero.numel()] = near_zero.flip(0)
    assert_plain_result(logits, torch.arange(4), torch.tensor([0.9, 0.8, 0.7, 0.6]))
    assert counted_again.calls == 2


def test_path_dependent_answers_are_not_certified(monkeypatch):
    # Pretend the scalar code path differs by 1 ulp: a tie it touches cannot be decided.
    def disagreeing_paths(logits):
        vectorised = logits.sigmoid()
        return vectorised, torch.nextafter(vectorised, torch.tensor(2.0))

    logits = torch.zeros(2, 3, 3)
    logits[:, 0, 0] = 1.0  # equal products at pixel 0
    logits[1, 1:] = 2.0
    monkeypatch.setattr(pixel_owners, "_sigmoid_on_both_paths", disagreeing_paths)
    assert certified_pixel_owners(logits, torch.arange(2), torch.tensor([0.9, 0.9])) is None
    # panoptic_inference then runs the plain formulation itself
    mask_cls = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    args = (mask_cls, logits, {0}, 0.5, 0.0)
    assert _same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))


def test_path_dependent_areas_are_not_certified(monkeypatch):
    def disagreeing_paths(logits):
        return torch.full_like(logits, 0.5), torch.full_like(logits, 0.5 - 2.0**-25)

    logits = torch.ones(2, 4, 4)
    logits[0, 0, 0] = -1e-8
    monkeypatch.setattr(pixel_owners, "_sigmoid_on_both_paths", disagreeing_paths)
    assert certified_pixel_owners(logits, torch.arange(2), torch.tensor([0.9, 0.8])) is None


def test_nan_logits_are_left_to_the_plain_formulation():
    logits = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(3))
    logits[1, 2, 2] = float("nan")
    assert certified_pixel_owners(logits, torch.arange(3), torch.tensor([0.9, 0.8, 0.7])) is None
    mask_cls = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    args = (mask_cls, logits, {0}, 0.5, 0.0)
    assert _same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))


def test_infinite_logits():
    logits = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(7)) * 3
    logits[0, 0, :5] = logits[1, 0, 3:8] = float("inf")  # sigmoid 1: ties where both are
    logits[:, 1] = float("-inf")  # sigmoid 0 for every query: decided again
    logits[2, 2, :4] = float("-inf")
    assert_plain_result(logits, torch.arange(4), torch.tensor([0.9, 0.9, 0.7, 0.6]))


def test_max_over_rows_equals_amax():
    generator = torch.Generator().manual_seed(4)
    for rows in (1, 2, 3, 8, 79):
        values = torch.randn(rows, 37, generator=generator)
        values[rows // 2, 5] = float("nan")
        out, halves = torch.empty(37), torch.empty(2, 37)
        torch.testing.assert_close(
            pixel_owners._max_over_rows(values, out, halves), torch.amax(values, 0), rtol=0, atol=0, equal_nan=True
        )


def test_both_sigmoid_paths_are_torchs_own():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3000, generator=generator) * 8
    vectorised, scalar = pixel_owners._sigmoid_on_both_paths(logits.view(30, 100))
    # the scalar path: torch's element-wise loop on one element at a time
    assert torch.equal(scalar.flatten(), torch.stack([logits[i : i + 1].sigmoid()[0] for i in range(3000)]))
    # the vectorised path: the inside of one long contiguous tensor on one thread
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        long = torch.cat([logits, torch.zeros(64)]).sigmoid()[:3000]
    finally:
        torch.set_num_threads(previous_threads)
    assert torch.equal(vectorised.flatten(), long)


def test_inputs_that_require_grad():
    # MaskFormer's inference runs with gradients enabled when the caller did not turn them off
    generator = torch.Generator().manual_seed(6)
    mask_cls = (torch.randn(5, 4, generator=generator) * 3).requires_grad_()
    mask_pred = (torch.randn(5, 16, 16, generator=generator) * 3).requires_grad_()
    got = panoptic_inference(mask_cls * 1.0, mask_pred * 1.0, {0}, 0.0, 0.0)
    assert _same_panoptic(got, reference_panoptic_inference(mask_cls.detach(), mask_pred.detach(), {0}, 0.0, 0.0))


def test_an_image_without_pixels_has_no_segments():
    mask_cls = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    for size in [(0, 7), (4, 0)]:
        args = (mask_cls, torch.zeros(2, *size), {0}, 0.5, 0.5)
        got = panoptic_inference(*args)
        assert got[0].shape == size and got[1] == []
        assert _same_panoptic(got, reference_panoptic_inference(*args))
    assert_plain_result(torch.zeros(3, 0, 5), torch.arange(2), torch.tensor([0.9, 0.8]))


def test_bad_arguments_are_named():
    logits = torch.zeros(3, 2, 2)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        certified_pixel_owners(logits.double(), torch.arange(3), torch.ones(3))
    with pytest.raises(ValueError, match="kept queries"):
        certified_pixel_owners(logits, torch.arange(0), torch.ones(0))
    with pytest.raises(ValueError, match="kept queries"):
        big = torch.zeros(MAX_CERTIFIED_QUERIES + 1, 1, 1)
        certified_pixel_owners(big, torch.arange(MAX_CERTIFIED_QUERIES + 1), torch.ones(MAX_CERTIFIED_QUERIES + 1))


def _same_panoptic(actual, expected):
    return torch.equal(actual[0], expected[0]) and actual[1] == expected[1]
