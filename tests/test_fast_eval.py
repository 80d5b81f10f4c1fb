"""TEST.EVAL_BACKEND "hotcoco" (pip install .[fast-eval]) gives the metrics of pycocotools and
panopticapi to 1e-6: mask AP (AP, AP50, AP75, APs/m/l, per category) and PQ/SQ/RQ (all, things,
stuff, per class), on a small synthetic panoptic dataset (with its instance JSON) that the tests
generate, and predictions made from its ground truth with some segments cut or shifted (partial
overlaps), given a wrong class, dropped or invented."""
import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import sys
from pathlib import Path

import hotcoco.panoptic
import numpy as np
import panopticapi.evaluation
import pycocotools.mask
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import id2rgb
from PIL import Image

from mask_former.data.datasets.synthetic import generate_synthetic_dataset, register_synthetic_split
from mask_former.evaluation import HotcocoPanopticEvaluator, InstanceSegEvaluator, build_evaluator
from model_utils import tiny_cfg
from test_evaluation import ground_truth_outputs, run_evaluator

PREFIX = "test_fast_eval"
DATASET = f"{PREFIX}_panoptic_val"  # registered by the fixture `dataset`
TOLERANCE = 1e-6
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def cut(mask, rng, low):
    """``mask`` with its rows below a random fraction in [low, 1) of its height removed: the IoU
    with ``mask`` is about that fraction, so a prediction matches at some IoU thresholds only."""
    rows = np.nonzero(mask.any(axis=1))[0]
    keep = rows[: max(1, int(np.ceil(rng.uniform(low, 1.0) * len(rows))))]
    out = np.zeros_like(mask)
    out[keep] = mask[keep]
    return out


def perturbed_outputs(record, num_classes, thing_ids, stuff_ids):
    """Model outputs from the ground truth of ``record``, made wrong in a fixed (seeded) way:
    instances cut (partial overlaps), shifted, given another class or dropped, and an invented
    one; panoptic segments cut or shifted over their neighbours (their old pixels left void), or
    given another class."""
    rng = np.random.default_rng(record["image_id"])
    gt = ground_truth_outputs(record, num_classes, set(thing_ids))

    gt_instances = gt["instances"]
    masks, classes, scores = [], [], []
    for mask, label in zip(gt_instances.pred_masks.numpy(), gt_instances.pred_classes.tolist()):
        kind = rng.integers(6)
        if kind == 0:  # missed
            continue
        if kind in (1, 2):  # partial overlap
            mask = cut(mask, rng, 0.4)
        elif kind == 3:
            mask = np.roll(mask, tuple(rng.integers(1, 4, size=2)), axis=(0, 1))
        elif kind == 4:  # wrong class
            label = thing_ids[(thing_ids.index(label) + 1) % len(thing_ids)]
        masks.append(mask)
        classes.append(label)
        scores.append(rng.uniform(0.3, 1.0))
    height, width = gt_instances.image_size
    invented = np.zeros((height, width), dtype=bool)
    y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
    invented[y:y + 36, x:x + 36] = True  # of medium size
    masks.append(invented)
    classes.append(int(rng.choice(thing_ids)))
    scores.append(rng.uniform(0.0, 0.6))
    instances = Instances((height, width))
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.scores = torch.tensor(scores, dtype=torch.float32)

    id_map, segments_info = gt["panoptic_seg"]
    id_map = id_map.numpy().copy()
    segments = []
    for segment in segments_info:
        segment = dict(segment)
        mask = id_map == segment["id"]
        kind = rng.integers(5)
        if kind == 0:  # partial
            id_map[mask & ~cut(mask, rng, 0.3)] = 0
        elif kind == 1 and segment["isthing"]:  # over its neighbours
            id_map[mask] = 0
            id_map[np.roll(mask, tuple(rng.integers(1, 6, size=2)), axis=(0, 1))] = segment["id"]
        elif kind == 2:  # wrong class
            ids = thing_ids if segment["isthing"] else stuff_ids
            segment["category_id"] = ids[(ids.index(segment["category_id"]) + 1) % len(ids)]
        segments.append(segment)
    segments = [s for s in segments if (id_map == s["id"]).any()]
    return {"instances": instances, "panoptic_seg": (torch.from_numpy(id_map), segments)}


def copy_of(outputs):
    """``make_output`` for ``run_evaluator``: a copy, as COCOPanopticEvaluator converts the
    category ids of the segments in place."""
    return lambda record: copy.deepcopy(outputs[record["file_name"]])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(metadata, the perturbed outputs of each record of the dataset, by file name) of a small
    synthetic panoptic dataset with its instance JSON, large enough for medium-sized objects."""
    root = tmp_path_factory.mktemp("fast_eval_datasets")
    dataset_dir = generate_synthetic_dataset(root=str(root), num_train=0, num_val=6, image_size=192, seed=1)
    register_synthetic_split(dataset_dir, "val", prefix=PREFIX)
    meta = MetadataCatalog.get(DATASET)
    thing_ids = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    stuff_ids = sorted(set(meta.stuff_dataset_id_to_contiguous_id.values()) - set(thing_ids))
    outputs = {
        record["file_name"]: perturbed_outputs(record, len(meta.stuff_classes), thing_ids, stuff_ids)
        for record in DatasetCatalog.get(DATASET)
    }
    return meta, outputs


def evaluation_cfg(meta, backend=None):
    cfg = tiny_cfg(num_classes=len(meta.stuff_classes))
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    if backend is not None:
        cfg.TEST.EVAL_BACKEND = backend
    return cfg


def assert_equal_metrics(reference, fast, what):
    assert reference.keys() == fast.keys(), what
    for key, value in reference.items():
        if isinstance(value, dict):
            assert_equal_metrics(value, fast[key], f"{what}[{key!r}]")
        elif isinstance(value, float) and math.isnan(value):
            assert math.isnan(fast[key]), f"{what}[{key!r}]: nan != {fast[key]}"
        else:
            assert fast[key] == pytest.approx(value, abs=TOLERANCE, rel=0), f"{what}[{key!r}]"


def test_config_key_defaults_to_pycocotools(dataset, tmp_path):
    meta, _ = dataset
    cfg = evaluation_cfg(meta)
    assert cfg.TEST.EVAL_BACKEND == "pycocotools"
    evaluators = build_evaluator(cfg, DATASET, str(tmp_path))._evaluators
    assert sorted(type(e).__name__ for e in evaluators) == ["COCOPanopticEvaluator", "InstanceSegEvaluator"]
    assert [e._backend for e in evaluators if isinstance(e, InstanceSegEvaluator)] == ["pycocotools"]

    evaluators = build_evaluator(evaluation_cfg(meta, "hotcoco"), DATASET, str(tmp_path))._evaluators
    assert sorted(type(e).__name__ for e in evaluators) == ["HotcocoPanopticEvaluator", "InstanceSegEvaluator"]
    assert [e._backend for e in evaluators if isinstance(e, InstanceSegEvaluator)] == ["hotcoco"]


@pytest.mark.parametrize("value", ["fastcoco", "HotCoco", ""])
def test_bad_backend_is_an_error_naming_the_key(dataset, tmp_path, value):
    meta, _ = dataset
    with pytest.raises(ValueError, match=rf"TEST\.EVAL_BACKEND = '{value}'.*'pycocotools', 'hotcoco'"):
        build_evaluator(evaluation_cfg(meta, value), DATASET, str(tmp_path))
    with pytest.raises(ValueError, match=rf"backend = '{value}'.*'pycocotools', 'hotcoco'"):
        InstanceSegEvaluator(DATASET, output_dir=str(tmp_path), distributed=False, backend=value)


def test_hotcoco_missing_is_an_import_error_saying_how_to_install(dataset, tmp_path, monkeypatch):
    meta, _ = dataset
    monkeypatch.setitem(sys.modules, "hotcoco", None)  # `import hotcoco` raises ImportError
    with pytest.raises(ImportError, match=r"pip install \.\[fast-eval\].*hotcoco==1\.3\.0"):
        build_evaluator(evaluation_cfg(meta, "hotcoco"), DATASET, str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install \.\[fast-eval\]"):
        HotcocoPanopticEvaluator(DATASET, str(tmp_path))
    # the default needs no hotcoco
    assert len(build_evaluator(evaluation_cfg(meta), DATASET, str(tmp_path))._evaluators) == 2


def test_hotcoco_gives_the_metrics_of_pycocotools_and_panopticapi(dataset, tmp_path):
    meta, outputs = dataset
    results = {}
    for backend in ("pycocotools", "hotcoco"):
        evaluator = build_evaluator(evaluation_cfg(meta, backend), DATASET, str(tmp_path / backend))
        results[backend] = run_evaluator(evaluator, DATASET, copy_of(outputs))
    reference, fast = results["pycocotools"], results["hotcoco"]
    # the predictions are wrong enough to test something, and right enough; IoUs vary
    segm = reference["segm"]
    assert 5 < segm["AP"] < segm["AP50"] < 95 and segm["AP75"] < segm["AP50"]
    assert 5 < segm["APs"] < 95 and 5 < segm["APm"] < 95
    assert 5 < reference["panoptic_seg"]["PQ"] < 95
    assert 5 < reference["panoptic_seg"]["PQ_th"] < 95 and 5 < reference["panoptic_seg"]["PQ_st"] < 95
    assert list(reference["panoptic_seg"]) == list(fast["panoptic_seg"])  # detectron2's key order
    per_category = {k for k in reference["segm"] if k.startswith("AP-")}
    assert per_category == {f"AP-{name}" for name in meta.thing_classes}
    assert_equal_metrics(reference, fast, "results")


def write_panoptic_predictions(outputs, predictions_json, pred_folder):
    """The PNG files of the predictions in ``predictions_json`` (written by the evaluator), as
    COCOPanopticEvaluator names and writes them."""
    os.makedirs(pred_folder)
    for file_name, output in outputs.items():
        png = os.path.splitext(os.path.basename(file_name))[0] + ".png"
        Image.fromarray(id2rgb(output["panoptic_seg"][0].numpy())).save(os.path.join(pred_folder, png))
    assert len(json.loads(predictions_json.read_text())["annotations"]) == len(outputs)


def test_pq_per_class_equals_panopticapi(dataset, tmp_path):
    """Every number of pq_compute, per class included, on the files the evaluator wrote."""
    meta, outputs = dataset
    evaluator = HotcocoPanopticEvaluator(DATASET, str(tmp_path))
    run_evaluator(evaluator, DATASET, copy_of(outputs))
    predictions_json = tmp_path / "predictions.json"
    pred_folder = tmp_path / "predictions"
    write_panoptic_predictions(outputs, predictions_json, pred_folder)

    args = (meta.panoptic_json, str(predictions_json))
    kwargs = dict(gt_folder=meta.panoptic_root, pred_folder=str(pred_folder))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = panopticapi.evaluation.pq_compute(*args, **kwargs)
        fast = hotcoco.panoptic.pq_compute(*args, **kwargs)
    assert fast["per_class"] == evaluator.pq_results["per_class"]  # the evaluator's own call

    for group in ("All", "Things", "Stuff"):
        assert_equal_metrics(reference[group], {k: fast[group][k] for k in reference[group]}, group)
    assert reference["per_class"].keys() == fast["per_class"].keys()
    assert len(reference["per_class"]) == len(meta.stuff_classes)
    some_wrong = False
    for category_id, scores in reference["per_class"].items():
        fast_scores = fast["per_class"][category_id]
        if fast_scores["tp"] + fast_scores["fp"] + fast_scores["fn"] == 0:
            # a class on neither side: hotcoco says -1, panopticapi 0; both leave it out of the means
            assert scores == {"pq": 0.0, "sq": 0.0, "rq": 0.0} and fast_scores["pq"] == -1.0
            continue
        assert_equal_metrics(scores, {k: fast_scores[k] for k in scores}, f"per_class[{category_id}]")
        some_wrong |= scores["pq"] < 1.0
    assert some_wrong


@pytest.mark.parametrize("max_dets", [10, 300])
def test_mask_ap_with_a_detection_limit(dataset, tmp_path, max_dets):
    """max_dets_per_image other than 100, which detectron2 evaluates with its COCOevalMaxDets."""
    meta, outputs = dataset
    results = {}
    for backend in ("pycocotools", "hotcoco"):
        evaluator = InstanceSegEvaluator(DATASET, output_dir=str(tmp_path / backend), distributed=False,
                                         max_dets_per_image=max_dets, backend=backend)
        results[backend] = run_evaluator(evaluator, DATASET, copy_of(outputs))
    assert_equal_metrics(results["pycocotools"], results["hotcoco"], "results")


def test_fewer_than_10_detections_is_refused_with_hotcoco(dataset, tmp_path):
    """detectron2's maxDets [1, 10, N < 10] is not increasing, and hotcoco's per-category APs
    then differ from pycocotools' (measured: AP-ring 48.8 against 25.7 with N = 1)."""
    with pytest.raises(ValueError, match="max_dets_per_image = 5: backend 'hotcoco'.*'pycocotools'"):
        InstanceSegEvaluator(DATASET, output_dir=str(tmp_path), distributed=False, max_dets_per_image=5,
                             backend="hotcoco")



def uncompressed_rle(mask):
    """The mask as COCO's uncompressed RLE (run lengths in column-major order, zeros first), the
    form of crowd annotations in COCO's JSON files."""
    flat = np.asfortranarray(mask).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def test_polygon_and_crowd_ground_truth(dataset, tmp_path):
    """COCO's other annotation forms: polygons (one of them degenerate, dropped from both
    backends' ground truth) and crowd regions in uncompressed RLE."""
    meta, outputs = dataset
    coco = json.loads(open(meta.json_file).read())
    for i, annotation in enumerate(coco["annotations"]):
        x, y, w, h = annotation["bbox"]
        if i % 3 == 1:  # the box as a polygon, and a degenerate polygon on the first one
            annotation["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            annotation["area"] = w * h
            if i == 1:
                annotation["segmentation"].append([x, y, x + 1, y + 1])
        elif i % 5 == 2:
            mask = pycocotools.mask.decode(annotation["segmentation"]).astype(bool)
            rle = uncompressed_rle(mask)
            assert (pycocotools.mask.decode(pycocotools.mask.frPyObjects(rle, *rle["size"])) == mask).all()
            annotation["segmentation"], annotation["iscrowd"] = rle, 1
    assert {a["iscrowd"] for a in coco["annotations"]} == {0, 1}
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = f"{PREFIX}_polygons"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="coco", thing_classes=meta.thing_classes,
                                  thing_dataset_id_to_contiguous_id=meta.thing_dataset_id_to_contiguous_id)
    results = {}
    for backend in ("pycocotools", "hotcoco"):
        evaluator = InstanceSegEvaluator(name, output_dir=str(tmp_path / backend), distributed=False, backend=backend)
        results[backend] = run_evaluator(evaluator, DATASET, copy_of(outputs))
    assert 5 < results["pycocotools"]["segm"]["AP"] < 95
    assert_equal_metrics(results["pycocotools"], results["hotcoco"], "results")

def test_benchmark_tool_times_both_backends(dataset, tmp_path):
    """tools/benchmark_evaluation.py (README "Speed") on this dataset: both backends timed, same metrics."""
    spec = importlib.util.spec_from_file_location("tool_benchmark_evaluation", TOOLS / "benchmark_evaluation.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    json_file = tmp_path / "bench.json"
    results = tool.main(["--dataset", DATASET, "--runs", "1", "--warmup", "0", "--json", str(json_file)])
    assert json.loads(json_file.read_text()) == json.loads(json.dumps(results))
    rows = {(row["backend"], row["task"]): row for row in results["rows"]}
    assert set(rows) == {(b, t) for b in ("pycocotools", "hotcoco") for t in ("instance", "panoptic")}
    for row in rows.values():
        assert row["evaluate_s"] > 0 and row["max_abs_diff"] <= TOLERANCE and 0 < row["main_metric"] < 100
