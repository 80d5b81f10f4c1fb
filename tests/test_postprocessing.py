"""Post-processing on constructed logits whose answers are worked out by hand below, and the
vectorised panoptic / instance inference against plain loop implementations (the versions before
vectorisation, kept here as references) on many random inputs: the outputs must be identical.

Class logits are written as ``log(probabilities)`` and mask logits as ``logit(probabilities)``,
so the softmax / sigmoid the code applies gives back exactly the probabilities written here.
"""
import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from torch.nn import functional as F

from mask_former.modeling.postprocessing import (
    _argmax_over_queries,
    _count_true,
    _mask_statistics,
    binarize_masks,
    boxes_from_profiles,
    instance_inference,
    mask_wise_merge,
    mask_wise_panoptic_inference,
    panoptic_inference,
    semantic_inference,
)


def class_logits(probs):
    """Q x (K+1) logits whose softmax is ``probs`` (each row must sum to 1)."""
    probs = torch.tensor(probs, dtype=torch.float64)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs), dtype=torch.float64)), "rows must sum to 1"
    return probs.log()


def mask_logits(probs):
    """Q x H x W logits whose sigmoid is ``probs``."""
    return torch.logit(torch.tensor(probs, dtype=torch.float64))


# ----------------------------------------------------------------------------- semantic


def test_semantic_inference_hand_computed():
    # K = 3 classes + no object, two queries, 2 x 2 image.
    # q0: logits (log 2, 0, 0, 0) -> probabilities (2/5, 1/5, 1/5 | 1/5)
    # q1: logits (1, 0, -1, 1)    -> probabilities (e, 1, 1/e | e) / Z, Z = 2e + 1 + 1/e
    mask_cls = torch.tensor([[math.log(2), 0.0, 0.0, 0.0], [1.0, 0.0, -1.0, 1.0]], dtype=torch.float64)
    l3 = math.log(3)  # sigmoid(l3) = 3/4, sigmoid(-l3) = 1/4, sigmoid(0) = 1/2
    mask_pred = torch.tensor(
        [
            [[0.0, l3], [-l3, 0.0]],  # q0: [[1/2, 3/4], [1/4, 1/2]]
            [[l3, -l3], [0.0, 0.0]],  # q1: [[3/4, 1/4], [1/2, 1/2]]
        ],
        dtype=torch.float64,
    )
    e = math.exp(1)
    z = 2 * e + 1 + 1 / e
    a0, b0, c0 = 2 / 5, 1 / 5, 1 / 5  # q0 class probabilities
    a1, b1, c1 = e / z, 1 / z, (1 / e) / z  # q1 class probabilities
    expected = torch.tensor(
        [
            [[a0 / 2 + a1 * 3 / 4, a0 * 3 / 4 + a1 / 4], [a0 / 4 + a1 / 2, a0 / 2 + a1 / 2]],
            [[b0 / 2 + b1 * 3 / 4, b0 * 3 / 4 + b1 / 4], [b0 / 4 + b1 / 2, b0 / 2 + b1 / 2]],
            [[c0 / 2 + c1 * 3 / 4, c0 * 3 / 4 + c1 / 4], [c0 / 4 + c1 / 2, c0 / 2 + c1 / 2]],
        ],
        dtype=torch.float64,
    )
    sem_seg = semantic_inference(mask_cls, mask_pred)
    assert sem_seg.shape == (3, 2, 2)
    torch.testing.assert_close(sem_seg, expected, rtol=0, atol=1e-12)


def test_semantic_inference_rejects_mismatched_queries():
    with pytest.raises(ValueError, match="queries"):
        semantic_inference(torch.zeros(3, 4), torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="Q x H x W"):
        semantic_inference(torch.zeros(3, 4), torch.zeros(3, 5))


# ----------------------------------------------------------------------------- panoptic

# K = 3: class 0 is a thing, classes 1 and 2 are stuff. Image 2 x 4. Background mask prob 0.1.
THING_IDS = {0}
PANOPTIC_CLASS_PROBS = [
    [0.90, 0.04, 0.03, 0.03],  # q0: thing 0, score 0.9
    [0.80, 0.10, 0.05, 0.05],  # q1: thing 0, score 0.8
    [0.10, 0.70, 0.10, 0.10],  # q2: stuff 1, score 0.7
    [0.10, 0.70, 0.10, 0.10],  # q3: stuff 1, score 0.7 (merged with q2)
    [0.20, 0.25, 0.30, 0.25],  # q4: stuff 2, score 0.3 <= object_mask_threshold 0.5 -> dropped
    [0.05, 0.03, 0.02, 0.90],  # q5: no object -> dropped
    [0.60, 0.20, 0.10, 0.10],  # q6: thing 0, score 0.6, wins no pixel -> no segment
]
PANOPTIC_MASK_PROBS = [
    [[0.9, 0.6, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]],  # q0
    [[0.1, 0.9, 0.1, 0.1], [0.1, 0.95, 0.1, 0.1]],  # q1
    [[0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1]],  # q2
    [[0.1, 0.1, 0.1, 0.4], [0.1, 0.1, 0.9, 0.9]],  # q3
    [[0.1, 0.1, 0.1, 0.99], [0.1, 0.1, 0.1, 0.1]],  # q4
    [[0.99, 0.99, 0.99, 0.99], [0.99, 0.99, 0.99, 0.99]],  # q5
    [[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]],  # q6
]
# score * mask of the kept queries (q0, q1, q2, q3, q6) per pixel; the argmax wins:
#   (0,0): .81 .08 .07 .07 .54 -> q0
#   (0,1): .54 .72 .07 .07 .06 -> q1
#   (0,2): .09 .08 .63 .07 .06 -> q2
#   (0,3): .09 .08 .07 .28 .06 -> q3 (its mask is below 0.5 here, but it is the argmax)
#   (1,0): .81 .08 .07 .07 .06 -> q0
#   (1,1): .81 .76 .07 .07 .06 -> q0 (q1's mask is higher, q0's class score wins)
#   (1,2): .09 .08 .07 .63 .06 -> q3
#   (1,3): .09 .08 .07 .63 .06 -> q3
# won / own (prob >= 0.5) pixels: q0 3/4, q1 1/2, q2 1/1, q3 3/2, q6 0/1.


def _panoptic(overlap_threshold, class_probs=PANOPTIC_CLASS_PROBS, mask_probs=PANOPTIC_MASK_PROBS):
    return panoptic_inference(
        class_logits(class_probs),
        mask_logits(mask_probs),
        thing_ids=THING_IDS,
        object_mask_threshold=0.5,
        overlap_threshold=overlap_threshold,
    )


def test_panoptic_argmax_stuff_merge_and_thing_split():
    panoptic_seg, segments_info = _panoptic(overlap_threshold=0.0)
    assert panoptic_seg.dtype == torch.int32
    expected = torch.tensor([[1, 2, 3, 3], [1, 1, 3, 3]], dtype=torch.int32)
    assert torch.equal(panoptic_seg, expected), panoptic_seg
    assert [s["score"] for s in segments_info if s["isthing"]] == pytest.approx([0.9, 0.8])
    without_score = [{k: v for k, v in s.items() if k != "score"} for s in segments_info]
    assert without_score == [
        {"id": 1, "isthing": True, "category_id": 0, "area": 3},
        {"id": 2, "isthing": True, "category_id": 0, "area": 1},
        {"id": 3, "isthing": False, "category_id": 1, "area": 4},  # q2 + q3 merged
    ]
    for s in segments_info:
        assert type(s["id"]) is int and type(s["category_id"]) is int and type(s["area"]) is int


def test_panoptic_overlap_threshold_drops_occluded_segments():
    # q1 keeps exactly 1/2 of its mask: kept at threshold 0.5 (the test is won / own >= threshold).
    panoptic_seg, _ = _panoptic(overlap_threshold=0.5)
    assert torch.equal(panoptic_seg, torch.tensor([[1, 2, 3, 3], [1, 1, 3, 3]], dtype=torch.int32))
    # q1 keeps only 1/2 of its mask: dropped at 0.6, its pixel becomes void and ids stay compact.
    panoptic_seg, segments_info = _panoptic(overlap_threshold=0.6)
    assert torch.equal(panoptic_seg, torch.tensor([[1, 0, 2, 2], [1, 1, 2, 2]], dtype=torch.int32))
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments_info] == [
        (1, 0, True, 3),
        (2, 1, False, 4),
    ]
    # q0 keeps 3/4: dropped at 0.8 too. Stuff q3 won more than its own mask (3/2) and stays.
    panoptic_seg, segments_info = _panoptic(overlap_threshold=0.8)
    assert torch.equal(panoptic_seg, torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.int32))
    assert [(s["id"], s["category_id"], s["isthing"], s["area"]) for s in segments_info] == [
        (1, 1, False, 4)
    ]


def test_panoptic_all_no_object_is_void():
    class_probs = [[0.05, 0.03, 0.02, 0.90], [0.1, 0.1, 0.1, 0.7]]
    mask_probs = [[[0.9] * 4] * 2, [[0.8] * 4] * 2]
    panoptic_seg, segments_info = _panoptic(0.0, class_probs, mask_probs)
    assert torch.equal(panoptic_seg, torch.zeros(2, 4, dtype=torch.int32))
    assert segments_info == []


def test_panoptic_query_without_own_mask_is_void():
    # The only kept query wins every pixel, but its mask is below 0.5 everywhere.
    panoptic_seg, segments_info = _panoptic(0.0, [[0.9, 0.04, 0.03, 0.03]], [[[0.4] * 4] * 2])
    assert torch.equal(panoptic_seg, torch.zeros(2, 4, dtype=torch.int32))
    assert segments_info == []


def test_panoptic_rejects_dataset_ids_as_thing_ids():
    with pytest.raises(ValueError, match="contiguous"):
        panoptic_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3), {90}, 0.0, 0.0)


def _upsampled_panoptic(factor):
    """The hand-worked panoptic case with every pixel blown up to factor x factor."""
    masks = mask_logits(PANOPTIC_MASK_PROBS).repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return panoptic_inference(class_logits(PANOPTIC_CLASS_PROBS), masks, THING_IDS, 0.5, 0.0)


def _register_panoptic_metadata(name, **extra):
    if name not in MetadataCatalog.list():
        MetadataCatalog.get(name).set(
            thing_classes=["person", "car", "road"],
            stuff_classes=["person", "car", "road"],
            thing_dataset_id_to_contiguous_id={11: 0},
            stuff_dataset_id_to_contiguous_id={12: 1, 13: 2},
            **extra,
        )
    return MetadataCatalog.get(name)


def test_panoptic_output_draws_with_visualizer():
    panoptic_seg, segments_info = _upsampled_panoptic(8)
    metadata = _register_panoptic_metadata("_test_postprocessing_vis")
    image = np.zeros((16, 32, 3), dtype=np.uint8)
    drawn = Visualizer(image, metadata).draw_panoptic_seg(panoptic_seg, segments_info).get_image()
    assert drawn.shape == (16, 32, 3)
    assert drawn.any(), "the three segments should have been painted over the black image"


def test_panoptic_output_scores_full_pq_against_identical_ground_truth(tmp_path):
    # Ground truth written by hand in COCO panoptic format (dataset ids 11 thing, 12 stuff): the
    # expected id map blown up 8x. Feeding our prediction to detectron2's evaluator must give PQ 100.
    factor = 8
    gt_ids = torch.tensor([[1, 2, 3, 3], [1, 1, 3, 3]]).repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    gt_root = tmp_path / "gt"
    gt_root.mkdir()
    gt_rgb = np.zeros((*gt_ids.shape, 3), dtype=np.uint8)
    gt_rgb[..., 0] = gt_ids.numpy()  # id = R + 256 G + 256^2 B
    Image.fromarray(gt_rgb).save(gt_root / "img.png")
    area = factor * factor
    gt_json = {
        "images": [{"id": 1, "file_name": "img.jpg", "height": 16, "width": 32}],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "img.png",
                "segments_info": [
                    {"id": 1, "category_id": 11, "iscrowd": 0, "area": 3 * area},
                    {"id": 2, "category_id": 11, "iscrowd": 0, "area": 1 * area},
                    {"id": 3, "category_id": 12, "iscrowd": 0, "area": 4 * area},
                ],
            }
        ],
        "categories": [
            {"id": 11, "name": "person", "isthing": 1},
            {"id": 12, "name": "car", "isthing": 0},
            {"id": 13, "name": "road", "isthing": 0},
        ],
    }
    with open(tmp_path / "gt.json", "w") as f:
        json.dump(gt_json, f)
    _register_panoptic_metadata(
        "_test_postprocessing_pq", panoptic_root=str(gt_root), panoptic_json=str(tmp_path / "gt.json")
    )

    evaluator = COCOPanopticEvaluator("_test_postprocessing_pq")
    evaluator.reset()
    evaluator.process([{"image_id": 1, "file_name": "img.jpg"}], [{"panoptic_seg": _upsampled_panoptic(factor)}])
    results = evaluator.evaluate()["panoptic_seg"]
    assert results["PQ"] == pytest.approx(100.0)
    assert results["PQ_th"] == pytest.approx(100.0)
    assert results["PQ_st"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- instance

# K = 3, two queries, 4 x 5 image.
INSTANCE_CLASS_PROBS = [
    [0.50, 0.30, 0.10, 0.10],  # q0
    [0.05, 0.15, 0.60, 0.20],  # q1
]
# q0: rectangle rows 1-2, cols 1-3; q1: column 4, all rows. Outside: probability 0.2 (logit < 0).
INSTANCE_MASK_PROBS = [
    [
        [0.2, 0.2, 0.2, 0.2, 0.2],
        [0.2, 0.8, 0.8, 0.6, 0.2],
        [0.2, 0.6, 0.6, 0.6, 0.2],
        [0.2, 0.2, 0.2, 0.2, 0.2],
    ],
    [
        [0.2, 0.2, 0.2, 0.2, 0.9],
        [0.2, 0.2, 0.2, 0.2, 0.9],
        [0.2, 0.2, 0.2, 0.2, 0.9],
        [0.2, 0.2, 0.2, 0.2, 0.9],
    ],
]
Q0_MASK = torch.tensor(
    [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool
)
Q1_MASK = torch.tensor(
    [[0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]], dtype=torch.bool
)
Q0_BOX = [1.0, 1.0, 4.0, 3.0]  # x1, y1, x2 (exclusive), y2 (exclusive)
Q1_BOX = [4.0, 0.0, 5.0, 4.0]
Q0_MASK_SCORE = (0.8 + 0.8 + 0.6 + 0.6 + 0.6 + 0.6) / 6
Q1_MASK_SCORE = 0.9


def _instances(topk, thing_ids=None, class_probs=INSTANCE_CLASS_PROBS, mask_probs=INSTANCE_MASK_PROBS):
    return instance_inference(class_logits(class_probs), mask_logits(mask_probs), 3, topk, thing_ids)


def test_instance_topk_over_query_class_pairs():
    # pairs by class probability: (q1,c2) .6, (q0,c0) .5, (q0,c1) .3, (q1,c1) .15, (q0,c2) .1, (q1,c0) .05
    result = _instances(topk=3)
    assert isinstance(result, Instances) and result.image_size == (4, 5)
    assert result.pred_classes.tolist() == [2, 0, 1]
    assert result.pred_masks.dtype == torch.bool
    assert torch.equal(result.pred_masks, torch.stack([Q1_MASK, Q0_MASK, Q0_MASK]))
    expected_scores = [0.6 * Q1_MASK_SCORE, 0.5 * Q0_MASK_SCORE, 0.3 * Q0_MASK_SCORE]
    assert result.scores.tolist() == pytest.approx(expected_scores, abs=1e-9)
    assert isinstance(result.pred_boxes, Boxes)
    assert result.pred_boxes.tensor.tolist() == [Q1_BOX, Q0_BOX, Q0_BOX]


def test_instance_topk_larger_than_pairs_returns_all_pairs():
    result = _instances(topk=100)
    assert len(result) == 6
    assert result.pred_classes.tolist() == [2, 0, 1, 1, 2, 0]
    masks = [Q1_MASK, Q0_MASK, Q0_MASK, Q1_MASK, Q0_MASK, Q1_MASK]
    assert torch.equal(result.pred_masks, torch.stack(masks))
    expected_scores = [
        0.6 * Q1_MASK_SCORE,
        0.5 * Q0_MASK_SCORE,
        0.3 * Q0_MASK_SCORE,
        0.15 * Q1_MASK_SCORE,
        0.1 * Q0_MASK_SCORE,
        0.05 * Q1_MASK_SCORE,
    ]
    assert result.scores.tolist() == pytest.approx(expected_scores, abs=1e-9)


def test_instance_stuff_filtered_before_topk():
    # Class 2 is stuff: its pairs (.6 and .1) never take a slot, so the third slot goes to (q1,c1).
    result = _instances(topk=3, thing_ids={0, 1})
    assert result.pred_classes.tolist() == [0, 1, 1]
    assert torch.equal(result.pred_masks, torch.stack([Q0_MASK, Q0_MASK, Q1_MASK]))
    expected_scores = [0.5 * Q0_MASK_SCORE, 0.3 * Q0_MASK_SCORE, 0.15 * Q1_MASK_SCORE]
    assert result.scores.tolist() == pytest.approx(expected_scores, abs=1e-9)
    assert result.pred_boxes.tensor.tolist() == [Q0_BOX, Q0_BOX, Q1_BOX]


def test_instance_empty_mask_gives_zero_score_and_box():
    mask_probs = [INSTANCE_MASK_PROBS[0], [[0.3] * 5] * 4]  # q1 is below 0.5 everywhere
    result = _instances(topk=2, mask_probs=mask_probs)
    assert result.pred_classes.tolist() == [2, 0]  # (q1,c2) .6 first
    assert not result.pred_masks[0].any()
    assert result.scores.tolist() == pytest.approx([0.0, 0.5 * Q0_MASK_SCORE], abs=1e-9)
    assert result.pred_boxes.tensor.tolist() == [[0.0, 0.0, 0.0, 0.0], Q0_BOX]


@pytest.mark.parametrize(
    "num_classes, topk, thing_ids, message",
    [(4, 10, None, "num_classes=4"), (3, 0, None, "topk"), (3, 10, {3}, "contiguous")],
)
def test_instance_rejects_bad_arguments(num_classes, topk, thing_ids, message):
    with pytest.raises(ValueError, match=message):
        instance_inference(torch.zeros(2, 4), torch.zeros(2, 3, 3), num_classes, topk, thing_ids)


# ----------------------------------------------------------------------------- mask-wise merge

# Image 3 x 4; class 0 is a thing, classes 1 and 2 are stuff. Inside each mask the probability is
# written below, outside it is 0.1 (not in the binary mask, > 0.5). Confidence s = p * q^2 with
# q = sum(prob inside) / (area + 1):
#   A thing, p .9, rows 0-1 x cols 0-1, prob 1:     q = 4/5,   s = .9 * .64      = .576
#   B thing, p 1., row 0 x cols 1-3, prob 1:        q = 3/4,   s = .5625
#   C thing, p 1., (1,1) and (1,2), prob 1:         q = 2/3,   s = .444
#   D stuff 1, p .8, (2,0) and (2,1), prob .9:      q = 1.8/3, s = .8 * .36       = .288
#   E stuff 1, p .9, (2,2), (2,3), (1,3), prob 1:   q = 3/4,   s = .9 * .5625    = .50625
#   F stuff 2, p .5, (1,2), prob 1:                 q = 1/2,   s = .125 < .25 -> dropped (quality)
#   G thing, p .6, prob .4 everywhere:              empty binary mask -> dropped
# Walk in order A, B, E, C, D:
#   A placed (id 1). B: 1 of 3 pixels taken, 1 <= .4 * 3 -> placed (id 2) on (0,2), (0,3).
#   E: nothing taken -> stuff 1 opens id 3. C: 1 of 2 taken, 1 > .4 * 2 -> dropped.
#   D: nothing taken -> merged into id 3 (stuff 1). (1,2) stays void.
MASK_WISE_INPUTS = {  # name: (class, p, pixels, probability inside)
    "D": (1, 0.8, [(2, 0), (2, 1)], 0.9),
    "C": (0, 1.0, [(1, 1), (1, 2)], 1.0),
    "A": (0, 0.9, [(0, 0), (0, 1), (1, 0), (1, 1)], 1.0),
    "F": (2, 0.5, [(1, 2)], 1.0),
    "B": (0, 1.0, [(0, 1), (0, 2), (0, 3)], 1.0),
    "G": (0, 0.6, [], 0.4),
    "E": (1, 0.9, [(2, 2), (2, 3), (1, 3)], 1.0),
}
MASK_WISE_EXPECTED_SEG = [[1, 1, 2, 2], [1, 1, 0, 3], [3, 3, 3, 3]]
MASK_WISE_EXPECTED_INFO = [
    {"id": 1, "isthing": True, "category_id": 0, "area": 4, "score": 0.9},
    {"id": 2, "isthing": True, "category_id": 0, "area": 2, "score": 1.0},
    {"id": 3, "isthing": False, "category_id": 1, "area": 5},
]


def _merge_inputs(masks=MASK_WISE_INPUTS, size=(3, 4), outside=0.1):
    labels, scores, probs = [], [], []
    for label, score, pixels, inside in masks.values():
        prob = torch.full(size, 0.4 if not pixels else outside)
        for pixel in pixels:
            prob[pixel] = inside
        labels.append(label)
        scores.append(score)
        probs.append(prob)
    return torch.tensor(labels), torch.tensor(scores), torch.stack(probs)


def _assert_segments(segments_info, expected):
    assert len(segments_info) == len(expected)
    for info, want in zip(segments_info, expected):
        assert list(info) == list(want), "the fields (and their order) of panoptic_inference"
        assert {k: v for k, v in info.items() if k != "score"} == {k: v for k, v in want.items() if k != "score"}
        if "score" in want:
            assert info["score"] == pytest.approx(want["score"])
        assert type(info["id"]) is int and type(info["category_id"]) is int and type(info["area"]) is int
        assert type(info["isthing"]) is bool


def test_mask_wise_merge_hand_computed():
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(), thing_ids={0})
    assert panoptic_seg.dtype == torch.int32
    assert panoptic_seg.tolist() == MASK_WISE_EXPECTED_SEG
    _assert_segments(segments_info, MASK_WISE_EXPECTED_INFO)


def test_mask_wise_merge_does_not_depend_on_input_order():
    names = list(MASK_WISE_INPUTS)[::-1]
    reordered = {name: MASK_WISE_INPUTS[name] for name in names}
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(reordered), thing_ids={0})
    assert panoptic_seg.tolist() == MASK_WISE_EXPECTED_SEG
    _assert_segments(segments_info, MASK_WISE_EXPECTED_INFO)


def test_mask_wise_merge_overlap_thresholds():
    # B keeps 2 of its 3 pixels free: at a thing overlap threshold of .3, 1 > .3 * 3 drops it and
    # (0,2), (0,3) become void; C (1 of 2 taken) stays dropped.
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(), thing_ids={0}, thing_overlap_threshold=0.3)
    assert panoptic_seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 2], [2, 2, 2, 2]]
    _assert_segments(segments_info, [MASK_WISE_EXPECTED_INFO[0], {**MASK_WISE_EXPECTED_INFO[2], "id": 2}])
    # At .5, C's 1 taken pixel of 2 is not MORE than half: C is placed on (1,2), after E, so as id 4.
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(), thing_ids={0}, thing_overlap_threshold=0.5)
    assert panoptic_seg.tolist() == [[1, 1, 2, 2], [1, 1, 4, 3], [3, 3, 3, 3]]
    assert [(s["id"], s["category_id"], s["area"]) for s in segments_info] == [
        (1, 0, 4), (2, 0, 2), (3, 1, 5), (4, 0, 1)
    ]


def test_mask_wise_merge_stuff_overlap_threshold():
    # A stuff mask of 5 pixels, 1 of them already taken by a thing: 1 <= .2 * 5 is allowed,
    # 2 taken pixels are not.
    # The thing comes first: s = 1 * (2/3)^2 = .44 against .5 * (5/6)^2 = .35 for the stuff.
    thing = (0, 1.0, [(0, 0), (0, 1)], 1.0)
    for taken, expected_row in [(1, [1, 1, 2, 2, 2, 2]), (2, [1, 1, 0, 0, 0, 0])]:
        stuff = (1, 0.5, [(0, c) for c in range(2 - taken, 7 - taken)], 1.0)
        panoptic_seg, segments_info = mask_wise_merge(
            *_merge_inputs({"thing": thing, "stuff": stuff}, size=(1, 6)), thing_ids={0}
        )
        assert panoptic_seg.tolist() == [expected_row]
        assert [s["category_id"] for s in segments_info] == ([0, 1] if taken == 1 else [0])


def test_mask_wise_merge_quality_threshold_is_inclusive():
    # One pixel of probability 1: q = 1/2, s = 1 * (1/2)^2 = 1/4 exactly.
    masks = {"thing": (0, 1.0, [(0, 0)], 1.0), "stuff": (1, 1.0, [(0, 1)], 1.0)}
    panoptic_seg, _ = mask_wise_merge(*_merge_inputs(masks, size=(1, 2)), thing_ids={0})
    assert panoptic_seg.tolist() == [[1, 2]]
    panoptic_seg, segments_info = mask_wise_merge(
        *_merge_inputs(masks, size=(1, 2)), thing_ids={0}, thing_quality_threshold=0.26
    )
    assert panoptic_seg.tolist() == [[0, 1]]
    assert segments_info == [{"id": 1, "isthing": False, "category_id": 1, "area": 1}]
    panoptic_seg, _ = mask_wise_merge(
        *_merge_inputs(masks, size=(1, 2)), thing_ids={0}, stuff_quality_threshold=0.26
    )
    assert panoptic_seg.tolist() == [[1, 0]]


def test_mask_wise_merge_confidence_exponents_and_ties():
    # alpha = beta = 0: every confidence is 1, so the walk keeps the input order (stable sort):
    # the first thing takes the shared pixel and the second (2 of 3 free, 1 <= .4 * 3) the rest.
    masks = {
        "low": (0, 0.3, [(0, 0), (0, 1)], 0.6),
        "high": (0, 0.9, [(0, 1), (0, 2), (0, 3)], 1.0),
    }
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(masks, size=(1, 4)), {0}, alpha=0, beta=0)
    assert panoptic_seg.tolist() == [[1, 1, 2, 2]]
    assert [s["score"] for s in segments_info] == pytest.approx([0.3, 0.9])
    # Default exponents: "high" (s = .9 * (3/4)^2) comes first and "low" (1 of 2 taken) is dropped.
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(masks, size=(1, 4)), {0})
    assert panoptic_seg.tolist() == [[0, 1, 1, 1]]
    assert [s["area"] for s in segments_info] == [3]


def test_mask_wise_merge_mask_threshold_is_strict():
    masks = {"a": (1, 1.0, [(0, 0), (0, 1)], 0.5)}  # exactly 0.5: not in the binary mask
    panoptic_seg, segments_info = mask_wise_merge(*_merge_inputs(masks, size=(1, 2)), {0})
    assert panoptic_seg.tolist() == [[0, 0]] and segments_info == []
    panoptic_seg, _ = mask_wise_merge(
        *_merge_inputs(masks, size=(1, 2)), {0}, mask_threshold=0.4, stuff_quality_threshold=0
    )
    assert panoptic_seg.tolist() == [[1, 1]]


def test_mask_wise_merge_empty_results():
    # every mask below the quality threshold
    labels, scores, probs = _merge_inputs()
    panoptic_seg, segments_info = mask_wise_merge(labels, scores * 0.1, probs, {0})
    assert torch.equal(panoptic_seg, torch.zeros(3, 4, dtype=torch.int32)) and segments_info == []
    # no masks at all
    panoptic_seg, segments_info = mask_wise_merge(
        torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, 3, 4), {0}
    )
    assert torch.equal(panoptic_seg, torch.zeros(3, 4, dtype=torch.int32)) and segments_info == []


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha": -1.0}, "alpha"), ({"mask_threshold": 1.5}, "mask_threshold"),
     ({"stuff_overlap_threshold": -0.1}, "stuff_overlap_threshold")],
)
def test_mask_wise_merge_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mask_wise_merge(*_merge_inputs(), {0}, **kwargs)
    with pytest.raises(ValueError, match="one entry per mask"):
        mask_wise_merge(torch.zeros(2, dtype=torch.long), torch.zeros(3), torch.zeros(3, 2, 2), {0})


def test_mask_wise_merge_takes_the_callers_binary_masks():
    """``binarized`` (what the Panoptic SegFormer computes once for the panoptic and the instance
    output) is what the merge reads: the binary masks of the hand-computed case give its result,
    other binary masks another one; shapes that do not fit the probabilities are named."""
    labels, scores, probs = _merge_inputs()
    binarized = binarize_masks(probs, 0.5)
    panoptic_seg, segments_info = mask_wise_merge(labels, scores, probs, {0}, binarized=binarized)
    assert panoptic_seg.tolist() == MASK_WISE_EXPECTED_SEG
    _assert_segments(segments_info, MASK_WISE_EXPECTED_INFO)
    # every mask empty: no candidate, so nothing is placed whatever the probabilities
    binary, area, prob_in_mask = binarized
    empty = (torch.zeros_like(binary), torch.zeros_like(area), torch.zeros_like(prob_in_mask))
    panoptic_seg, segments_info = mask_wise_merge(labels, scores, probs, {0}, binarized=empty)
    assert not panoptic_seg.any() and segments_info == []
    with pytest.raises(ValueError, match=r"binarized must be .*\(7, 3, 4\).*\(6, 3, 4\)"):
        mask_wise_merge(labels, scores, probs, {0}, binarized=(binary[:6], area, prob_in_mask))


def test_mask_wise_panoptic_inference_on_maskformer_outputs():
    # K = 2 (class 0 thing, class 1 stuff) + no object. q2 is most likely "no object" (.5) but its
    # best real class (0, p .3) is its label: s = .3 * q^2 is below .25 and it is dropped.
    mask_cls = class_logits([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.2, 0.5]])
    mask_pred = mask_logits([
        [[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]],
        [[0.1, 0.1, 0.75, 0.75], [0.1, 0.75, 0.75, 0.75]],
        [[0.99] * 4, [0.99] * 4],
    ])
    # q0: q = 3.6 / 5 = .72, s = .9 * .5184 = .467; q1: q = 3.75 / 6 = .625, s = .8 * .39 = .3125;
    # q2: q = 7.92 / 9 = .88, s = .3 * .774 = .232 < .25. q1 overlaps q0 on (1,1): 1 <= .2 * 5.
    panoptic_seg, segments_info = mask_wise_panoptic_inference(mask_cls, mask_pred, thing_ids={0})
    assert panoptic_seg.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    _assert_segments(segments_info, [
        {"id": 1, "isthing": True, "category_id": 0, "area": 4, "score": 0.9},
        {"id": 2, "isthing": False, "category_id": 1, "area": 4},
    ])
    # the merge's keywords reach it: a stuff quality threshold above q1's .3125 drops q1
    panoptic_seg, segments_info = mask_wise_panoptic_inference(
        mask_cls, mask_pred, thing_ids={0}, stuff_quality_threshold=0.35
    )
    assert panoptic_seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    _assert_segments(segments_info, [{"id": 1, "isthing": True, "category_id": 0, "area": 4, "score": 0.9}])
    with pytest.raises(TypeError, match="stuff_threshold"):
        mask_wise_panoptic_inference(mask_cls, mask_pred, thing_ids={0}, stuff_threshold=0.35)
    with pytest.raises(ValueError, match="contiguous"):
        mask_wise_panoptic_inference(mask_cls, mask_pred, thing_ids={5})


# ----------------------------------------------------------------------------- the vectorised kernels


def test_count_true_equals_bool_sum():
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 1, 1), (2, 17, 15), (4, 255), (4, 256), (2, 510), (5, 31, 33), (0, 4, 4)]:
        masks = torch.rand(shape, generator=generator) > 0.3
        assert torch.equal(_count_true(masks), masks.flatten(1).sum(1))
    full = torch.ones(2, 600, 600, dtype=torch.bool)
    assert _count_true(full).tolist() == [360000, 360000]


def test_boxes_from_profiles_equal_bitmasks():
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(20, 13, 17, generator=generator) > 0.97
    masks[3] = False  # empty
    masks[4] = True  # full
    boxes = boxes_from_profiles(masks.any(1), masks.any(2))
    assert torch.equal(boxes, BitMasks(masks).get_bounding_boxes().tensor)
    no_masks = torch.zeros(0, 5, dtype=torch.bool)
    assert boxes_from_profiles(no_masks, no_masks).shape == (0, 4)


def test_mask_statistics_over_several_blocks_against_pixel_loops():
    # 12 queries of 300 x 400 pixels, out of order. Sparse positive pixels (most image rows have
    # none), a NaN in a row with positives, a NaN in a row without, an empty and a full mask, +inf.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(12, 300, 400, generator=generator) - 3.5
    logits[1, 10:20, 30:40] = 2.0
    logits[2] = -1.0
    logits[3] = 0.5
    logits[4, 7, 9] = 3.0
    logits[4, 7, 11] = math.nan
    logits[5, 250, 5] = math.nan
    logits[6, 0, 0] = math.inf
    queries = torch.tensor([6, 1, 2, 3, 4, 5, 0, 7, 8, 9, 10, 11])
    masks, areas, boxes, scores = _mask_statistics(logits, queries)
    for i, query in enumerate(queries.tolist()):
        ys, xs = [], []
        total, area = 0.0, 0
        has_nan = False
        for y in range(300):
            row = logits[query, y].tolist()
            for x, value in enumerate(row):
                if value != value:
                    has_nan = True
                elif value > 0:
                    ys.append(y)
                    xs.append(x)
                    area += 1
                    total += 1.0 / (1.0 + math.exp(-value))
        assert torch.equal(masks[i], logits[query] > 0)
        assert int(areas[i]) == area
        expected_box = [min(xs), min(ys), max(xs) + 1, max(ys) + 1] if area else [0, 0, 0, 0]
        assert boxes[i].tolist() == expected_box
        if has_nan:
            assert math.isnan(scores[i])
        else:
            assert float(scores[i]) == pytest.approx(total / max(area, 1), rel=1e-6, abs=0)
    assert areas[2] == 0 and areas[3] == 300 * 400 and scores[2] == 0


def test_argmax_over_queries_equals_argmax_with_ties_and_nan():
    generator = torch.Generator().manual_seed(2)
    values = torch.randint(0, 3, (300, 9, 11), generator=generator).float()  # many ties
    assert torch.equal(_argmax_over_queries(values), values.argmax(0))
    values[5, 2, 3] = values[7, 2, 3] = math.nan
    values[0, 0, 0] = math.inf
    assert torch.equal(_argmax_over_queries(values), values.argmax(0))
    assert torch.equal(_argmax_over_queries(values[:1]), values[:1].argmax(0))


# ----------------------------------------------------------------------------- against the loop references


def reference_panoptic_inference(mask_cls, mask_pred, thing_ids, object_mask_threshold, overlap_threshold):
    """panoptic_inference before vectorisation: a loop over the kept queries."""
    num_classes = mask_cls.shape[1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    kept_scores = scores[keep]
    kept_labels = labels[keep].tolist()
    kept_masks = mask_pred[keep].sigmoid()

    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32, device=mask_pred.device)
    segments_info = []
    if len(kept_labels) == 0:
        return panoptic_seg, segments_info

    pixel_owner = (kept_scores[:, None, None] * kept_masks).argmax(0)  # H x W, index into kept
    stuff_segment_index = {}  # stuff class -> its entry in segments_info
    for k, label in enumerate(kept_labels):
        won = pixel_owner == k
        won_area = int(won.sum())
        own_area = int((kept_masks[k] >= 0.5).sum())
        if won_area == 0 or own_area == 0 or won_area / own_area < overlap_threshold:
            continue
        isthing = label in thing_ids
        if not isthing and label in stuff_segment_index:
            info = segments_info[stuff_segment_index[label]]
            info["area"] += won_area
            panoptic_seg[won] = info["id"]
            continue
        info = {"id": len(segments_info) + 1, "isthing": isthing, "category_id": label, "area": won_area}
        if isthing:
            info["score"] = float(kept_scores[k])
        else:
            stuff_segment_index[label] = len(segments_info)
        segments_info.append(info)
        panoptic_seg[won] = info["id"]
    return panoptic_seg, segments_info


def reference_instance_inference(mask_cls, mask_pred, num_classes, topk, thing_ids=None):
    """instance_inference before vectorisation: boxes from BitMasks, a float x bool product."""
    class_probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    candidate_classes = torch.arange(num_classes, device=mask_cls.device)
    if thing_ids is not None:
        candidate_classes = torch.tensor(sorted(thing_ids), dtype=torch.long, device=mask_cls.device)
        class_probs = class_probs[:, candidate_classes]
    num_candidates = class_probs.shape[1]
    topk = min(topk, class_probs.numel())
    class_scores, flat_indices = class_probs.flatten().topk(topk, sorted=True)
    query_indices = flat_indices // num_candidates
    pred_classes = candidate_classes[flat_indices % num_candidates]

    selected_logits = mask_pred[query_indices]
    pred_masks = selected_logits > 0
    mask_area = pred_masks.flatten(1).sum(1)
    mask_prob_sum = (selected_logits.sigmoid() * pred_masks).flatten(1).sum(1)
    mask_scores = mask_prob_sum / mask_area.clamp(min=1)

    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = pred_masks
    boxes = BitMasks(pred_masks).get_bounding_boxes()
    boxes.tensor = boxes.tensor.to(mask_pred.device)
    result.pred_boxes = boxes
    result.pred_classes = pred_classes
    result.scores = class_scores * mask_scores
    return result


def random_predictions(generator, num_queries, num_classes, size, dtype=torch.float32, confident=False,
                       duplicates=0):
    """Class and mask logits of one image. ``confident``: every query gets one class (sometimes
    "no object") with a large logit, as a trained model does, so most queries are kept.
    ``duplicates``: that many queries are copies of others (equal scores and masks: ties)."""
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=generator, dtype=dtype)
    if confident:
        chosen = torch.randint(0, num_classes + 1, (num_queries,), generator=generator)
        mask_cls[torch.arange(num_queries), chosen] += 6
    scale = torch.rand(num_queries, 1, 1, generator=generator, dtype=dtype) * 8
    mask_pred = torch.randn(num_queries, *size, generator=generator, dtype=dtype) * scale
    for copy in range(min(duplicates, num_queries - 1)):
        mask_cls[-1 - copy] = mask_cls[copy]
        mask_pred[-1 - copy] = mask_pred[copy]
    return mask_cls, mask_pred


def tiled_predictions(generator, num_queries, num_classes, size):
    """Confident predictions of a trained model: the image is cut into one region per query
    (nearest of random centres), each query's mask logit is +4 on its region and -4 elsewhere plus
    noise, and its class logit is +8 on one real class."""
    height, width = size
    centres = torch.rand(num_queries, 2, generator=generator) * torch.tensor([height, width])
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    distance = (ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2
    region = distance.argmin(0) == torch.arange(num_queries)[:, None, None]
    mask_pred = torch.where(region, 4.0, -4.0) + torch.randn(num_queries, height, width, generator=generator)
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=generator)
    mask_cls[torch.arange(num_queries), torch.randint(0, num_classes, (num_queries,), generator=generator)] += 8
    return mask_cls, mask_pred


def assert_same_panoptic(actual, expected):
    assert actual[0].dtype == expected[0].dtype == torch.int32
    assert torch.equal(actual[0], expected[0])
    assert actual[1] == expected[1]  # floats compared exactly
    for got, want in zip(actual[1], expected[1]):
        assert list(got) == list(want)
        assert all(type(got[k]) is type(want[k]) for k in want)


def assert_same_instances(actual, expected):
    assert actual.image_size == expected.image_size
    assert torch.equal(actual.pred_masks, expected.pred_masks)
    assert actual.pred_boxes.tensor.dtype == expected.pred_boxes.tensor.dtype
    assert torch.equal(actual.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    # the mask scores are summed in another order: equal to float rounding
    rtol = 1e-6 if expected.scores.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(actual.scores, expected.scores, rtol=rtol, atol=0, equal_nan=True)


RANDOM_CASES = [  # (queries, classes, size, dtype, confident, duplicates)
    (1, 1, (1, 1), torch.float32, True, 0),
    (2, 3, (4, 5), torch.float64, False, 1),
    (5, 3, (7, 13), torch.float32, True, 2),
    (7, 4, (16, 16), torch.float32, False, 0),
    (20, 20, (31, 33), torch.float32, True, 3),
    (20, 6, (25, 40), torch.float64, True, 5),
    (50, 10, (17, 19), torch.float32, True, 10),
    (100, 150, (48, 64), torch.float32, True, 4),  # many kept queries
]


@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_panoptic_inference_equals_reference_on_random_inputs(case):
    num_queries, num_classes, size, dtype, confident, duplicates = RANDOM_CASES[case]
    generator = torch.Generator().manual_seed(case)
    for trial in range(4):
        mask_cls, mask_pred = random_predictions(generator, num_queries, num_classes, size, dtype, confident,
                                                 duplicates)
        thing_ids = set(torch.randperm(num_classes, generator=generator)[: num_classes // 2 + trial % 2].tolist())
        for object_mask_threshold, overlap_threshold in [(0.0, 0.0), (0.5, 0.8), (0.8, 0.5), (0.2, 1.0)]:
            args = (mask_cls, mask_pred, thing_ids, object_mask_threshold, overlap_threshold)
            assert_same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))


@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_instance_inference_equals_reference_on_random_inputs(case):
    num_queries, num_classes, size, dtype, confident, duplicates = RANDOM_CASES[case]
    generator = torch.Generator().manual_seed(100 + case)
    for trial in range(4):
        mask_cls, mask_pred = random_predictions(generator, num_queries, num_classes, size, dtype, confident,
                                                 duplicates)
        thing_ids = None if trial % 2 else set(range(0, num_classes, 2))
        for topk in (1, 7, 100):
            args = (mask_cls, mask_pred, num_classes, topk, thing_ids)
            assert_same_instances(instance_inference(*args), reference_instance_inference(*args))


@pytest.mark.parametrize("num_queries, size", [(10, (13, 17)), (60, (40, 33))])
def test_panoptic_inference_equals_reference_on_tiled_inputs(num_queries, size):
    # Most queries kept and most segments kept; copied queries tie everywhere (the first one wins).
    generator = torch.Generator().manual_seed(num_queries)
    for _ in range(3):
        mask_cls, mask_pred = tiled_predictions(generator, num_queries, 8, size)
        mask_cls[-3:], mask_pred[-3:] = mask_cls[:3], mask_pred[:3]
        for thresholds in [(0.8, 0.8), (0.5, 0.3), (0.0, 0.0)]:
            args = (mask_cls, mask_pred, {0, 2, 4, 6}, *thresholds)
            reference = reference_panoptic_inference(*args)
            assert len(reference[1]) > 0
            assert_same_panoptic(panoptic_inference(*args), reference)


def test_vectorised_inference_equals_reference_on_many_kept_queries():
    # 100 confident queries on their own regions at 96 x 128: the case the loop was slow on.
    generator = torch.Generator().manual_seed(5)
    mask_cls, mask_pred = tiled_predictions(generator, 100, 150, (96, 128))
    thing_ids = set(range(0, 150, 2))
    args = (mask_cls, mask_pred, thing_ids, 0.8, 0.8)
    reference = reference_panoptic_inference(*args)
    assert len(reference[1]) > 50
    assert_same_panoptic(panoptic_inference(*args), reference)
    args = (mask_cls, mask_pred, 150, 100, thing_ids)
    assert_same_instances(instance_inference(*args), reference_instance_inference(*args))


def test_vectorised_inference_equals_reference_with_nan_logits():
    generator = torch.Generator().manual_seed(6)
    mask_cls, mask_pred = random_predictions(generator, 6, 4, (9, 10), confident=True)
    mask_pred[1, 2, 3] = mask_pred[4, 0, 0] = math.nan
    mask_pred[2, 5, 5] = math.inf
    mask_pred[3, 1, 1] = -math.inf
    for args in [(mask_cls, mask_pred, {0, 1}, 0.0, 0.0), (mask_cls, mask_pred, {2}, 0.3, 0.5)]:
        assert_same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))
    args = (mask_cls, mask_pred, 4, 10, None)
    assert_same_instances(instance_inference(*args), reference_instance_inference(*args))


def test_vectorised_inference_equals_reference_on_more_threads():
    # Which elements take sigmoid's vectorised or scalar CPU code path depends on how the work is
    # split between threads: the result must not.
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            generator = torch.Generator().manual_seed(threads)
            mask_cls, mask_pred = random_predictions(generator, 30, 10, (101, 103), confident=True, duplicates=2)
            args = (mask_cls, mask_pred, {0, 3, 5}, 0.3, 0.6)
            assert_same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))
            args = (mask_cls, mask_pred, 10, 50, None)
            assert_same_instances(instance_inference(*args), reference_instance_inference(*args))
    finally:
        torch.set_num_threads(previous)


def test_vectorised_inference_equals_reference_on_non_contiguous_logits():
    # MaskFormer crops padded mask logits ([:, :h, :w]); a transposed tensor has another layout.
    generator = torch.Generator().manual_seed(8)
    mask_cls, padded = tiled_predictions(generator, 12, 5, (40, 48))
    for mask_pred in (padded[:, :37, :45], padded.transpose(1, 2)):
        assert not mask_pred.is_contiguous()
        for threshold in (0.0, 0.9):
            args = (mask_cls, mask_pred, {0, 1}, threshold, 0.5)
            assert_same_panoptic(panoptic_inference(*args), reference_panoptic_inference(*args))
        args = (mask_cls, mask_pred, 5, 20, {0, 1})
        assert_same_instances(instance_inference(*args), reference_instance_inference(*args))


def reference_mask_wise_merge(labels, scores, mask_probs, thing_ids, alpha=1.0, beta=2.0, mask_threshold=0.5,
                              thing_quality_threshold=0.25, stuff_quality_threshold=0.25,
                              thing_overlap_threshold=0.4, stuff_overlap_threshold=0.2):
    """The mask-wise merge written as a plain loop over the masks, one at a time."""
    candidates = []
    for i in range(len(labels)):
        binary = mask_probs[i] > mask_threshold
        area = int(binary.sum())
        quality = float((mask_probs[i] * binary).sum()) / (area + 1)
        confidence = float(scores[i]) ** alpha * quality**beta
        isthing = int(labels[i]) in thing_ids
        if confidence >= (thing_quality_threshold if isthing else stuff_quality_threshold):
            candidates.append((-confidence, i, binary, area, isthing))
    candidates.sort(key=lambda c: (c[0], c[1]))
    panoptic_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.int32)
    segments_info, stuff_segment = [], {}
    for _, i, binary, area, isthing in candidates:
        overlap = int((binary & (panoptic_seg > 0)).sum())
        if area == 0 or overlap > (thing_overlap_threshold if isthing else stuff_overlap_threshold) * area:
            continue
        new_pixels = binary & (panoptic_seg == 0)
        if not new_pixels.any():
            continue
        label = int(labels[i])
        if not isthing and label in stuff_segment:
            info = stuff_segment[label]
            info["area"] += int(new_pixels.sum())
        else:
            info = {"id": len(segments_info) + 1, "isthing": isthing, "category_id": label,
                    "area": int(new_pixels.sum())}
            if isthing:
                info["score"] = float(scores[i])
            else:
                stuff_segment[label] = info
            segments_info.append(info)
        panoptic_seg[new_pixels] = info["id"]
    return panoptic_seg, segments_info


@pytest.mark.parametrize("seed", range(4))
def test_mask_wise_merge_equals_plain_loop_on_random_masks(seed):
    # Random overlapping blobs of random confidence: many masks dropped for overlap, stuff merged.
    generator = torch.Generator().manual_seed(seed)
    num_masks, size = 40, (30, 37)
    mask_cls, mask_pred = tiled_predictions(generator, num_masks, 6, size)
    shifted = torch.roll(mask_pred, shifts=(3, 4), dims=(1, 2))  # half of the masks overlap others
    mask_probs = torch.cat([mask_pred[: num_masks // 2], shifted[num_masks // 2:]]).sigmoid()
    labels = torch.randint(0, 6, (num_masks,), generator=generator)
    scores = torch.rand(num_masks, generator=generator) * 0.6 + 0.4
    for kwargs in [{}, {"thing_overlap_threshold": 0.8, "stuff_overlap_threshold": 0.5}, {"alpha": 0.5, "beta": 1.0}]:
        expected = reference_mask_wise_merge(labels, scores, mask_probs, {0, 1, 2}, **kwargs)
        assert len(expected[1]) > 5
        panoptic_seg, segments_info = mask_wise_merge(labels, scores, mask_probs, {0, 1, 2}, **kwargs)
        assert torch.equal(panoptic_seg, expected[0])
        _assert_segments(segments_info, expected[1])
