"""Post-processing on constructed logits whose answers are worked out by hand below.

Class logits are written as ``log(probabilities)`` and mask logits as ``logit(probabilities)``,
so the softmax / sigmoid the code applies gives back exactly the probabilities written here.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from mask_former.modeling.postprocessing import (
    instance_inference,
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
