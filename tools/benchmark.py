#!/usr/bin/env python
"""Speed and memory of a MaskFormer model on synthetic data (random weights, random images).

    python tools/benchmark.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --input-size 512 512 --device cuda --batch-size 2 --runs 20 --json bench.json [KEY VALUE ...]
    python tools/benchmark.py ... --precision bf16      # the network in bfloat16 for inference

Measures, each as the median (and mean, min) of --runs timed runs after --warmup untimed ones:

* inference: one forward pass of a batch in eval mode, pre- and post-processing included;
  images/s = batch size / median;
* train_iteration: forward, backward and optimizer step on a batch of random images with a few
  random ground-truth masks each; peak memory is ``torch.cuda.max_memory_allocated`` on GPU
  and the process's peak resident set size (``resource.getrusage``, since process start) on CPU;
* matcher: ``model.criterion.matcher`` on that batch's final-layer outputs and targets (a
  Panoptic SegFormer: all of its criterion's matching, every location-decoder layer's box matching
  and the thing mask decoder's matching);
* postprocessing: ``semantic_inference`` / ``panoptic_inference`` / ``instance_inference`` of
  ``mask_former.modeling.postprocessing`` on one image's outputs (random weights: the panoptic
  and instance costs depend on how many queries survive, so treat them as indicative); a Panoptic
  SegFormer's ``inference`` (mask-wise merging and the three outputs) instead;
* postprocessing_many_kept: the same functions plus the mask-wise panoptic merge
  (``mask_wise_panoptic_inference``) on constructed confident outputs at --input-size with the
  config's Q queries and K classes, as a trained model gives them: the image is cut into one
  region per query, each query's mask logit is +4 on its region and -4 elsewhere (plus noise) and
  its class logit +8 on one real class, so nearly every query is kept (every other class is a
  thing); the thresholds are the config's;
* assignment: ``linear_sum_assignment_torch`` against ``scipy.optimize.linear_sum_assignment``
  (including the copy of the cost to the CPU, as the matcher does) on random costs of 100
  queries x T targets, T in 1, 10, 50, 100, for one image and for a batch of 8 (one batched
  call against 8 scipy calls).

``--parts`` picks what to run (default: all): ``model`` (the first four, which build the model),
``postprocessing`` (postprocessing_many_kept) and ``assignment`` (these two build no model).

``--compare`` instead runs the side-by-side comparisons of today's reference path with the
optimised ones, in one process each, on the same weights and inputs, and prints every figure
with its ratio to the reference and the outputs' agreement; memory per path in a fresh
subprocess (``--no-memory`` skips it):

* inference (``tools/benchmark_inference.py``): reference (fp32, no folding, the original
  post-processing), fp32 (the exact optimised path), bf16;
* training (``tools/benchmark_training.py``, batch ``--batch-size``, ``--num-gt-masks`` masks
  per image): reference (full-resolution losses, image-by-image matcher, the modules as built),
  full (batched matcher, channels-last convolutions with the frozen batch norms folded), points
  (point-sampled losses and costs), points_bf16 (and bf16 autocast).
"""
import argparse
import importlib.util
import json
import logging
import os
import resource
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from scipy.optimize import linear_sum_assignment
from tabulate import tabulate
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former import add_mask_former_config  # noqa: E402
from mask_former.cli.precision import add_precision_argument, apply_precision  # noqa: E402
from mask_former.modeling import postprocessing  # noqa: E402
from mask_former.modeling.assignment import linear_sum_assignment_torch  # noqa: E402
from mask_former.modeling.panoptic_segformer import PanopticSegFormerCriterion  # noqa: E402
from mask_former.modeling.postprocessing import (  # noqa: E402
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from mask_former.solver import build_optimizer  # noqa: E402

logger = logging.getLogger("mask_former.benchmark")

REDUCED = {"runs": 2, "warmup": 0}
PARTS = ("model", "postprocessing", "assignment")
ASSIGNMENT_QUERIES = 100
ASSIGNMENT_TARGETS = (1, 10, 50, 100)
ASSIGNMENT_BATCH = 8


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark a MaskFormer model on synthetic data")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", nargs=2, type=int, required=True, metavar=("H", "W"))
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before them")
    parser.add_argument("--num-gt-masks", type=int, default=5, help="ground-truth masks per training image")
    parser.add_argument("--num-threads", type=int,
                        help="CPU threads for torch (default: torch's choice); 1 gives steadier "
                        "numbers on a busy machine")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all): model = inference, training "
                        "iteration, matcher and post-processing on the model's outputs; "
                        "postprocessing = post-processing on constructed confident outputs; "
                        "assignment = the PyTorch assignment solver against scipy")
    parser.add_argument("--compare", action="store_true",
                        help="compare today's reference path with the optimised paths (inference and "
                        "training, see the module docstring) instead of --parts")
    add_precision_argument(parser, what="the inference measured by --parts model (--compare runs both)")
    parser.add_argument("--no-memory", action="store_true", help="with --compare: skip the memory subprocesses")
    parser.add_argument("--reduced", action="store_true",
                        help=f"tiny run for tests: {REDUCED['runs']} runs, {REDUCED['warmup']} warm-up")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    height, width = args.input_size
    if height < 1 or width < 1:
        parser.error(f"--input-size must be positive, got {height} {width}")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    for name in ("batch_size", "runs", "num_gt_masks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    if args.compare and args.precision:
        parser.error("--precision: --compare runs the fp32 and the bf16 path side by side; drop one of them")


def setup_cfg(args):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    apply_precision(cfg, args)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = ""  # timings do not depend on the weights
    cfg.freeze()
    return cfg


def time_runs(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> Dict[str, float]:
    """Seconds per call of ``fn``: median, mean and min of ``runs`` calls after ``warmup`` calls."""
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "min_s": min(times),
            "runs": runs}


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, num_masks: int,
                    seed: int = 0) -> List[Dict]:
    """Random images (3 x H x W, 0..255) with ``num_masks`` random rectangles of random classes
    as ground truth (``instances.gt_classes``, ``instances.gt_masks``), as a dataset mapper gives."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, height, width), generator=generator).float()
        masks = torch.zeros((num_masks, height, width), dtype=torch.bool)
        for mask in masks:
            y0 = int(torch.randint(0, height, (1,), generator=generator))
            x0 = int(torch.randint(0, width, (1,), generator=generator))
            y1 = int(torch.randint(y0 + 1, height + 1, (1,), generator=generator))
            x1 = int(torch.randint(x0 + 1, width + 1, (1,), generator=generator))
            mask[y0:y1, x0:x1] = True
        instances = Instances((height, width))
        instances.gt_classes = torch.randint(0, num_classes, (num_masks,), generator=generator)
        instances.gt_masks = masks
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def peak_memory_mb(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    # ru_maxrss is in KiB on Linux
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "process peak RSS (resource.getrusage, since process start)"}


class _Capture:
    """Records the arguments of one module call (a forward pre-hook) or its output (a forward hook)."""

    def __init__(self):
        self.args = None
        self.output = None

    def pre_hook(self, module, args):
        self.args = args

    def hook(self, module, args, output):
        self.output = output


def benchmark_inference(model, batch, runs, warmup) -> Dict[str, float]:
    model.eval()
    inputs = [{"image": x["image"], "height": x["height"], "width": x["width"]} for x in batch]
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    with torch.no_grad():
        result = time_runs(lambda: model(inputs), runs, warmup, model.device)
    result["images_per_s"] = len(batch) / result["median_s"]
    if model.device.type == "cuda":
        result.update(peak_memory_mb(model.device))
    return result


def benchmark_training(cfg, model, batch, runs, warmup) -> Dict[str, object]:
    model.train()
    optimizer = build_optimizer(cfg, model)

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    result = time_runs(step, runs, warmup, model.device)
    result.update(peak_memory_mb(model.device))
    return result


def benchmark_matcher(model, batch, runs, warmup) -> Dict[str, float]:
    """Time ``model.criterion.matcher`` on the final-layer outputs and targets the criterion gets."""
    model.train()
    capture = _Capture()
    handle = model.criterion.register_forward_pre_hook(capture.pre_hook)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        handle.remove()
    outputs, targets = capture.args[:2]
    if isinstance(model.criterion, PanopticSegFormerCriterion):
        match = partial(_match_panoptic_segformer, model.criterion, outputs, targets)
    else:
        outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        match = partial(model.criterion.matcher, outputs, targets)
    result = time_runs(match, runs, warmup, model.device)
    result["num_targets_per_image"] = [int(t["labels"].numel()) for t in targets]
    return result


def _match_panoptic_segformer(criterion, outputs, targets):
    """The matching a Panoptic SegFormer criterion does in a step: the box matching of every
    location-decoder layer, then the thing mask decoder's (class, box and dice costs)."""
    location, things = outputs["location"], outputs["masks"]["things"]
    for logits, boxes in zip(location["pred_logits"], location["pred_boxes"]):
        criterion.box_matcher(logits.float(), boxes.float(), targets)
    return criterion.mask_matcher(location["pred_logits"][-1].float(), location["pred_boxes"][-1].float(),
                                  targets, things[-1]["pred_masks"].float())


def benchmark_postprocessing(model, batch, runs, warmup) -> Dict[str, Dict]:
    """Time each post-processing function on the first image's head outputs, resized to the image
    size as the model does before calling them (a Panoptic SegFormer: its ``inference``)."""
    model.eval()
    if isinstance(model.criterion, PanopticSegFormerCriterion):
        return _benchmark_panoptic_segformer_inference(model, batch, runs, warmup)
    capture = _Capture()
    handle = model.sem_seg_head.register_forward_hook(capture.hook)
    try:
        with torch.no_grad():
            model(batch[:1])
    finally:
        handle.remove()
    height, width = batch[0]["height"], batch[0]["width"]
    mask_cls = capture.output["pred_logits"][0]
    mask_pred = capture.output["pred_masks"][:1]
    padded = [-(-s // model.size_divisibility) * model.size_divisibility if model.size_divisibility > 1 else s
              for s in (height, width)]
    mask_pred = F.interpolate(mask_pred, size=padded, mode="bilinear", align_corners=False)
    mask_pred = mask_pred[0, :, :height, :width]

    num_classes = mask_cls.shape[-1] - 1
    thing_ids = model.thing_ids
    thing_ids_source = "metadata of DATASETS.TEST[0]"
    if thing_ids is None:
        thing_ids = set(range(num_classes))
        thing_ids_source = "all classes (DATASETS.TEST[0] metadata has no thing_dataset_id_to_contiguous_id)"
        logger.info(f"Panoptic / instance post-processing: thing classes = {thing_ids_source}")
    steps = {
        "semantic": lambda: semantic_inference(mask_cls, mask_pred),
        "panoptic": lambda: panoptic_inference(
            mask_cls, mask_pred, thing_ids, model.object_mask_threshold, model.overlap_threshold
        ),
        "instance": lambda: instance_inference(
            mask_cls, mask_pred, num_classes, model.detections_per_image, thing_ids
        ),
    }
    with torch.no_grad():
        results = {name: time_runs(fn, runs, warmup, model.device) for name, fn in steps.items()}
    results["thing_ids"] = thing_ids_source
    return results


def _benchmark_panoptic_segformer_inference(model, batch, runs, warmup) -> Dict[str, Dict]:
    """Time ``PanopticSegFormer.inference`` (mask-wise merging, the semantic scores and the
    instances) on the first image's outputs of the network."""
    postprocess = model.inference  # the bound method: the network's outputs -> the three outputs
    captured_args = []

    def recording_postprocess(*args):
        captured_args.append(args)
        return postprocess(*args)

    model.inference = recording_postprocess
    try:
        with torch.no_grad():
            model(batch[:1])
    finally:
        del model.inference  # the class's method again
    with torch.no_grad():
        result = time_runs(lambda: postprocess(*captured_args[0]), runs, warmup, model.device)
    return {"mask_wise_inference": result}


def confident_predictions(num_queries: int, num_classes: int, height: int, width: int, device,
                          seed: int = 0):
    """Class logits Q x (K+1) and mask logits Q x H x W as a trained model gives them: the image
    is cut into one region per query (the nearest of random centres), each query's mask logit is
    +4 on its region and -4 elsewhere plus N(0, 1) noise, its class logit +8 on one real class."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_queries, 2, generator=generator) * torch.tensor([height, width])
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    nearest = torch.full((height, width), -1, dtype=torch.long)
    best = torch.full((height, width), float("inf"))
    for query, (cy, cx) in enumerate(centres.tolist()):  # one H x W map at a time: little memory
        distance = (ys - cy) ** 2 + (xs - cx) ** 2
        closer = distance < best
        best = torch.where(closer, distance, best)
        nearest = torch.where(closer, query, nearest)
    region = nearest == torch.arange(num_queries)[:, None, None]
    mask_pred = torch.where(region, 4.0, -4.0) + torch.randn(num_queries, height, width, generator=generator)
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=generator)
    labels = torch.randint(0, num_classes, (num_queries,), generator=generator)
    mask_cls[torch.arange(num_queries), labels] += 8
    return mask_cls.to(device), mask_pred.to(device)


def benchmark_postprocessing_many_kept(cfg, height: int, width: int, device: torch.device, runs: int,
                                       warmup: int, functions=postprocessing) -> Dict[str, object]:
    """Time the post-processing functions of ``functions`` (a module; another version of
    ``mask_former.modeling.postprocessing`` can be passed to compare) on :func:`confident_predictions`
    with the config's queries, classes and thresholds. Every other class is a thing."""
    num_queries = cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    mask_cls, mask_pred = confident_predictions(num_queries, num_classes, height, width, device)
    thing_ids = set(range(0, num_classes, 2))
    object_mask_threshold = cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD
    overlap_threshold = cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD
    topk = cfg.TEST.DETECTIONS_PER_IMAGE
    steps = {
        "semantic": lambda: functions.semantic_inference(mask_cls, mask_pred),
        "panoptic_pixel_wise": lambda: functions.panoptic_inference(
            mask_cls, mask_pred, thing_ids, object_mask_threshold, overlap_threshold
        ),
        "instance": lambda: functions.instance_inference(mask_cls, mask_pred, num_classes, topk, thing_ids),
    }
    if hasattr(functions, "mask_wise_panoptic_inference"):
        steps["panoptic_mask_wise"] = lambda: functions.mask_wise_panoptic_inference(mask_cls, mask_pred, thing_ids)
    with torch.no_grad():
        results = {name: time_runs(fn, runs, warmup, device) for name, fn in steps.items()}
        probs = F.softmax(mask_cls, dim=-1)
        labels = probs.argmax(-1)
        scores = probs.gather(1, labels[:, None])[:, 0]
        kept = (labels != num_classes) & (scores > object_mask_threshold)
        results["kept_queries"] = int(kept.sum())
        results["pixel_wise_segments"] = len(steps["panoptic_pixel_wise"]()[1])
        if "panoptic_mask_wise" in steps:
            results["mask_wise_segments"] = len(steps["panoptic_mask_wise"]()[1])
    results.update({"num_queries": num_queries, "num_classes": num_classes, "input_size": [height, width],
                    "object_mask_threshold": object_mask_threshold, "overlap_threshold": overlap_threshold,
                    "detections_per_image": topk})
    return results


def benchmark_assignment(device: torch.device, runs: int, warmup: int) -> Dict[str, Dict]:
    """``linear_sum_assignment_torch`` against scipy on uniform random float32 costs of
    ASSIGNMENT_QUERIES queries x T targets, for one image and for a batch of ASSIGNMENT_BATCH."""
    def scipy_each(costs):
        for cost in costs.cpu().numpy():
            linear_sum_assignment(cost)

    generator = torch.Generator().manual_seed(0)
    results = {}
    for num_targets in ASSIGNMENT_TARGETS:
        costs = torch.rand(ASSIGNMENT_BATCH, ASSIGNMENT_QUERIES, num_targets, generator=generator).to(device)
        steps = {
            "torch": partial(linear_sum_assignment_torch, costs[0]),
            "scipy": partial(scipy_each, costs[:1]),
            "torch_batch": partial(linear_sum_assignment_torch, costs),
            "scipy_batch": partial(scipy_each, costs),
        }
        results[f"T={num_targets}"] = {"num_targets": num_targets}
        results[f"T={num_targets}"].update({name: time_runs(fn, runs, warmup, device) for name, fn in steps.items()})
    results["num_queries"] = ASSIGNMENT_QUERIES
    results["batch"] = ASSIGNMENT_BATCH
    return results


def _ms(entry) -> str:
    return f"{entry['median_s'] * 1e3:.2f}"


def format_table(results: Dict) -> str:
    size = f"{results['input_size'][0]} x {results['input_size'][1]}"
    header = f"{results['config_file']}: {results['device']}, median of {results['runs']} runs"
    tables = []
    if "inference" in results:
        header += (f", batch {results['batch_size']} of {size}, "
                   f"{results['num_parameters'] / 1e6:.2f}M parameters, inference in {results['precision']}")
        rows = [
            ["inference", _ms(results["inference"]), f"{results['inference']['images_per_s']:.2f} images/s"],
            ["train iteration", _ms(results["train_iteration"]),
             f"peak memory {results['train_iteration']['peak_memory_mb']:.0f} MB"],
            ["matcher", _ms(results["matcher"]), ""],
        ]
        for name in ("semantic", "panoptic", "instance", "mask_wise_inference"):
            if name in results["postprocessing"]:
                rows.append([f"{name.replace('_', ' ')} post-processing", _ms(results["postprocessing"][name]),
                             "1 image, the model's outputs (random weights)"])
        tables.append(tabulate(rows, headers=["step", "median ms", ""], tablefmt="pipe"))
    if "postprocessing_many_kept" in results:
        many = results["postprocessing_many_kept"]
        note = (f"1 image of {size}, {many['num_queries']} queries ({many['kept_queries']} kept) x "
                f"{many['num_classes']} classes")
        rows = [["semantic", _ms(many["semantic"]), note],
                ["panoptic, pixel-wise merge", _ms(many["panoptic_pixel_wise"]),
                 f"{many['pixel_wise_segments']} segments"]]
        if "panoptic_mask_wise" in many:
            rows.append(["panoptic, mask-wise merge", _ms(many["panoptic_mask_wise"]),
                         f"{many['mask_wise_segments']} segments"])
        rows.append(["instance", _ms(many["instance"]), f"top {many['detections_per_image']}"])
        tables.append(tabulate(rows, headers=["post-processing, confident outputs", "median ms", ""],
                               tablefmt="pipe"))
    if "assignment" in results:
        assignment = results["assignment"]
        rows = [[f"{assignment['num_queries']} x {entry['num_targets']}", _ms(entry["torch"]), _ms(entry["scipy"]),
                 _ms(entry["torch_batch"]), _ms(entry["scipy_batch"])]
                for key, entry in assignment.items() if key.startswith("T=")]
        batch = assignment["batch"]
        tables.append(tabulate(rows, headers=["assignment, queries x targets", "torch ms", "scipy ms",
                                              f"torch, batch {batch}", f"scipy, {batch} calls"],
                               tablefmt="pipe"))
    return header + "\n" + "\n\n".join(tables)


def main(argv: Optional[List[str]] = None) -> Dict:
    """Returns the results (the JSON written with --json)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.reduced:
        args.runs, args.warmup = REDUCED["runs"], REDUCED["warmup"]
    if args.compare:
        results = run_comparisons(args)
        _write_json(results, args.json)
        return results
    cfg = setup_cfg(args)
    previous_threads = torch.get_num_threads()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    try:
        results = run_benchmarks(cfg, args)
    finally:
        torch.set_num_threads(previous_threads)
    print(format_table(results))
    _write_json(results, args.json)
    return results


def _write_json(results: Dict, path: Optional[str]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        logger.info(f"Wrote {path}")


def _load_tool(name: str):
    """A sibling script of this folder as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_comparisons(args) -> Dict:
    """``--compare``: ``{"inference": ..., "training": ...}``, the reports of
    ``tools/benchmark_inference.py`` and ``tools/benchmark_training.py`` run with this command's
    config, input size, runs, threads and overrides."""
    common = ["--config-file", args.config_file, "--input-size", *map(str, args.input_size)]
    threads = [] if args.num_threads is None else ["--num-threads", str(args.num_threads)]
    no_memory = ["--no-memory"] if args.no_memory else []
    opts = list(args.opts)
    inference_argv = common + threads + no_memory + ["--runs", str(args.runs), "--warmup", str(args.warmup)]
    if args.device == "cuda":
        logger.warning("--compare: the inference comparison runs on the CPU (tools/benchmark_inference.py)")
    training_argv = common + threads + no_memory + [
        "--device", args.device, "--batch-size", str(args.batch_size), "--num-gt-masks", str(args.num_gt_masks),
        "--steps", str(args.runs), "--warmup", str(args.warmup),
    ]
    return {
        "inference": _load_tool("benchmark_inference").main(inference_argv + opts),
        "training": _load_tool("benchmark_training").main(training_argv + opts),
    }


def run_benchmarks(cfg, args) -> Dict:
    torch.manual_seed(0)
    height, width = args.input_size
    runs, warmup = args.runs, args.warmup
    device = torch.device(cfg.MODEL.DEVICE)
    results = {
        "config_file": args.config_file,
        "device": str(device),
        "input_size": [height, width],
        "batch_size": args.batch_size,
        "runs": runs,
        "warmup": warmup,
        "parts": list(args.parts),
        "num_threads": torch.get_num_threads(),
        "precision": cfg.MODEL.MASK_FORMER.TEST.PRECISION,
    }
    if "model" in args.parts:
        model = build_model(cfg)
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        batch = synthetic_batch(args.batch_size, height, width, num_classes, args.num_gt_masks)
        results.update({
            "device": str(model.device),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "inference": benchmark_inference(model, batch, runs, warmup),
            "train_iteration": benchmark_training(cfg, model, batch, runs, warmup),
            "matcher": benchmark_matcher(model, batch, runs, warmup),
            "postprocessing": benchmark_postprocessing(model, batch, runs, warmup),
        })
    if "postprocessing" in args.parts:
        results["postprocessing_many_kept"] = benchmark_postprocessing_many_kept(
            cfg, height, width, device, runs, warmup
        )
    if "assignment" in args.parts:
        results["assignment"] = benchmark_assignment(device, runs, warmup)
    return results


if __name__ == "__main__":
    setup_logger(name="mask_former")
    main()
