#!/usr/bin/env python
"""
Convert a HuggingFace ``transformers`` MaskFormer (``MaskFormerForInstanceSegmentation``, Swin or
ResNet backbone) into a detectron2 checkpoint and config for this project.

Usage:
    python tools/convert-hf-to-d2.py facebook/maskformer-swin-base-ade maskformer_swin_base_ade.pkl
    python tools/convert-hf-to-d2.py maskformer-swin-base-ade/ maskformer_swin_base_ade.safetensors
    python tools/demo.py --config-file maskformer_swin_base_ade.yaml --input img.jpg --output out/

Input: a directory written by ``save_pretrained`` (config.json and model.safetensors, sharded
safetensors or pytorch_model.bin; preprocessor_config.json, when present, gives the input
normalization and test resolution), or a hub id (``owner/name``): its files are downloaded into
the HuggingFace cache, or, offline (``--offline`` or ``HF_HUB_OFFLINE=1``), read from the cache
(``huggingface_hub.snapshot_download``; an id that is not there is an error saying so). Weights
are read under the names they have on disk.

Output:
  * ``OUTPUT.pkl``: ``{"model": {key: numpy array}, "__author__": "huggingface-converted",
    "matching_heuristics": False}`` in the layout of the published MaskFormer checkpoints; or
    ``OUTPUT.safetensors``: the same arrays in the safetensors format (no pickle);
  * ``OUTPUT.yaml`` (or ``--config-out``): plain YAML with the matching architecture
    (MODEL.*, INPUT.FORMAT/MIN_SIZE_TEST/MAX_SIZE_TEST), MODEL.WEIGHTS pointing at the checkpoint
    and MODEL.CLASS_NAMES, the class names of the HF config's ``id2label``, which the demo and
    ``mask_former.demo.Predictor`` label classes with (while DATASETS.TEST names no dataset).
    It merges onto the defaults of ``add_mask_former_config``; add DATASETS (and the dataset's
    metadata) for evaluation and for panoptic drawings (which need the thing classes).

Every HF weight is converted or listed in ``HF_DROPPED_KEYS`` with its reason, otherwise the
conversion fails naming the left-over keys; by default the converted weights are also checked
against a model built from the converted config (no missing/unexpected keys, same shapes).
"""
import argparse
import os
import sys

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mask_former.checkpoint.checkpointer import save_weights_file  # noqa: E402
from mask_former.checkpoint.hf_conversion import convert_hf_maskformer, resolve_hf_checkpoint  # noqa: E402


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with one-line lists, as in the model-zoo configs."""


_ConfigDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def write_config(d2_config: dict, path: str, source: str) -> None:
    header = (
        f"# MaskFormer converted from the HuggingFace checkpoint {source}\n"
        "# by tools/convert-hf-to-d2.py; merges onto add_mask_former_config's defaults.\n"
    )
    with open(path, "w") as f:
        f.write(header)
        yaml.dump({**d2_config, "VERSION": 2}, f, Dumper=_ConfigDumper, sort_keys=False,
                  default_flow_style=False)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a HuggingFace MaskFormer directory (save_pretrained) to a detectron2 "
        ".pkl or .safetensors checkpoint and a YAML config for this project."
    )
    parser.add_argument("input", help="directory with config.json and model.safetensors (save_pretrained), "
                        "or a HuggingFace hub id such as facebook/maskformer-swin-base-ade")
    parser.add_argument("output", help="output checkpoint, e.g. maskformer_swin_base_ade.pkl or .safetensors")
    parser.add_argument("--config-out", help="output YAML config (default: OUTPUT with .yaml)")
    parser.add_argument("--revision", help="hub id only: the branch, tag or commit (default: main)")
    parser.add_argument("--cache-dir", help="hub id only: the HuggingFace cache (default: huggingface_hub's, "
                        "HF_HUB_CACHE / HF_HOME)")
    parser.add_argument("--offline", action="store_true",
                        help="hub id only: read it from the HuggingFace cache, never from the network "
                        "(also when HF_HUB_OFFLINE=1)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip building the model from the converted config to check the weights")
    args = parser.parse_args(argv)

    if not args.output.endswith((".pkl", ".safetensors")):
        parser.error(f"output {args.output!r} must end with .pkl (a detectron2 pickle of numpy weights) "
                     "or .safetensors")
    config_out = args.config_out or os.path.splitext(args.output)[0] + ".yaml"

    directory = resolve_hf_checkpoint(args.input, revision=args.revision, cache_dir=args.cache_dir,
                                      offline=True if args.offline else None)
    if directory != args.input:
        print(f"{args.input}: reading {directory}")
    weights, d2_config = convert_hf_maskformer(directory, verify=not args.no_verify)
    for path in (args.output, config_out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    d2_config["MODEL"]["WEIGHTS"] = os.path.abspath(args.output)
    save_weights_file(weights, args.output, author="huggingface-converted", matching_heuristics=False)
    write_config(d2_config, config_out, args.input + (f" (revision {args.revision})" if args.revision else ""))
    num_params = sum(int(np.prod(v.shape)) for v in weights.values())
    print(f"Wrote {len(weights)} tensors ({num_params} values) to {args.output} and the config to {config_out}")


if __name__ == "__main__":
    sys.exit(main())
