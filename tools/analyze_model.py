#!/usr/bin/env python
"""Count a MaskFormer model's parameters, FLOPs and activations; no dataset needed.

    python tools/analyze_model.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --tasks parameter flop activation --input-size 512 512 [KEY VALUE ...]

FLOPs and activations are counted (fvcore, through detectron2's tracing adapter) for one
inference on a random image of --input-size (default: INPUT.MIN_SIZE_TEST square), with the
image-independent semantic output only: panoptic / instance post-processing is data-dependent
(its cost depends on how many queries survive) and not traceable. Element-wise ops are not
counted (detectron2's convention), so the numbers are those of the network's matrix products.
"""
import argparse
import logging
import os
import sys
from typing import Dict, List, Optional

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis, activation_count_operators
from detectron2.utils.logger import setup_logger
from fvcore.nn import flop_count_table, parameter_count, parameter_count_table

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former.config import add_mask_former_config, merge_config_file  # noqa: E402

TASKS = ("parameter", "flop", "activation")

logger = logging.getLogger("mask_former.analyze_model")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Parameters, FLOPs and activations of a MaskFormer model")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="what to count")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="image size for FLOPs / activations (default: INPUT.MIN_SIZE_TEST square)")
    parser.add_argument("--max-depth", type=int, default=3, help="depth of the module tables")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def setup_cfg(config_file: str, opts: List[str], semantic_only: bool):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, config_file)
    cfg.merge_from_list(opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""  # counts do not depend on the weights
    if semantic_only:
        test = cfg.MODEL.MASK_FORMER.TEST
        test.SEMANTIC_ON, test.PANOPTIC_ON, test.INSTANCE_ON = True, False, False
    cfg.freeze()
    return cfg


def random_inputs(height: int, width: int) -> List[Dict[str, torch.Tensor]]:
    """One random image (3 x H x W, 0..255) in detectron2's input format."""
    if height < 1 or width < 1:
        raise ValueError(f"--input-size must be positive, got {height} x {width}")
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((3, height, width), generator=generator) * 255
    return [{"image": image, "height": height, "width": width}]


def count_parameters(model: torch.nn.Module, max_depth: int) -> Dict[str, float]:
    """Returns {"total": n, "trainable": n, "<module>": n for each top-level module}."""
    counts = parameter_count(model)
    print(parameter_count_table(model, max_depth=max_depth))
    result = {"total": counts[""], "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for name, _ in model.named_children():
        if counts.get(name, 0):
            result[name] = counts[name]
    return result


def count_flops(model: torch.nn.Module, inputs, max_depth: int) -> Dict[str, float]:
    """Returns {"total_gflops": ..., "by_operator": {op: GFLOPs}, "by_module": {module: GFLOPs}},
    modules named as in ``model.named_modules()`` down to ``max_depth`` levels."""
    analysis = FlopCountAnalysis(model, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    prefix = "model."  # the tracing adapter wraps the model as "model"
    print(flop_count_table(analysis, max_depth=max_depth))
    return {
        "total_gflops": analysis.total() / 1e9,
        "by_operator": {k: v / 1e9 for k, v in analysis.by_operator().items()},
        "by_module": {
            name[len(prefix):]: flops / 1e9
            for name, flops in by_module.items()
            if name.startswith(prefix) and name.count(".") <= max_depth
        },
    }


def count_activations(model: torch.nn.Module, inputs) -> Dict[str, float]:
    """Returns {"total_mega": ..., "by_operator": {op: millions}}."""
    by_operator = activation_count_operators(model, inputs)
    return {"total_mega": sum(by_operator.values()), "by_operator": dict(by_operator)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict]:
    """Returns {"parameter": {...}, "flop": {...}, "activation": {...}} for the requested tasks."""
    args = get_parser().parse_args(argv)
    needs_trace = any(t in args.tasks for t in ("flop", "activation"))
    cfg = setup_cfg(args.config_file, args.opts, semantic_only=needs_trace)
    model = build_model(cfg)
    model.eval()
    if hasattr(model, "optimize_inference"):
        # count the reference inference path: the optimised one computes the same quantities in
        # bands and with folded weights, which fvcore's op handles do not all recognise
        model.optimize_inference = False
    results: Dict[str, Dict] = {}
    if "parameter" in args.tasks:
        results["parameter"] = count_parameters(model, args.max_depth)
        logger.info(f"Parameters: {results['parameter']['total'] / 1e6:.2f}M")
    if needs_trace:
        height, width = args.input_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST)
        inputs = random_inputs(height, width)
        with torch.no_grad():
            if "flop" in args.tasks:
                results["flop"] = count_flops(model, inputs, args.max_depth)
                results["flop"]["input_size"] = [height, width]
                logger.info(f"FLOPs at {height} x {width}: {results['flop']['total_gflops']:.2f}G")
            if "activation" in args.tasks:
                results["activation"] = count_activations(model, inputs)
                results["activation"]["input_size"] = [height, width]
                logger.info(f"Activations at {height} x {width}: {results['activation']['total_mega']:.2f}M")
    return results


if __name__ == "__main__":
    setup_logger(name="mask_former")
    setup_logger(name="fvcore")
    main()
