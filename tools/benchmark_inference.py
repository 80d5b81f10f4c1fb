#!/usr/bin/env python
"""Speed, memory and output agreement of the inference paths (MaskFormer, Panoptic SegFormer), side by side.

    python tools/benchmark_inference.py \
        --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --input-size 512 512 --num-threads 1 --json r50.json [KEY VALUE ...]

Paths, all on the same weights and the same input, in one process:

* ``reference``: the inference path of before the optimisations (``MaskFormer.optimize_inference
  = False``): plain modules, float32, mask logits upsampled to the padded size, full-size sigmoid
  and combination, resize to the output size;
* ``fp32``: the default path (``MODEL.MASK_FORMER.TEST.PRECISION fp32``): channels-last
  activations, fused attention, mask logits upsampled band by band inside the image only,
  combined band by band, no identity resize (the frozen batch norms are not folded: the folded
  weights would be copies, see ``SegmentationMetaArch.prepare_for_inference``);
* ``bf16``: the opt-in path (``PRECISION bf16``): the same with the network in bfloat16
  (autocast, weights kept in bfloat16, frozen batch norms folded into them), post-processing in
  float32, the semantic scores written into the memory of the previous call's once they are let
  go of (``MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY``);
* ``bf16-autocast`` (Panoptic SegFormer only, not run unless named in ``--paths``): the modules as
  built under bfloat16 autocast, the Panoptic SegFormer's bf16 path before it had the optimised
  one (MaskFormer's reference path ignores the precision);
* with ``--levers``, fp32 with the levers added one at a time, to see what each pays: the
  optimised post-processing only (network as built); + channels-last activations (1x1
  convolutions as matrix products); + folded batch norms (as the bf16 path runs them); channels-last
  with fused attention; channels-last with Winograd 3x3 convolutions (``layers.winograd_conv``).
  The ``fp32`` row is channels-last with fused attention, the layers' inference kernels
  (``layers.inference_kernels``) and Winograd where ``MODEL.WINOGRAD_CONV`` says so.

Timing: the runs alternate between the paths (round i of every path, then round i + 1, ...), so
a change in the machine's load hits them alike; in each round a path first runs ``--settle``
untimed passes (the first pass after another path pays for that path's memory and cache
footprint, which a program running one path does not), then one timed pass. Each figure is the
median over ``--runs`` rounds of the wall-clock time and of the process CPU time of one forward
pass (batch of one image, pre- and post-processing included), after ``--warmup`` untimed passes;
each ratio is the median over the rounds of the path's time / the reference's time in the same
round. On a machine shared with other work, the CPU time with ``--num-threads 1`` is the steadier
figure.

Agreement, against the reference on the same input: for "sem_seg" the largest absolute
difference of the scores relative to the largest reference score, and the fraction of pixels
whose argmax class is the same; for "panoptic_seg" the fraction of pixels with the same segment
id; for "instances" the fraction of equal mask pixels of the common top instances.

Memory: each path runs in a fresh subprocess of this script: the resident set size after the
model is built, then the peak resident set size over ``--memory-runs`` forward passes (Linux:
the peak is reset after building, so it is the inference peak), and the increase of the one over
the other ("inference memory"). Whole-process figures include the ~0.7 GB that importing torch
and detectron2 costs. The peak of one subprocess depends on where the allocator's freed memory
happens to lie (it moved by up to a fifth between runs on our machines): ``--memory-repeats N``
runs N subprocesses per path, the paths taking turns, and reports the medians, each path's
ratio as the median over the turns of its figure / the reference's in the same turn, and the
range of those ratios.

Weights: random, seeded (``--seed``), with random frozen batch-norm statistics so that folding
is exercised, unless ``--weights`` names a checkpoint (the config's MODEL.WEIGHTS, often
ImageNet pre-training, is not loaded). The input is scikit-image's "astronaut" photograph
resized to ``--input-size``.
"""
import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from skimage import data as skimage_data
from tabulate import tabulate
from torch.nn import functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former import add_mask_former_config  # noqa: E402
from mask_former.checkpoint import MaskFormerCheckpointer  # noqa: E402
from mask_former.modeling.meta_arch.panoptic_segformer import PanopticSegFormer  # noqa: E402
from mask_former.utils.cpu_info import cpu_family_model, cpu_flags, cpu_model, huge_pages  # noqa: E402

logger = logging.getLogger("mask_former.benchmark_inference")

# name -> (MODEL.MASK_FORMER.TEST.PRECISION, MaskFormer.optimize_inference)
PATHS = {
    "reference": ("fp32", False),
    "fp32": ("fp32", True),
    "bf16": ("bf16", True),
    "bf16-autocast": ("bf16", False),
}
DEFAULT_PATHS = ["reference", "fp32", "bf16"]
# fp32 with the optimised post-processing and some of the network levers:
# name -> keyword switches of MaskFormer.run_network_for_inference
LEVERS = {
    "fp32 post-processing only": dict(fold_norms=False, channels_last=False, fuse_attention=False,
                                      fast_kernels=False, winograd=False),
    "fp32 + channels-last": dict(fold_norms=False, channels_last=True, fuse_attention=False, fast_kernels=False,
                                 winograd=False),
    "fp32 + channels-last + folding": dict(fold_norms=True, channels_last=True, fuse_attention=False,
                                           fast_kernels=False, winograd=False),
    "fp32 + channels-last + fused attention": dict(fold_norms=False, channels_last=True, fuse_attention=True,
                                                   fast_kernels=False, winograd=False),
    "fp32 + channels-last + Winograd": dict(fold_norms=False, channels_last=True, fuse_attention=False,
                                            fast_kernels=False, winograd=True),
}
MEMORY_TAG = "MEMORY_RESULT "


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Compare MaskFormer's inference paths")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=DEFAULT_PATHS,
                        help="paths to compare (the reference is always run)")
    parser.add_argument("--levers", action="store_true",
                        help="also time fp32 with the network levers added one at a time")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each path first")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed runs of a path before each timed one (after the other paths ran)")
    parser.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-runs", type=int, default=2, help="forward passes per memory subprocess")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="memory subprocesses per path (medians and the range of the ratios are reported)")
    parser.add_argument("--weights", metavar="FILE",
                        help="checkpoint to load (default: random weights, see --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--memory-worker", choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    if min(args.input_size) < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    for name in ("runs", "memory_runs", "memory_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num-threads must be >= 1")


def setup_cfg(args, precision: str):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = args.weights or ""  # not the config's (pre-training) weights
    cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
    cfg.freeze()
    return cfg


def randomize_frozen_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every FrozenBatchNorm2d statistics like a trained network's (a random model has the
    identity), so that folding them is exercised."""
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            n = module.num_features
            module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


def build(args, path: str):
    """The model of one path: same weights for every path (seeded, or MODEL.WEIGHTS)."""
    precision, optimize = PATHS[path]
    cfg = setup_cfg(args, precision)
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    model.eval()
    if cfg.MODEL.WEIGHTS:
        MaskFormerCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        randomize_frozen_norms(model, args.seed)
    model.optimize_inference = optimize
    return cfg, model


def make_input(cfg, height: int, width: int) -> List[Dict]:
    """scikit-image's astronaut photograph at H x W, in the config's INPUT.FORMAT."""
    image = torch.from_numpy(skimage_data.astronaut().copy()).permute(2, 0, 1).float()  # RGB, 3 x 512 x 512
    if tuple(image.shape[1:]) != (height, width):
        image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        image = image.clamp(0, 255).round()
    if cfg.INPUT.FORMAT == "BGR":
        image = image.flip(0)
    return [{"image": image, "height": height, "width": width}]


def lever_runner(model, inputs, levers: Dict[str, bool]) -> Callable[[], List[Dict]]:
    def run():
        images = model.preprocess_images(inputs)
        outputs = model.run_network_for_inference(images.tensor, **levers)
        return model.optimized_inference(outputs, inputs, images)
    return run


def agreement(output: Dict, reference: Dict) -> Dict[str, float]:
    """How far one image's outputs are from the reference's (see the module docstring)."""
    result = {}
    if "sem_seg" in reference:
        a, b = output["sem_seg"].float(), reference["sem_seg"].float()
        result["sem_seg_max_rel_diff"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        result["sem_seg_argmax_agreement"] = float((a.argmax(0) == b.argmax(0)).float().mean())
    if "panoptic_seg" in reference:
        a, b = output["panoptic_seg"][0], reference["panoptic_seg"][0]
        result["panoptic_pixel_agreement"] = float((a == b).float().mean())
    if "instances" in reference:
        a, b = output["instances"], reference["instances"]
        n = min(len(a), len(b))
        if n:
            result["instance_mask_agreement"] = float((a.pred_masks[:n] == b.pred_masks[:n]).float().mean())
            result["instance_score_max_diff"] = float((a.scores[:n] - b.scores[:n]).abs().max())
    return result


def time_alternating(runners: Dict[str, Callable[[], object]], runs: int, warmup: int,
                     settle: int = 1) -> Dict[str, Dict]:
    """Median / min wall and CPU seconds of each runner, the runs interleaved across runners: in
    each round every runner runs ``settle`` untimed times (switching from another path's memory
    and caches costs the first run after the switch), then once timed."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for _ in range(runs):
        for name, fn in runners.items():
            for _ in range(settle):
                fn()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        name: {"wall_s": statistics.median(wall[name]), "wall_min_s": min(wall[name]),
               "cpu_s": statistics.median(cpu[name]), "cpu_min_s": min(cpu[name]), "runs": runs,
               "wall_all_s": wall[name], "cpu_all_s": cpu[name]}
        for name in runners
    }


def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_worker(args) -> None:
    """Run one path in this (fresh) process and print its memory figures as one JSON line."""
    cfg, model = build(args, args.memory_worker)
    inputs = make_input(cfg, *args.input_size)
    gc.collect()
    rss_before = _proc_status_mb("VmRSS")
    peak_reset = False
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: reset the peak RSS
            f.write("5")
        peak_reset = True
    except OSError:
        pass
    with torch.no_grad():
        for _ in range(args.memory_runs):
            model(inputs)
    peak = _proc_status_mb("VmHWM")
    result = {"rss_after_build_mb": rss_before, "peak_rss_mb": peak,
              "inference_mb": None if peak is None or rss_before is None else peak - rss_before,
              "peak_reset_after_build": peak_reset}
    print(MEMORY_TAG + json.dumps(result), flush=True)


def measure_memory(args, path: str) -> Dict[str, object]:
    argv = [sys.executable, os.path.abspath(__file__), "--config-file", args.config_file,
            "--input-size", *map(str, args.input_size), "--seed", str(args.seed),
            "--memory-runs", str(args.memory_runs), "--memory-worker", path]
    if args.weights:
        argv += ["--weights", args.weights]
    if args.num_threads:
        argv += ["--num-threads", str(args.num_threads)]
    argv += list(args.opts)
    proc = subprocess.run(argv, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    raise RuntimeError(f"memory subprocess of {path!r} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_memory_repeated(args, paths: List[str], reference: str = "reference") -> Dict[str, Dict[str, object]]:
    """``--memory-repeats`` turns, in each of which every path runs once in a fresh subprocess
    (``measure_memory``). Per path: the medians of the figures, every turn's figures
    (``*_all``), and per figure the median and the range over the turns of its ratio to the
    reference's in the same turn (``*_ratio``, ``*_ratio_range``)."""
    turns = {path: [] for path in paths}
    for turn in range(args.memory_repeats):
        for path in paths:
            logger.info(f"Memory of {path} (fresh subprocess {turn + 1}/{args.memory_repeats}) ...")
            turns[path].append(measure_memory(args, path))
    results = {}
    for path, runs in turns.items():
        memory: Dict[str, object] = {"peak_reset_after_build": all(r["peak_reset_after_build"] for r in runs)}
        for key in ("rss_after_build_mb", "peak_rss_mb", "inference_mb"):
            values = [r[key] for r in runs]
            if any(v is None for v in values):
                memory[key] = None
                continue
            memory[key] = statistics.median(values)
            memory[f"{key}_all"] = values
            if key != "rss_after_build_mb":
                ratios = [v / r[key] for v, r in zip(values, turns[reference])]
                memory[f"{key}_ratio"] = statistics.median(ratios)
                memory[f"{key}_ratio_range"] = [min(ratios), max(ratios)]
        results[path] = memory
    return results


def _memory_cell(memory: Dict[str, object], key: str) -> str:
    """"median MB (median ratio)", with the range of the ratios when there were several turns."""
    if not memory or memory.get(key) is None:
        return ""
    cell = f"{memory[key]:.0f} ({memory[f'{key}_ratio']:.2f}x"
    low, high = memory[f"{key}_ratio_range"]
    if len(memory[f"{key}_all"]) > 1 and low != high:  # (the reference's are all 1)
        cell += f", {low:.2f}-{high:.2f}x"
    return cell + ")"


def cpu_description() -> Dict[str, object]:
    flags = cpu_flags()
    return {
        "model": cpu_model(),
        "family_model": cpu_family_model(),
        "huge_pages": huge_pages(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
    }


def paired_ratios(results: Dict[str, Dict], reference: str = "reference") -> None:
    """Add to each path the median over rounds of its time / the reference's time in the same
    round (``wall_ratio``, ``cpu_ratio``): a change of the machine's load between rounds cancels."""
    ref = results[reference]
    for r in results.values():
        for kind in ("wall", "cpu"):
            ratios = [a / b for a, b in zip(r[f"{kind}_all_s"], ref[f"{kind}_all_s"])]
            r[f"{kind}_ratio"] = statistics.median(ratios)


def format_table(results: Dict[str, Dict]) -> str:
    rows = []
    for name, r in results.items():
        mem = r.get("memory") or {}
        agree = r.get("agreement", {})
        rows.append([
            name,
            f"{r['wall_s']:.3f}", f"{r['wall_ratio']:.2f}x",
            f"{r['cpu_s']:.3f}", f"{r['cpu_ratio']:.2f}x",
            "" if "sem_seg_max_rel_diff" not in agree else f"{agree['sem_seg_max_rel_diff']:.1e}",
            "" if "sem_seg_argmax_agreement" not in agree else f"{100 * agree['sem_seg_argmax_agreement']:.3f}%",
            _memory_cell(mem, "peak_rss_mb"),
            _memory_cell(mem, "inference_mb"),
        ])
    headers = ["path", "wall s", "ratio", "CPU s", "ratio", "max|diff|/max", "argmax equal",
               "peak RSS MB", "inference MB"]
    return tabulate(rows, headers=headers, tablefmt="pipe")


def main(argv=None) -> Dict[str, object]:
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.memory_worker:
        memory_worker(args)
        return {}

    paths = ["reference"] + [p for p in args.paths if p != "reference"]
    models, cfg = {}, None
    for path in paths:
        cfg, models[path] = build(args, path)
    if "bf16-autocast" in models and not isinstance(models["bf16-autocast"], PanopticSegFormer):
        parser.error("--paths bf16-autocast is for Panoptic SegFormer configs (MaskFormer's reference path "
                     "runs in float32 whatever the precision)")
    if args.levers and not hasattr(models["reference"], "run_network_for_inference"):
        parser.error("--levers times the levers of MaskFormer.run_network_for_inference: a MaskFormer config only")
    inputs = make_input(cfg, *args.input_size)
    runners: Dict[str, Callable[[], List[Dict]]] = {path: (lambda m=models[path]: m(inputs)) for path in paths}
    if args.levers:
        fp32_model = models["fp32"] if "fp32" in models else build(args, "fp32")[1]
        for name, levers in LEVERS.items():
            runners[name] = lever_runner(fp32_model, inputs, levers)

    with torch.no_grad():
        outputs = {name: fn()[0] for name, fn in runners.items()}
        timings = time_alternating(runners, args.runs, args.warmup, args.settle)
    results = {}
    for name in runners:
        results[name] = dict(timings[name])
        results[name]["agreement"] = agreement(outputs[name], outputs["reference"])
    paired_ratios(results)
    if not args.no_memory:
        for path, memory in measure_memory_repeated(args, paths).items():
            results[path]["memory"] = memory

    report = {
        "config_file": args.config_file,
        "input_size": list(args.input_size),
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "weights": cfg.MODEL.WEIGHTS or f"random (seed {args.seed}), random frozen batch-norm statistics",
        "runs": args.runs,
        "warmup": args.warmup,
        "settle": args.settle,
        "paths": results,
    }
    cpu = report["cpu"]
    print(f"{args.config_file} at {args.input_size[0]}x{args.input_size[1]}, {report['num_threads']} "
          f"thread(s), torch {torch.__version__}, CPU: {cpu['model']}, {cpu['family_model']} (avx512_bf16: "
          f"{cpu['avx512_bf16']}, amx_bf16: {cpu['amx_bf16']}), huge pages {cpu['huge_pages']}; "
          f"weights: {report['weights']}; median of {args.runs} runs "
          f"({args.settle} untimed before each)")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    setup_logger(name="mask_former")
    main()
