#!/usr/bin/env python
"""
Convert torchvision ImageNet ResNet weights into a detectron2 pickle (or, for an output name
ending in ``.safetensors``, a safetensors file) for ``MODEL.WEIGHTS``.

    wget https://download.pytorch.org/models/resnet50-0676ba61.pth
    python tools/convert-torchvision-to-d2.py resnet50-0676ba61.pth R-50-torchvision.pkl
    python tools/convert-torchvision-to-d2.py resnet50-0676ba61.pth R-50-torchvision.safetensors

Key mapping (torchvision -> detectron2 ResNet):

    conv1                      -> stem.conv1
    bn1                        -> stem.conv1.norm
    layer{N}.{M}.conv{K}       -> res{N+1}.{M}.conv{K}
    layer{N}.{M}.bn{K}         -> res{N+1}.{M}.conv{K}.norm
    layer{N}.{M}.downsample.0  -> res{N+1}.{M}.shortcut
    layer{N}.{M}.downsample.1  -> res{N+1}.{M}.shortcut.norm
    fc.*, *.num_batches_tracked dropped

The output is ``{"model": {key: numpy array}, "__author__": "torchvision",
"matching_heuristics": True}`` (in a .safetensors file: the arrays, with ``__author__`` and
``matching_heuristics`` in its metadata); the heuristics let detectron2's checkpointer find the keys under
the model's ``backbone.`` prefix. torchvision's models differ from detectron2's MSRA defaults, so
use them with::

    MODEL.RESNETS.STRIDE_IN_1X1 False          # torchvision puts the stride in the 3x3 conv
    MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]
    MODEL.PIXEL_STD  [58.395, 57.120, 57.375]
    INPUT.FORMAT RGB
"""
import argparse
import os
import re
import sys
from typing import Dict, Mapping

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mask_former.checkpoint.checkpointer import save_weights_file  # noqa: E402

_DROPPED = re.compile(r"(^fc\.|\.num_batches_tracked$)")


def convert_key(key: str) -> str:
    """The detectron2 name of torchvision ResNet parameter / buffer ``key``."""
    match = re.match(r"^conv1\.(.+)$", key)
    if match:
        return f"stem.conv1.{match.group(1)}"
    match = re.match(r"^bn1\.(.+)$", key)
    if match:
        return f"stem.conv1.norm.{match.group(1)}"
    match = re.match(r"^layer(\d+)\.(\d+)\.(.+)$", key)
    if match:
        stage, block, rest = int(match.group(1)) + 1, match.group(2), match.group(3)
        prefix = f"res{stage}.{block}"
        for pattern, replacement in (
            (r"^conv(\d+)\.(.+)$", r"conv\1.\2"),
            (r"^bn(\d+)\.(.+)$", r"conv\1.norm.\2"),
            (r"^downsample\.0\.(.+)$", r"shortcut.\1"),
            (r"^downsample\.1\.(.+)$", r"shortcut.norm.\1"),
        ):
            if re.match(pattern, rest):
                return f"{prefix}.{re.sub(pattern, replacement, rest)}"
    raise KeyError(
        f"Unexpected key {key!r}: not part of a torchvision ResNet (expected conv1.*, bn1.*, "
        "layer<N>.<M>.{conv,bn}<K>.*, layer<N>.<M>.downsample.{0,1}.*, fc.*)"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "input") -> Dict[str, np.ndarray]:
    """
    Args:
        state_dict: a torchvision ResNet (18/34/50/101/152) state dict.
        source: where it came from, for error messages.
    Returns:
        detectron2 key -> numpy array, without ``fc.*`` and ``num_batches_tracked``.
    """
    if "conv1.weight" not in state_dict or not any(k.startswith("layer1.") for k in state_dict):
        some = ", ".join(sorted(state_dict)[:5]) or "(none)"
        raise KeyError(
            f"{source}: not a torchvision ResNet state dict (no 'conv1.weight' / 'layer1.*'); "
            f"found keys such as: {some}"
        )
    converted = {}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: value of {key!r} is a {type(value).__name__}, not a tensor")
        converted[convert_key(key)] = value.detach().cpu().numpy()
    return converted


def load_torchvision_checkpoint(path: str) -> Mapping[str, torch.Tensor]:
    """A torchvision state dict, saved as is or under "state_dict" / "model"."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
                return checkpoint[wrapper]
        return checkpoint
    raise TypeError(f"{path}: expected a state dict (a dict of tensors), got a {type(checkpoint).__name__}")


def main(argv=None) -> Dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(
        description="Convert torchvision ResNet ImageNet weights (.pth) to a detectron2 pickle (.pkl) "
        "or a .safetensors file"
    )
    parser.add_argument("input", help="torchvision ResNet state dict, e.g. resnet50-0676ba61.pth")
    parser.add_argument("output", help="output file: .safetensors, or a .pkl pickle")
    args = parser.parse_args(argv)

    weights = convert_state_dict(load_torchvision_checkpoint(args.input), source=args.input)
    save_weights_file(weights, args.output, author="torchvision", matching_heuristics=True)
    print(f"Wrote {len(weights)} tensors to {args.output}. Use it with MODEL.RESNETS.STRIDE_IN_1X1 False, "
          "MODEL.PIXEL_MEAN [123.675, 116.280, 103.530], MODEL.PIXEL_STD [58.395, 57.120, 57.375], "
          "INPUT.FORMAT RGB")
    return weights


if __name__ == "__main__":
    main()
