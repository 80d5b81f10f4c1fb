#!/usr/bin/env python
"""Export a MaskFormer model's inference network to ONNX and TorchScript.

    python tools/export_model.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml \
        --output exported/ --format onnx torchscript MODEL.WEIGHTS model_final.pkl

Writes to --output: ``model.onnx`` (torch.export + the dynamo ONNX exporter), ``model.ts``
(TorchScript, traced) and ``export.json`` (the input and output specification, the settings of the
post-processing and the checks). The exported network takes ``image``, 1 x 3 x H x W float32 raw
pixel values (0-255) in the config's INPUT.FORMAT channel order, H and W any multiples of the size
divisibility (32), and returns ``pred_logits`` (1 x Q x (K+1)) and ``pred_masks``
(1 x Q x H/4 x W/4); normalization is inside, padding and post-processing are in Python
(``mask_former.export.pad_image`` and ``Postprocessor``, see README.md "Deploying").

Each exported file is checked against PyTorch on two random images of different sizes (the
ONNX model with onnxruntime when it is installed); the largest differences are printed and
written to export.json, and the program fails when one exceeds --atol.
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former.config import add_mask_former_config, merge_config_file  # noqa: E402
from mask_former.demo import metadata_class_names, metadata_from_config  # noqa: E402
from mask_former.export import (  # noqa: E402
    Postprocessor,
    build_exportable_model,
    example_image,
    export_onnx,
    load_torchscript,
    max_abs_diffs,
    onnx_runner,
    save_torchscript,
    trace_torchscript,
)

FORMATS = ("onnx", "torchscript")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}

logger = logging.getLogger("mask_former.export_model")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a MaskFormer model (image -> class and mask logits) to ONNX and TorchScript",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python tools/export_model.py --config-file "
               "configs/synthetic/maskformer_panoptic_R18.yaml \\\n"
               "      --output exported/ MODEL.WEIGHTS output/demo/maskformer/train/model_final.pth",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the exported files")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to export")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="size of the example image (multiples of the size divisibility; default: "
                             "INPUT.MIN_SIZE_TEST rounded up, square). The exported models take any size")
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE for the export (default cpu)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-optimize", action="store_true", help="skip the ONNX graph optimizer")
    parser.add_argument("--external-data", action="store_true",
                        help="ONNX weights in model.onnx.data beside the model (needed above 2 GB)")
    parser.add_argument("--no-check", action="store_true", help="do not compare the exported models with PyTorch")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest absolute difference the check accepts (default 1e-3)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def input_size(cfg, requested: Optional[List[int]], divisibility: int) -> Tuple[int, int]:
    if requested is None:
        side = -(-int(cfg.INPUT.MIN_SIZE_TEST) // divisibility) * divisibility
        return side, side
    height, width = requested
    if height < 1 or width < 1 or height % divisibility or width % divisibility:
        raise ValueError(f"--input-size {height} {width}: both must be positive multiples of {divisibility} "
                         "(the network's size divisibility)")
    return height, width


def class_names(cfg) -> Optional[List[str]]:
    """The K class names the demo uses (the metadata of DATASETS.TEST[0], else MODEL.CLASS_NAMES)."""
    metadata = metadata_from_config(cfg)
    return None if metadata is None else metadata_class_names(metadata)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="mask_former")
    setup_logger(name="fvcore")
    cfg = setup_cfg(args)
    names = class_names(cfg)  # before the export: a bad MODEL.CLASS_NAMES fails at once
    module, model = build_exportable_model(cfg)
    d = module.size_divisibility
    height, width = input_size(cfg, args.input_size, d)
    images = [example_image(height, width, seed=0, device=module.device),
              example_image(height + d, width + 2 * d, seed=1, device=module.device)]
    with torch.no_grad():
        expected = [module(image) for image in images]
    num_queries, num_logits = expected[0][0].shape[1:]
    os.makedirs(args.output, exist_ok=True)

    files: Dict[str, str] = {}
    checks: Dict[str, Dict[str, List[float]]] = {}
    failed = []
    for fmt in args.format:
        path = os.path.join(args.output, FILE_NAMES[fmt])
        start = time.perf_counter()
        if fmt == "torchscript":
            save_torchscript(trace_torchscript(module, images[0]), path)
            run = load_torchscript(path) if not args.no_check else None
        else:
            export_onnx(module, images[0], path, opset_version=args.opset, optimize=not args.no_optimize,
                        external_data=args.external_data)
            run = None
            if not args.no_check:
                try:
                    run = onnx_runner(path)
                except ImportError:
                    logger.warning("onnxruntime is not installed: model.onnx is not checked")
        files[fmt] = FILE_NAMES[fmt]
        logger.info(f"{fmt}: wrote {path} in {time.perf_counter() - start:.1f} s")
        if run is None:
            continue
        checks[fmt] = {}
        for image, reference in zip(images, expected):
            with torch.no_grad():
                actual = run(image.cpu() if fmt == "onnx" else image)
            diffs = max_abs_diffs([r.cpu() for r in reference], [a.cpu() for a in actual])
            size = f"{image.shape[2]}x{image.shape[3]}"
            checks[fmt][size] = list(diffs)
            print(f"{fmt} {size}: max abs diff pred_logits {diffs[0]:.2e}, pred_masks {diffs[1]:.2e}")
            if max(diffs) > args.atol:
                failed.append(f"{fmt} at {size}: {max(diffs):.2e}")

    info = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "files": files,
        "input": {
            "name": module.input_names[0], "shape": [1, 3, "H", "W"], "dtype": "float32",
            "values": "raw pixel values 0-255, normalized inside the network", "format": cfg.INPUT.FORMAT,
            "size_divisibility": d, "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "test_resize": {"min_size": cfg.INPUT.MIN_SIZE_TEST, "max_size": cfg.INPUT.MAX_SIZE_TEST},
        },
        "outputs": {
            module.output_names[0]: [1, int(num_queries), int(num_logits)],
            module.output_names[1]: [1, int(num_queries), "H/4", "W/4"],
        },
        "postprocessing": Postprocessor.from_model(model).to_dict(),
        "class_names": names,
        "checks": checks,
    }
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(info, f, indent=2)
    if failed:
        logger.error(f"exported outputs differ from PyTorch by more than --atol {args.atol:g}: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
