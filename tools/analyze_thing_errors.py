#!/usr/bin/env python
"""Where a panoptic model loses its things, on a registered panoptic dataset.

    python tools/analyze_thing_errors.py --config-file configs/synthetic/panoptic_segformer_R18.yaml \
        --area-bins 300,1000 MODEL.WEIGHTS output/demo/panoptic_segformer/train/model_final.pth

For every ground-truth thing (crowd regions left out) of the dataset (DATASETS.TEST[0] unless
--dataset), counted by area bin (--area-bins, default COCO's 32^2 and 96^2):

* found: a thing segment of the model's ``panoptic_seg`` with its class has an IoU above 0.5 with it;
* dropped: not found, but a mask of its class in the model's ``instances`` has: the model made
  the mask, the panoptic merging left it out (what covers most of its pixels is listed);
* missed: no instance mask of its class has an IoU above 0.5 with it.

Also the number of thing segments in ``panoptic_seg`` and how many of them match no ground-truth
thing of their class. The model runs with PANOPTIC_ON and INSTANCE_ON whatever the config says.
IoUs are over all pixels (PQ, in contrast, leaves void and crowd pixels out).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from panopticapi.utils import rgb2id
from PIL import Image
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former.checkpoint.checkpointer import MaskFormerCheckpointer, check_weights_available  # noqa: E402
from mask_former.config import add_mask_former_config, merge_config_file  # noqa: E402
from mask_former.data import build_dataset_mapper  # noqa: E402
from mask_former.evaluation.thing_errors import OUTCOMES, ThingErrorCounter, segment_masks  # noqa: E402


def area_bins(text: str) -> List[int]:
    try:
        return [int(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 300,1000") from None


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Where a panoptic model loses its things")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--dataset", help="registered panoptic dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--max-images", type=int, default=0, help="the first N images only (0: all)")
    parser.add_argument("--area-bins", type=area_bins, default=[32 ** 2, 96 ** 2], metavar="A,B,...",
                        help="comma-separated increasing thing areas (pixels) that split the things into bins "
                        "(default: 1024,9216, COCO's small / medium / large)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    test = cfg.MODEL.MASK_FORMER.TEST
    test.PANOPTIC_ON, test.INSTANCE_ON = True, True
    cfg.freeze()
    return cfg


def ground_truth(record: Dict, dataset: str):
    """N x H x W bool masks and N contiguous classes of the record's non-crowd segments."""
    if "pan_seg_file_name" not in record or "segments_info" not in record:
        raise ValueError(f"dataset {dataset!r}: {record.get('file_name', 'a record')} has no panoptic ground "
                         "truth (pan_seg_file_name, segments_info); register a panoptic dataset")
    ids = torch.from_numpy(rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"))).astype(np.int64))
    segments = [s for s in record["segments_info"] if not s.get("iscrowd", 0)]
    classes = torch.tensor([s["category_id"] for s in segments], dtype=torch.long)
    return segment_masks(ids, [s["id"] for s in segments]), classes


def analyze(cfg, dataset: str, max_images: int, area_bins: List[int]) -> Dict[str, object]:
    """Run the model over ``dataset`` and count (see the module docstring)."""
    metadata = MetadataCatalog.get(dataset)
    mapping = metadata.get("thing_dataset_id_to_contiguous_id", None)
    if mapping is None:
        raise ValueError(f"dataset {dataset!r} has no thing_dataset_id_to_contiguous_id in its metadata")
    counter = ThingErrorCounter(mapping.values(), area_bins)
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the weights of the model to analyze "
                         "(an untrained model's errors say nothing)")
    check_weights_available(cfg.MODEL.WEIGHTS)
    model = build_model(cfg).eval()
    MaskFormerCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    mapper = build_dataset_mapper(cfg, is_train=False)
    records = DatasetCatalog.get(dataset)
    if max_images > 0:
        records = records[:max_images]
    for record in records:
        gt_masks, gt_classes = ground_truth(record, dataset)
        with torch.no_grad():
            output = model([mapper(dict(record))])[0]
        panoptic_seg, segments_info = output["panoptic_seg"]
        counter.add(gt_masks, gt_classes, panoptic_seg, segments_info, output.get("instances"))
    return {"dataset": dataset, "images": len(records), **counter.summary()}


def format_summary(summary: Dict[str, object]) -> str:
    rows = []
    for name, counts in summary["bins"].items():
        things = counts["things"]
        rows.append([name, things] + [f"{counts[o]} ({100 * counts[o] / max(things, 1):.0f} %)" for o in OUTCOMES])
    table = tabulate(rows, headers=["thing area (pixels)", "things", *OUTCOMES])
    under = ", ".join(f"{k} {v}" for k, v in summary["dropped_under"].items())
    predicted, false = summary["predicted_thing_segments"], summary["false_thing_segments"]
    return (f"{summary['dataset']}: {summary['images']} images\n{table}\n"
            f"dropped things lie mostly under: {under}\n"
            f"thing segments in panoptic_seg: {predicted}, of which {false} "
            f"({100 * false / max(predicted, 1):.0f} %) match no ground-truth thing of their class")


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    cfg = setup_cfg(args)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not dataset:
        raise ValueError("no dataset: give --dataset or set DATASETS.TEST")
    summary = analyze(cfg, dataset, args.max_images, args.area_bins)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
