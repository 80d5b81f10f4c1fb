#!/usr/bin/env python
"""Time of the vectorised post-processing against the loop implementations it replaced.

    python tools/benchmark_postprocessing.py --input-size 512 512 --runs 9 --json post.json

On one image's outputs as a trained model gives them (``tools/benchmark.py``'s
``confident_predictions``: Q queries, each +4 on its own region and -4 elsewhere plus noise, its
class logit +8 on one real class; every other class a thing), this times, interleaved in each
round, ``panoptic_inference`` (pixel-wise merge) and ``instance_inference`` of
``mask_former.modeling.postprocessing`` against ``reference_panoptic_inference`` and
``reference_instance_inference`` of ``tests/test_postprocessing.py``: straightforward versions
(a loop over the kept queries; ``BitMasks`` boxes and full-tensor products) that the tests
compare the library with. It prints the median and fastest time of each, the ratio of the
medians, and whether the outputs agree (panoptic: identical; instance: identical masks, boxes
and classes, the largest score difference). No model runs.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch
from tabulate import tabulate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark import confident_predictions  # noqa: E402

from mask_former.modeling import postprocessing  # noqa: E402
from mask_former.utils.cpu_info import cpu_family_model, cpu_model, huge_pages  # noqa: E402


def load_references():
    """The loop implementations of ``tests/test_postprocessing.py`` (a module of a source checkout)."""
    path = os.path.join(ROOT, "tests", "test_postprocessing.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: this tool needs the tests of a source checkout")
    spec = importlib.util.spec_from_file_location("postprocessing_references", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_panoptic_inference, module.reference_instance_inference


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time the post-processing against its loop references")
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--object-mask-threshold", type=float, default=0.8)
    parser.add_argument("--overlap-threshold", type=float, default=0.8)
    parser.add_argument("--topk", type=int, default=100, help="instances per image")
    parser.add_argument("--runs", type=int, default=9, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def time_interleaved(functions: Dict[str, Callable[[], object]], runs: int, warmup: int) -> Dict[str, Dict]:
    """Seconds per call of each function, called in turn in every round."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs": runs} for name, t in times.items()}


def main(args) -> Dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    reference_panoptic, reference_instance = load_references()
    height, width = args.input_size
    mask_cls, mask_pred = confident_predictions(args.num_queries, args.num_classes, height, width, "cpu")
    thing_ids = set(range(0, args.num_classes, 2))
    panoptic_args = (mask_cls, mask_pred, thing_ids, args.object_mask_threshold, args.overlap_threshold)
    instance_args = (mask_cls, mask_pred, args.num_classes, args.topk, thing_ids)
    functions = {
        "panoptic reference": lambda: reference_panoptic(*panoptic_args),
        "panoptic": lambda: postprocessing.panoptic_inference(*panoptic_args),
        "instance reference": lambda: reference_instance(*instance_args),
        "instance": lambda: postprocessing.instance_inference(*instance_args),
    }
    with torch.no_grad():
        results = time_interleaved(functions, args.runs, args.warmup)
        panoptic, expected_panoptic = functions["panoptic"](), functions["panoptic reference"]()
        instances, expected_instances = functions["instance"](), functions["instance reference"]()
    results["panoptic"]["identical"] = bool(
        torch.equal(panoptic[0], expected_panoptic[0]) and panoptic[1] == expected_panoptic[1])
    results["panoptic"]["segments"] = len(panoptic[1])
    results["instance"]["identical_masks_boxes_classes"] = bool(
        torch.equal(instances.pred_masks, expected_instances.pred_masks)
        and torch.equal(instances.pred_boxes.tensor, expected_instances.pred_boxes.tensor)
        and torch.equal(instances.pred_classes, expected_instances.pred_classes))
    results["instance"]["max_score_diff"] = float((instances.scores - expected_instances.scores).abs().max())
    for task in ("panoptic", "instance"):
        results[task]["ratio"] = results[task]["median_s"] / results[f"{task} reference"]["median_s"]
    results["setup"] = {"input_size": [height, width], "num_queries": args.num_queries,
                        "num_classes": args.num_classes, "threads": torch.get_num_threads(), "cpu": cpu_model(),
                        "cpu_family_model": cpu_family_model(), "huge_pages": huge_pages(),
                        "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def print_results(results: Dict) -> None:
    rows = []
    for name in ("panoptic reference", "panoptic", "instance reference", "instance"):
        entry = results[name]
        ratio = f"{entry['ratio']:.2f}x" if "ratio" in entry else "1.00x"
        rows.append([name, f"{entry['median_s'] * 1e3:.1f}", f"{entry['min_s'] * 1e3:.1f}", ratio])
    print(tabulate(rows, headers=["function", "median ms", "fastest ms", "ratio"]))
    print(f"panoptic identical to the reference: {results['panoptic']['identical']} "
          f"({results['panoptic']['segments']} segments); instance masks, boxes, classes identical: "
          f"{results['instance']['identical_masks_boxes_classes']}, largest score difference "
          f"{results['instance']['max_score_diff']:.2e}")
    setup = results["setup"]
    print(f"{setup['input_size'][0]}x{setup['input_size'][1]}, {setup['num_queries']} queries, "
          f"{setup['num_classes']} classes, {setup['threads']} threads, {setup['cpu']}, {setup['cpu_family_model']}, "
          f"huge pages {setup['huge_pages']}, torch {setup['torch']}")


if __name__ == "__main__":
    args = get_parser().parse_args()
    print_results(main(args))
