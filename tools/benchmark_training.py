#!/usr/bin/env python
"""Time and peak memory of one MaskFormer training step, path by path: the full-resolution mask
losses with image-by-image matching (the reference), with batched matching, point-sampled losses
and matching costs, and point sampling under bfloat16 autocast.

    python tools/benchmark_training.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --input-size 512 512 --batch-size 2 --num-gt-masks 8 --json train_bench.json

Every path starts from the same random weights (``--seed``; MODEL.WEIGHTS is ignored) and trains
on the same batch: random images, each with ``--num-gt-masks`` ground-truth segments that
partition it (the cells of a random Voronoi diagram, as a semantic-segmentation mapper gives
them). A step is forward (model, matcher, losses), backward and the optimizer's step (the config's
optimizer).

* Time: all paths in this process, one model each, their steps interleaved (path 1, path 2, ...,
  then again, the order rotating), so that a busy machine slows them alike; the median of
  ``--steps`` timed steps per path after ``--warmup`` untimed ones.
* Memory: each path in a fresh subprocess (its peak resident set size is its own: model,
  optimizer and batch built, ``--warmup`` steps and one more), skipped with ``--no-memory``.

Columns:

* ``step_s``, ``step_min_s``: the median and the fastest of the timed steps, in wall-clock
  seconds, with their ratios to the reference path's (on a machine shared with other work, the
  fastest step is the one least slowed by it); ``step_cpu_s``: the median process CPU time of a
  step (all threads), which other work disturbs much less (with ``--num-threads 1`` it is the
  step's work);
* ``matcher_s``, ``matcher_share``: the matcher's seconds per step (all decoder layers; forward
  hooks around ``criterion.matcher``) and its share of the step, with the ratio of the share to
  the reference's; ``matcher_cpu_s``, ``matcher_cpu_share``: the same in CPU time;
  ``criterion_s``: the whole criterion's forward (matcher + losses);
* ``peak_rss_mb``: the subprocess's peak RSS (``resource.getrusage``, since its start; on CUDA
  ``torch.cuda.max_memory_allocated``), with its ratio to the reference's, and ``base_rss_mb``,
  the RSS with the model, optimizer and batch built, before the first step;
* ``loss_rel_diff``: the total weighted loss of the first step (same weights, same batch) relative
  to the reference's: what point sampling (random points) and bfloat16 change in the loss.

Paths (``--paths``; default all but ``points_plain`` and ``bf16``): ``reference`` (TRAIN_NUM_POINTS
0, the matcher called image by image as before batching: each image's costs computed over all its
pixels at once (MATCHER_NUM_POINTS -1, MATCHER_CHUNK_POINTS 0, whatever the trailing options say)
and copied to the CPU on their own; the modules as built, ``model.optimize_training = False``),
``full`` (TRAIN_NUM_POINTS 0, batched matcher), ``points`` (TRAIN_NUM_POINTS ``--num-points``),
``points_bf16`` (the same under ``torch.autocast`` with bfloat16, as SOLVER.AMP.PRECISION bfloat16
trains), ``bf16`` (full resolution under bfloat16 autocast). All but the reference and
``points_plain`` (``points`` with the modules as built) train with the frozen batch norms folded
into their convolutions, channels-last where MODEL.TRAIN_CHANNELS_LAST says so (by default on GPUs
and on CPUs with PyTorch's AVX-512 kernels, which the header line names; ``optimize_training``, the
default, which also computes the full-resolution mask losses tile by tile) and with AdamW's
fused kernel (SOLVER.FUSED_OPTIMIZER, the default); those two run
PyTorch's loop over tensors, as before it. ``points_checkpointed`` is ``points`` with activation
checkpointing (MODEL.ACTIVATION_CHECKPOINTING) of the backbone's stages, the pixel decoder and the
transformer predictor: less memory for more time; ``points_bf16_checkpointed`` the same under
bfloat16 autocast.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former import add_mask_former_config  # noqa: E402
from mask_former.modeling.training_optimization import checkpoint_activations  # noqa: E402
from mask_former.solver import build_optimizer  # noqa: E402
from mask_former.utils.cpu_info import cpu_family_model, cpu_flags, cpu_model, huge_pages  # noqa: E402


class PathSettings(NamedTuple):
    """How one path trains."""

    points: bool  # TRAIN_NUM_POINTS > 0
    autocast_dtype: Optional[torch.dtype]  # None: no autocast
    image_by_image: bool  # the matcher called image by image, as before batching
    optimize_training: bool  # model.optimize_training and SOLVER.FUSED_OPTIMIZER
    checkpointed: bool  # activation checkpointing (``checkpointed_parts``)


PATHS = {
    "reference": PathSettings(False, None, True, False, False),
    "full": PathSettings(False, None, False, True, False),
    "points_plain": PathSettings(True, None, False, False, False),
    "points": PathSettings(True, None, False, True, False),
    "points_checkpointed": PathSettings(True, None, False, True, True),
    "points_bf16": PathSettings(True, torch.bfloat16, False, True, False),
    "points_bf16_checkpointed": PathSettings(True, torch.bfloat16, False, True, True),
    "bf16": PathSettings(False, torch.bfloat16, False, True, False),
}
DEFAULT_PATHS = ("reference", "full", "points", "points_bf16")


def checkpointed_parts(model: nn.Module) -> List[str]:
    """MODEL.ACTIVATION_CHECKPOINTING of the ``points_checkpointed`` path: each stage of a ResNet
    backbone (the whole backbone otherwise), the pixel decoder and the transformer predictor."""
    stages = [name for name, _ in model.backbone.named_children()]
    backbone = [f"backbone.{name}" for name in stages] if "res2" in stages else ["backbone"]
    return backbone + ["sem_seg_head.pixel_decoder.forward_features", "sem_seg_head.predictor"]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark MaskFormer training steps, path by path")
    parser.add_argument("--config-file", default="configs/ade20k-150/maskformer_R50_bs16_160k.yaml", metavar="FILE")
    parser.add_argument("--input-size", nargs=2, type=int, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-gt-masks", type=int, default=8, help="ground-truth segments per image")
    parser.add_argument("--num-points", type=int, default=12544, help="TRAIN_NUM_POINTS of the point paths")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path before them")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-path memory subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--num-threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="of the weights and the batch")
    parser.add_argument("--checkpointed-parts", metavar="NAMES",
                        help="comma-separated MODEL.ACTIVATION_CHECKPOINTING of the *_checkpointed paths "
                             "(default: each ResNet stage, the pixel decoder, the predictor)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--run-path", help=argparse.SUPPRESS)  # internal: run one path, in this process
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE pairs")
    return parser


# ---------------------------------------------------------------- one path (in its own process)
class ImageByImageMatcher(nn.Module):
    """Calls a matcher on one image at a time: the matching before it was batched (each image's
    costs computed, checked and copied to the CPU on their own)."""

    def __init__(self, matcher: nn.Module):
        super().__init__()
        self.matcher = matcher

    def forward(self, outputs, targets):
        return [
            self.matcher({key: value[b : b + 1] for key, value in outputs.items()}, [target])[0]
            for b, target in enumerate(targets)
        ]


class Stopwatch:
    """Wall-clock and process CPU seconds spent in a module's forward calls (forward pre-hook to
    forward hook), summed until reset."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        self.reset()
        module.register_forward_pre_hook(self._pre_hook)
        module.register_forward_hook(self._hook)

    def reset(self):
        self.total = self.cpu_total = 0.0
        self._start = self._cpu_start = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre_hook(self, module, args):
        self._sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def _hook(self, module, args, output):
        self._sync()
        self.total += time.perf_counter() - self._start
        self.cpu_total += time.process_time() - self._cpu_start


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, num_masks: int,
                    seed: int) -> List[Dict]:
    """Random images (3 x H x W, 0..255) whose ``num_masks`` ground-truth segments (distinct random
    classes) are the cells of a random Voronoi diagram, as a dataset mapper gives them."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    pixels = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        seeds = torch.rand(num_masks, 2, generator=generator) * torch.tensor([height, width])
        cell = torch.cdist(pixels, seeds).argmin(1).view(height, width)
        masks = torch.stack([cell == i for i in range(num_masks)])
        keep = masks.flatten(1).any(1)
        instances = Instances((height, width))
        instances.gt_classes = torch.randperm(num_classes, generator=generator)[:num_masks][keep]
        instances.gt_masks = masks[keep]
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PathRunner:
    """One path's model, optimizer and instruments, built from the same seed as every other path."""

    def __init__(self, args, name: str, batch: Optional[List[Dict]] = None):
        points, self.autocast_dtype, image_by_image, optimize_training, checkpointed = PATHS[name]
        self.name = name
        cfg = get_cfg()
        add_mask_former_config(cfg)
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        cfg.MODEL.DEVICE = args.device
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = args.num_points if points else 0
        if image_by_image:
            cfg.MODEL.MASK_FORMER.MATCHER_NUM_POINTS = -1
            cfg.MODEL.MASK_FORMER.MATCHER_CHUNK_POINTS = 0
        cfg.SOLVER.FUSED_OPTIMIZER = optimize_training
        cfg.freeze()
        self.cfg = cfg
        self.device = torch.device(args.device)
        self.seed = args.seed
        torch.manual_seed(args.seed)
        self.model = build_model(cfg).train()
        self.model.optimize_training = optimize_training
        if checkpointed:
            parts = args.checkpointed_parts.split(",") if args.checkpointed_parts else checkpointed_parts(self.model)
            checkpoint_activations(self.model, parts)
        self.optimizer = build_optimizer(cfg, self.model)
        height, width = args.input_size
        self.batch = batch or synthetic_batch(
            args.batch_size, height, width, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, args.num_gt_masks, args.seed
        )
        if image_by_image:
            self.model.criterion.matcher = ImageByImageMatcher(self.model.criterion.matcher)
        self.matcher_watch = Stopwatch(self.model.criterion.matcher, self.device)
        self.criterion_watch = Stopwatch(self.model.criterion, self.device)
        self.first_loss = None
        self.times = {"step": [], "matcher": [], "criterion": [], "step_cpu": [], "matcher_cpu": []}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, timed: bool) -> None:
        """One training step; its seconds (step, matcher, criterion) are kept when ``timed``."""
        self.matcher_watch.reset()
        self.criterion_watch.reset()
        self._sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        if self.first_loss is None:
            torch.manual_seed(self.seed)  # the same dropout in every path's first step: comparable losses
        self.optimizer.zero_grad()
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            total = sum(self.model(self.batch).values())
        total.backward()
        self.optimizer.step()
        self._sync()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if self.first_loss is None:
            self.first_loss = float(total.detach())
        if timed:
            self.times["step"].append(elapsed)
            self.times["matcher"].append(self.matcher_watch.total)
            self.times["criterion"].append(self.criterion_watch.total)
            self.times["step_cpu"].append(cpu)
            self.times["matcher_cpu"].append(self.matcher_watch.cpu_total)


def time_paths(args, paths: List[str]) -> Dict[str, Dict]:
    """Step times of every path, measured in this process with the paths' steps interleaved."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    runners = []
    for name in paths:
        runners.append(PathRunner(args, name, batch=runners[0].batch if runners else None))
    for runner in runners:
        for _ in range(args.warmup):
            runner.step(timed=False)
    for i in range(args.steps):
        for runner in runners[i % len(runners):] + runners[: i % len(runners)]:
            runner.step(timed=True)
    return {r.name: {"times": r.times, "first_loss": r.first_loss} for r in runners}


def measure_memory(args, name: str) -> Dict[str, float]:
    """(In a fresh subprocess) the peak memory of one path: build, ``--warmup`` steps and one more."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    runner = PathRunner(args, name)
    base_rss = current_rss_mb()
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    for _ in range(args.warmup + 1):
        runner.step(timed=False)
    if runner.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(runner.device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_rss_mb": peak_mb, "base_rss_mb": base_rss}


# ---------------------------------------------------------------- the driver
def run_in_subprocess(args, argv: List[str], name: str) -> Dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        # the options first: everything after the first config KEY VALUE pair is taken as opts
        cmd = [sys.executable, os.path.abspath(__file__), "--run-path", name, "--result-file", result_file, *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"path {name!r} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(result_file) as f:
            return json.load(f)


def summarize(paths: List[str], timing: Dict[str, Dict], memory: Dict[str, Dict], num_points: int) -> Dict[str, Dict]:
    """Per path: medians (and the fastest step) of the timing, the memory, and ratios to the
    reference path's where it was measured."""
    summary = {}
    for name in paths:
        points, autocast_dtype, image_by_image, optimize_training, checkpointed = PATHS[name]
        entry = {
            "train_num_points": num_points if points else 0,
            "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else None,
            "image_by_image_matcher": image_by_image,
            "optimize_training": optimize_training,
            "activation_checkpointing": checkpointed,
        }
        if name in timing:
            times = timing[name]["times"]
            entry.update({
                "step_s": statistics.median(times["step"]),
                "step_min_s": min(times["step"]),
                "step_s_all": times["step"],
                "matcher_s": statistics.median(times["matcher"]),
                "matcher_share": statistics.median(m / t for m, t in zip(times["matcher"], times["step"])),
                "criterion_s": statistics.median(times["criterion"]),
                "step_cpu_s": statistics.median(times["step_cpu"]),
                "matcher_cpu_s": statistics.median(times["matcher_cpu"]),
                "matcher_cpu_share": statistics.median(
                    m / t for m, t in zip(times["matcher_cpu"], times["step_cpu"])
                ),
                "first_loss": timing[name]["first_loss"],
            })
        entry.update(memory.get(name, {}))
        summary[name] = entry
    ref = summary.get("reference", {})
    ratios = {"step_ratio": "step_s", "step_min_ratio": "step_min_s", "matcher_share_ratio": "matcher_share",
              "step_cpu_ratio": "step_cpu_s", "matcher_cpu_share_ratio": "matcher_cpu_share",
              "peak_rss_ratio": "peak_rss_mb"}
    for entry in summary.values():
        for ratio_key, key in ratios.items():
            if key in entry and key in ref:
                entry[ratio_key] = entry[key] / ref[key]
        if "first_loss" in entry and "first_loss" in ref:
            entry["loss_rel_diff"] = (entry["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
    return summary


def format_table(summary: Dict[str, Dict]) -> str:
    def cell(entry, key, fmt, ratio_key=None):
        if key not in entry:
            return "-"
        text = format(entry[key], fmt)
        return text + (f" ({entry[ratio_key]:.2f}x)" if ratio_key in entry else "")

    def share(entry, key):
        if key not in entry:
            return "-"
        return f"{100 * entry[key]:.1f}%" + (f" ({entry[key + '_ratio']:.2f}x)" if key + "_ratio" in entry else "")

    rows = []
    for name, e in summary.items():
        rows.append([
            name, e["train_num_points"], e["autocast"] or "-", "yes" if e["optimize_training"] else "no",
            cell(e, "step_s", ".2f", "step_ratio"), cell(e, "step_min_s", ".2f", "step_min_ratio"),
            cell(e, "step_cpu_s", ".2f", "step_cpu_ratio"),
            cell(e, "matcher_s", ".3f"), share(e, "matcher_share"),
            cell(e, "matcher_cpu_s", ".3f"), share(e, "matcher_cpu_share"), cell(e, "criterion_s", ".3f"),
            cell(e, "peak_rss_mb", ".0f", "peak_rss_ratio"), cell(e, "base_rss_mb", ".0f"),
            cell(e, "loss_rel_diff", "+.2e"),
        ])
    headers = ["path", "points", "autocast", "optimized", "step_s", "step_min_s", "step_cpu_s", "matcher_s",
               "matcher_share", "matcher_cpu_s", "matcher_cpu_share", "criterion_s", "peak_rss_mb", "base_rss_mb",
               "loss_rel_diff"]
    return tabulate(rows, headers=headers, tablefmt="pipe")


def main(argv: Optional[List[str]] = None) -> Optional[Dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.run_path:
        result = measure_memory(args, args.run_path)
        with open(args.result_file, "w") as f:
            json.dump(result, f)
        return None

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        parser.error(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    for key in ("batch_size", "num_gt_masks", "num_points", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")

    memory = {}
    if not args.no_memory:
        for name in paths:
            start = time.perf_counter()
            memory[name] = run_in_subprocess(args, argv, name)
            print(f"memory of {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    timing = {}
    if not args.no_timing:
        start = time.perf_counter()
        timing = time_paths(args, paths)
        print(f"timing: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(paths, timing, memory, args.num_points)
    machine = {
        "cpu": cpu_model(), "cpu_family_model": cpu_family_model(), "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(), "huge_pages": huge_pages(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "num_threads": args.num_threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    settings = {
        "config_file": args.config_file, "input_size": list(args.input_size), "batch_size": args.batch_size,
        "num_gt_masks": args.num_gt_masks, "num_points": args.num_points, "steps": args.steps,
        "warmup": args.warmup, "device": args.device, "opts": args.opts,
    }
    print(f"CPU: {machine['cpu']}, {machine['cpu_family_model']} ({', '.join(machine['cpu_flags']) or 'no AVX-512'}), "
          f"PyTorch's {machine['cpu_capability']} kernels, {machine['num_threads']} torch threads, torch "
          f"{machine['torch']}, huge pages {machine['huge_pages']}")
    print(f"{args.config_file} at {args.input_size[0]}x{args.input_size[1]}, batch {args.batch_size}, "
          f"{args.num_gt_masks} masks per image; median of {args.steps} interleaved steps per path, "
          "peak memory per path in a fresh subprocess")
    print(format_table(summary))
    results = {"machine": machine, "settings": settings, "paths": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
