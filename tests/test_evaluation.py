"""Evaluators chosen by build_evaluator, fed the ground truth as predictions: PQ, mIoU and mask AP
must all be 100."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import rgb2id
from PIL import Image

from mask_former.evaluation import InstanceSegEvaluator, build_evaluator
from model_utils import tiny_cfg
from synthetic_utils import TEST_PREFIX


def ground_truth_outputs(record, num_classes, thing_contiguous):
    """The model outputs that reproduce the ground truth of one panoptic dataset record."""
    semantic = np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
    sem_scores = torch.nn.functional.one_hot(torch.from_numpy(semantic), num_classes).permute(2, 0, 1).float()

    id_map = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
    segments_info = [
        {"id": s["id"], "category_id": s["category_id"], "isthing": bool(s["isthing"])}
        for s in record["segments_info"]
    ]
    things = [s for s in record["segments_info"] if s["isthing"]]
    masks = torch.from_numpy(np.stack([id_map == s["id"] for s in things])) if things else \
        torch.zeros((0,) + id_map.shape, dtype=torch.bool)
    instances = Instances(id_map.shape)
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor([s["category_id"] for s in things], dtype=torch.int64)
    instances.scores = torch.ones(len(things))
    assert all(c in thing_contiguous for c in instances.pred_classes.tolist())
    return {
        "sem_seg": sem_scores,
        "panoptic_seg": (torch.from_numpy(id_map.astype(np.int32)), segments_info),
        "instances": instances,
    }


def run_evaluator(evaluator, dataset_name, make_output):
    evaluator.reset()
    for record in DatasetCatalog.get(dataset_name):
        inputs = {k: record[k] for k in ("file_name", "image_id", "height", "width")}
        evaluator.process([inputs], [make_output(record)])
    return evaluator.evaluate()


def test_ground_truth_scores_100_on_pq_miou_and_mask_ap(tiny_synthetic_root, tmp_path):
    name = f"{TEST_PREFIX}_panoptic_val"
    meta = MetadataCatalog.get(name)
    cfg = tiny_cfg(num_classes=len(meta.stuff_classes))
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    evaluator = build_evaluator(cfg, name, str(tmp_path))
    kinds = sorted(type(e).__name__ for e in evaluator._evaluators)
    assert kinds == ["COCOPanopticEvaluator", "CheckedSemSegEvaluator", "InstanceSegEvaluator"]

    thing_contiguous = set(meta.thing_dataset_id_to_contiguous_id.values())
    results = run_evaluator(
        evaluator, name, lambda r: ground_truth_outputs(r, len(meta.stuff_classes), thing_contiguous)
    )
    assert results["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert results["panoptic_seg"]["PQ_th"] == pytest.approx(100.0)
    assert results["panoptic_seg"]["PQ_st"] == pytest.approx(100.0)
    assert results["sem_seg"]["mIoU"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_wrong_predictions_score_below_100(tiny_synthetic_root, tmp_path):
    """The same pipeline must be able to fail: shift every class by one."""
    name = f"{TEST_PREFIX}_panoptic_val"
    meta = MetadataCatalog.get(name)
    num_classes = len(meta.stuff_classes)
    cfg = tiny_cfg(num_classes=num_classes)
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    evaluator = build_evaluator(cfg, name, str(tmp_path))

    def shifted(record):
        out = ground_truth_outputs(record, num_classes, set(meta.thing_dataset_id_to_contiguous_id.values()))
        out["sem_seg"] = out["sem_seg"].roll(1, dims=0)
        return out

    results = run_evaluator(evaluator, name, shifted)
    assert results["sem_seg"]["mIoU"] < 1.0


def test_instance_evaluator_maps_interleaved_thing_ids(tmp_path):
    """Thing classes that are not the first contiguous ids (ADE20K interleaves things and stuff):
    detectron2's COCOEvaluator rejects them; ours maps them back to dataset ids."""
    height, width = 20, 30
    square = np.zeros((height, width), dtype=np.uint8)
    square[2:10, 3:12] = 1
    disk = np.zeros((height, width), dtype=np.uint8)
    disk[12:18, 15:27] = 1
    annotations = []
    for i, (mask, cat) in enumerate([(square, 7), (disk, 9)]):
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        ys, xs = np.nonzero(mask)
        annotations.append({"id": i + 1, "image_id": 1, "category_id": cat, "segmentation": rle,
                            "area": int(mask.sum()), "iscrowd": 0,
                            "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
            "annotations": annotations,
            "categories": [{"id": 7, "name": "seven"}, {"id": 9, "name": "nine"}]}
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = "_test_interleaved_things"
    DatasetCatalog.register(name, lambda: [])
    # contiguous ids 3 and 1: things among stuff; thing_classes names every contiguous id, as the
    # ADE20K and COCO panoptic metadata do for the visualizer
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_classes=["wall", "nine", "sky", "seven"],
                                  thing_dataset_id_to_contiguous_id={7: 3, 9: 1}, evaluator_type="coco")
    evaluator = InstanceSegEvaluator(name, output_dir=str(tmp_path), distributed=False)
    evaluator.reset()
    instances = Instances((height, width))
    masks = torch.from_numpy(np.stack([square, disk]).astype(bool))
    instances.pred_masks = masks
    instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor([3, 1])
    instances.scores = torch.tensor([0.9, 0.8])
    evaluator.process([{"image_id": 1, "file_name": "a.png", "height": height, "width": width}],
                      [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP-seven"] == pytest.approx(100.0)
    assert results["segm"]["AP-nine"] == pytest.approx(100.0)

    # a stuff class (contiguous id 0) predicted as an instance is an error that names it
    evaluator.reset()
    instances.pred_classes = torch.tensor([0, 1])
    evaluator.process([{"image_id": 1, "file_name": "a.png", "height": height, "width": width}],
                      [{"instances": instances}])
    with pytest.raises(ValueError, match="class 0"):
        evaluator.evaluate()


def test_evaluator_choice_follows_enabled_tasks(tiny_synthetic_root, tmp_path):
    cfg = tiny_cfg(num_classes=8)
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    evaluator = build_evaluator(cfg, f"{TEST_PREFIX}_panoptic_val", str(tmp_path))
    assert [type(e).__name__ for e in evaluator._evaluators] == ["CheckedSemSegEvaluator"]
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    evaluator = build_evaluator(cfg, f"{TEST_PREFIX}_instance_val", str(tmp_path))
    assert [type(e).__name__ for e in evaluator._evaluators] == ["InstanceSegEvaluator"]
    MetadataCatalog.get("_test_no_evaluator_type")
    with pytest.raises(KeyError, match="evaluator_type"):
        build_evaluator(cfg, "_test_no_evaluator_type", str(tmp_path))
