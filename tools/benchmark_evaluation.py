#!/usr/bin/env python
"""Time of mask AP and PQ with each TEST.EVAL_BACKEND ("pycocotools": pycocotools and
panopticapi; "hotcoco": ``pip install .[fast-eval]``) on a registered panoptic dataset with an
instance JSON (the built-in synthetic val set by default), and how far apart their metrics are.

    python tools/benchmark_evaluation.py --dataset synthetic_panoptic_val --runs 5 --json eval_bench.json

The predictions are the dataset's ground truth made wrong in a fixed (seeded) way, so that every
metric is between 0 and 100: instances and panoptic segments cut (partial overlaps), shifted over
their neighbours, given another class or dropped, plus one invented instance per image. No model
runs. Per backend and task, the evaluators are built as ``build_evaluator`` builds them (their
ground truth loaded: ``build_s``), fed the predictions (``process_s``: detectron2's code, the
same for both backends), and ``evaluate()`` is timed: ``evaluate_s`` the median and
``evaluate_min_s`` the fastest of ``--runs`` rounds after ``--warmup`` (the backends interleaved
in each round), ``evaluate_cpu_s`` the median CPU time of this process and of the processes it
waited for (panopticapi computes PQ in a pool of one process per CPU). ``max_abs_diff`` is the
largest difference between a backend's metrics and pycocotools' (percent points).
"""
import argparse
import contextlib
import io
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import rgb2id
from PIL import Image
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former import add_mask_former_config  # noqa: E402
from mask_former.evaluation import EVAL_BACKENDS, build_evaluator  # noqa: E402
from mask_former.utils.cpu_info import cpu_model  # noqa: E402

# result key of each task's metrics in the evaluators' results dict
TASK_KEYS = {"instance": "segm", "panoptic": "panoptic_seg"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time mask AP and PQ with each evaluation backend")
    parser.add_argument("--dataset", default="synthetic_panoptic_val",
                        help="a registered panoptic dataset whose metadata names an instance JSON")
    parser.add_argument("--backends", default=",".join(EVAL_BACKENDS), help="comma-separated TEST.EVAL_BACKEND values")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--seed", type=int, default=0, help="of the errors put into the predictions")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def _cut(mask: np.ndarray, rng, low: float) -> np.ndarray:
    """``mask`` without its rows below a random fraction in [low, 1) of its height."""
    rows = np.nonzero(mask.any(axis=1))[0]
    out = np.zeros_like(mask)
    keep = rows[: max(1, int(np.ceil(rng.uniform(low, 1.0) * len(rows))))]
    out[keep] = mask[keep]
    return out


def perturbed_outputs(record: dict, thing_ids: List[int], stuff_ids: List[int], rng) -> dict:
    """"instances" and "panoptic_seg" outputs made from the ground truth of a panoptic record."""
    id_map = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"))).astype(np.int32)
    height, width = id_map.shape

    masks, classes, scores = [], [], []
    for segment in record["segments_info"]:
        if not segment["isthing"]:
            continue
        mask, label, kind = id_map == segment["id"], segment["category_id"], rng.integers(6)
        if kind == 0:  # missed
            continue
        if kind in (1, 2):
            mask = _cut(mask, rng, 0.4)
        elif kind == 3:
            mask = np.roll(mask, tuple(rng.integers(1, 4, size=2)), axis=(0, 1))
        elif kind == 4:
            label = thing_ids[(thing_ids.index(label) + 1) % len(thing_ids)]
        masks.append(mask)
        classes.append(label)
        scores.append(rng.uniform(0.3, 1.0))
    invented = np.zeros((height, width), dtype=bool)
    y, x = rng.integers(0, max(1, height - height // 4)), rng.integers(0, max(1, width - width // 4))
    invented[y:y + height // 5, x:x + width // 5] = True
    masks.append(invented)
    classes.append(int(rng.choice(thing_ids)))
    scores.append(rng.uniform(0.0, 0.6))
    instances = Instances((height, width))
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    instances.pred_boxes = BitMasks(instances.pred_masks).get_bounding_boxes()
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.scores = torch.tensor(scores, dtype=torch.float32)

    segments = []
    for segment in record["segments_info"]:
        segment = {"id": segment["id"], "category_id": segment["category_id"], "isthing": bool(segment["isthing"])}
        mask, kind = id_map == segment["id"], rng.integers(5)
        if kind == 0:
            id_map[mask & ~_cut(mask, rng, 0.3)] = 0
        elif kind == 1 and segment["isthing"]:
            id_map[mask] = 0
            id_map[np.roll(mask, tuple(rng.integers(1, 6, size=2)), axis=(0, 1))] = segment["id"]
        elif kind == 2:
            ids = thing_ids if segment["isthing"] else stuff_ids
            segment["category_id"] = ids[(ids.index(segment["category_id"]) + 1) % len(ids)]
        segments.append(segment)
    segments = [s for s in segments if (id_map == s["id"]).any()]
    return {"instances": instances, "panoptic_seg": (torch.from_numpy(id_map), segments)}


def _copy(output: dict) -> dict:
    """The output with its own segments: COCOPanopticEvaluator converts their ids in place."""
    id_map, segments = output["panoptic_seg"]
    return dict(output, panoptic_seg=(id_map, [dict(s) for s in segments]))


def evaluation_cfg(num_classes: int, backend: str):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"  # its tasks: MODEL.MASK_FORMER.TEST.*_ON
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.TEST.EVAL_BACKEND = backend
    return cfg


def _cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _max_abs_diff(a: Dict[str, float], b: Dict[str, float]) -> float:
    """Largest |a - b| over the metrics (nan equal to nan; a nan against a number: inf)."""
    worst = 0.0
    for key in a.keys() | b.keys():
        x, y = a.get(key, math.nan), b.get(key, math.nan)
        if math.isnan(x) and math.isnan(y):
            continue
        worst = max(worst, abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf)
    return worst


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in EVAL_BACKENDS for b in backends):
        parser.error(f"--backends {args.backends!r}: choose from {', '.join(EVAL_BACKENDS)}")
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    metadata = MetadataCatalog.get(args.dataset)
    records = DatasetCatalog.get(args.dataset)
    thing_ids = sorted(metadata.thing_dataset_id_to_contiguous_id.values())
    stuff_ids = sorted(set(metadata.stuff_dataset_id_to_contiguous_id.values()) - set(thing_ids))
    rng = np.random.default_rng(args.seed)
    inputs = [{k: r[k] for k in ("file_name", "image_id", "height", "width")} for r in records]
    outputs = [perturbed_outputs(r, thing_ids, stuff_ids, rng) for r in records]
    num_classes = len(metadata.stuff_classes)

    rows = {(b, t): {"evaluate_s": [], "evaluate_cpu_s": [], "process_s": []} for b in backends for t in TASK_KEYS}
    metrics = {}
    with tempfile.TemporaryDirectory(prefix="eval_bench") as output_dir:
        evaluators = {}
        for backend in backends:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                built = build_evaluator(evaluation_cfg(num_classes, backend), args.dataset,
                                        os.path.join(output_dir, backend))._evaluators
            build_s = time.perf_counter() - start
            for evaluator in built:
                task = "panoptic" if "Panoptic" in type(evaluator).__name__ else "instance"
                evaluators[backend, task] = evaluator
                rows[backend, task]["build_s"] = build_s  # both tasks' evaluators together
        for round_index in range(args.warmup + args.runs):
            for backend in backends:
                for task in TASK_KEYS:
                    evaluator, row = evaluators[backend, task], rows[backend, task]
                    evaluator.reset()
                    start = time.perf_counter()
                    for inp, out in zip(inputs, outputs):
                        evaluator.process([inp], [_copy(out)])
                    process_s = time.perf_counter() - start
                    start, cpu_start = time.perf_counter(), _cpu_seconds()
                    with contextlib.redirect_stdout(io.StringIO()):
                        result = evaluator.evaluate()
                    evaluate_s, evaluate_cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu_start
                    metrics[backend, task] = dict(result[TASK_KEYS[task]])
                    if round_index >= args.warmup:
                        row["evaluate_s"].append(evaluate_s)
                        row["evaluate_cpu_s"].append(evaluate_cpu_s)
                        row["process_s"].append(process_s)

    reference = backends[0]
    results = {"dataset": args.dataset, "images": len(records), "cpu_model": cpu_model(),
               "logical_cpus": os.cpu_count(), "runs": args.runs, "warmup": args.warmup, "rows": []}
    for (backend, task), row in rows.items():
        evaluate_s = statistics.median(row["evaluate_s"])
        reference_s = statistics.median(rows[reference, task]["evaluate_s"])
        results["rows"].append({
            "backend": backend,
            "task": task,
            "build_s": row["build_s"],
            "process_s": statistics.median(row["process_s"]),
            "evaluate_s": evaluate_s,
            "evaluate_min_s": min(row["evaluate_s"]),
            "evaluate_cpu_s": statistics.median(row["evaluate_cpu_s"]),
            "ratio": evaluate_s / reference_s,
            "max_abs_diff": _max_abs_diff(metrics[reference, task], metrics[backend, task]),
            "main_metric": metrics[backend, task]["AP" if task == "instance" else "PQ"],
        })
    results["rows"].sort(key=lambda r: (r["task"], r["backend"] != reference))
    print(f"{args.dataset}: {len(records)} images; {results['cpu_model']}, {results['logical_cpus']} logical CPUs; "
          f"median of {args.runs} rounds after {args.warmup}")
    print(tabulate([list(r.values()) for r in results["rows"]], headers=list(results["rows"][0]), floatfmt=".4g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
