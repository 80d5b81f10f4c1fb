"""Where a panoptic model loses its things (mask_former/evaluation/thing_errors.py and
tools/analyze_thing_errors.py): counts on a hand-built image, and the tool on the tiny synthetic
val set against the things of its annotations."""
import importlib.util
import json

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Instances

from mask_former import add_mask_former_config
from mask_former.evaluation.thing_errors import ThingErrorCounter
from model_utils import CONFIG_DIR
from synthetic_utils import TEST_PREFIX
from train_utils import REPO_ROOT


def square(top, left, size, shape=(8, 8)):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    return mask


def hand_built_image():
    """Things A (class 0, 4 px), B (class 0, 9 px), C (class 1, 4 px) and stuff (class 2).

    panoptic_seg: segment 1 = A (found); segment 2 (class 0) = B plus 12 more pixels, IoU 9 / 21
    with B; segment 3 (class 1) far from C; segment 4 the stuff. instances: B's exact mask with
    class 0 (B is dropped, under segment 2: "same class") and C's exact mask with class 0 (the
    wrong class: C is missed).
    """
    a, b, c = square(0, 0, 2), square(4, 4, 3), square(0, 6, 2)
    stuff = ~(a | b | c)
    gt_masks = torch.stack([a, b, c, stuff])
    gt_classes = torch.tensor([0, 0, 1, 2])
    panoptic_seg = torch.full((8, 8), 4, dtype=torch.int32)
    panoptic_seg[a] = 1
    segment_2 = b.clone()
    segment_2[3:7, 3] = True  # 4 more pixels
    segment_2[3, 4:7] = True  # 3 more
    segment_2[7, 3:8] = True  # 5 more: 21 in all
    panoptic_seg[segment_2] = 2
    panoptic_seg[6:8, 0:2] = 3
    segments_info = [{"id": 1, "category_id": 0, "isthing": True}, {"id": 2, "category_id": 0, "isthing": True},
                     {"id": 3, "category_id": 1, "isthing": True}, {"id": 4, "category_id": 2, "isthing": False}]
    instances = Instances((8, 8))
    instances.pred_masks = torch.stack([b, c])
    instances.pred_classes = torch.tensor([0, 0])
    return gt_masks, gt_classes, panoptic_seg, segments_info, instances, segment_2


def test_counts_on_a_hand_built_image():
    gt_masks, gt_classes, panoptic_seg, segments_info, instances, segment_2 = hand_built_image()
    assert int(segment_2.sum()) == 21 and int((segment_2 & gt_masks[1]).sum()) == 9  # IoU 9 / 21 <= 0.5
    counter = ThingErrorCounter(thing_ids=[0, 1], area_bins=[5])
    counter.add(gt_masks, gt_classes, panoptic_seg, segments_info, instances)
    summary = counter.summary()
    assert summary["bins"]["[0, 5)"] == {"things": 2, "found": 1, "dropped": 0, "missed": 1}  # A, C
    assert summary["bins"]["[5, inf)"] == {"things": 1, "found": 0, "dropped": 1, "missed": 0}  # B
    assert summary["bins"]["all"] == {"things": 3, "found": 1, "dropped": 1, "missed": 1}
    assert summary["dropped_under"] == {"void": 0, "same class": 1, "other thing class": 0, "stuff": 0}
    assert summary["predicted_thing_segments"] == 3
    assert summary["false_thing_segments"] == 2  # segments 2 and 3

    # without instances, what is not found is missed; a second image adds up
    counter.add(gt_masks, gt_classes, panoptic_seg, segments_info, None)
    summary = counter.summary()
    assert summary["bins"]["all"] == {"things": 6, "found": 2, "dropped": 1, "missed": 3}
    assert summary["predicted_thing_segments"] == 6 and summary["false_thing_segments"] == 4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="area_bins must be increasing"):
        ThingErrorCounter([0], area_bins=[100, 50])
    gt_masks, gt_classes, panoptic_seg, segments_info, instances, _ = hand_built_image()
    with pytest.raises(ValueError, match=r"ground-truth masks of size \(8, 8\) but panoptic_seg of size \(4, 4\)"):
        ThingErrorCounter([0, 1]).add(gt_masks, gt_classes, panoptic_seg[:4, :4], segments_info, instances)


def load_tool():
    path = REPO_ROOT / "tools" / "analyze_thing_errors.py"
    spec = importlib.util.spec_from_file_location("tool_analyze_thing_errors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_counts_every_ground_truth_thing(tiny_synthetic_root, tmp_path, monkeypatch, one_thread):
    """On the tiny val set, with a MaskFormer's random weights: every non-crowd thing of the
    annotations is counted once, in the bin of its area, and the JSON holds the printed counts."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_synthetic_root))
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / "synthetic" / "maskformer_panoptic_R18.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    weights = tmp_path / "random.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    dataset = f"{TEST_PREFIX}_panoptic_val"
    records = DatasetCatalog.get(dataset)
    areas = [s["area"] for r in records for s in r["segments_info"] if s["isthing"] and not s.get("iscrowd", 0)]
    assert areas

    out = tmp_path / "errors.json"
    summary = load_tool().main(["--config-file", str(CONFIG_DIR / "synthetic" / "maskformer_panoptic_R18.yaml"),
                                "--dataset", dataset, "--area-bins", "100,400", "--json", str(out),
                                "MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"])
    assert summary["images"] == len(records)
    bins = summary["bins"]
    assert bins["all"]["things"] == len(areas)
    assert bins["[0, 100)"]["things"] == sum(a < 100 for a in areas)
    assert bins["[400, inf)"]["things"] == sum(a >= 400 for a in areas)
    for counts in bins.values():
        assert counts["found"] + counts["dropped"] + counts["missed"] == counts["things"]
    assert sum(summary["dropped_under"].values()) == bins["all"]["dropped"]
    assert json.loads(out.read_text()) == summary


def test_tool_names_a_dataset_without_panoptic_ground_truth():
    with pytest.raises(ValueError, match="dataset 'my_sem_seg': img_7.png has no panoptic ground truth"):
        load_tool().ground_truth({"file_name": "img_7.png", "sem_seg_file_name": "img_7_label.png"}, "my_sem_seg")
    with pytest.raises(SystemExit):
        load_tool().get_parser().parse_args(["--config-file", "c.yaml", "--area-bins", "300;1000"])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        load_tool().main(["--config-file", str(CONFIG_DIR / "synthetic" / "maskformer_panoptic_R18.yaml"),
                          "MODEL.WEIGHTS", ""])
