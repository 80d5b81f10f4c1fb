#!/usr/bin/env python
"""
Convert an official Swin Transformer ImageNet checkpoint into a detectron2 pickle (or, for an
output name ending in ``.safetensors``, a safetensors file) that ``MODEL.WEIGHTS`` can point at
for a MaskFormer model with the ``D2SwinTransformer`` backbone.

Usage:
    python tools/convert-pretrained-swin-model-to-d2.py swin_tiny_patch4_window7_224.pth \
        swin_tiny_patch4_window7_224.pkl      # or swin_tiny_patch4_window7_224.safetensors

Input: a torch file ``{"model": state_dict}`` as released by the Swin authors (keys
``patch_embed.*``, ``layers.*``, ``norm.*``, ``head.*``).
Output: ``{"model": {"backbone." + key: numpy array}, "__author__": "third_party",
"matching_heuristics": True}``, the format detectron2's ``DetectionCheckpointer`` reads from
``.pkl`` files (a .safetensors output holds the arrays, with ``__author__`` and
``matching_heuristics`` in its metadata). Dropped: the classification head ``head.*``, the final
``norm.*`` (the backbone has one norm per output stage instead, ``norm0..norm3``, trained from scratch) and the
``*.attn_mask`` buffers of the classification model, which are fixed to the pre-training
resolution (the backbone computes its masks for each input size).
"""
import argparse
import os
import sys
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mask_former.checkpoint.checkpointer import save_weights_file  # noqa: E402

REQUIRED_KEYS = ("patch_embed.proj.weight",)
REQUIRED_PREFIXES = ("layers.",)
DROPPED_PREFIXES = ("head.", "norm.")
DROPPED_SUFFIXES = (".attn_mask",)


def convert_swin_state_dict(state_dict: Dict[str, torch.Tensor], source: str = "input"):
    """
    Args:
        state_dict: the official Swin classification state dict.
        source: name of where it came from, for error messages.
    Returns:
        dict ``"backbone." + key -> numpy array`` without the dropped keys (see module doc).
    """
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    missing += [
        p + "*" for p in REQUIRED_PREFIXES if not any(k.startswith(p) for k in state_dict)
    ]
    if missing:
        some = ", ".join(sorted(state_dict)[:5]) or "(none)"
        raise KeyError(
            f"{source}: not an official Swin Transformer state dict; missing {missing}. "
            f"Expected keys like 'patch_embed.proj.weight', 'layers.0.blocks.0.attn.qkv.weight'; "
            f"found keys such as: {some}"
        )
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(DROPPED_PREFIXES) or key.endswith(DROPPED_SUFFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{source}: value of '{key}' is a {type(value).__name__}, not a tensor"
            )
        converted["backbone." + key] = value.detach().cpu().numpy()
    return converted


def load_official_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Read ``{"model": state_dict}`` from an official Swin release file."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint)
        raise KeyError(
            f"{path}: expected an official Swin checkpoint, a dict with a 'model' state dict; "
            f"found {found}"
        )
    return checkpoint["model"]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert an official Swin Transformer checkpoint (.pth) to a detectron2 "
        "pickle (.pkl) or .safetensors file for D2SwinTransformer."
    )
    parser.add_argument(
        "input", help="official Swin checkpoint, e.g. swin_tiny_patch4_window7_224.pth"
    )
    parser.add_argument("output", help="output file: .safetensors, or a .pkl pickle")
    args = parser.parse_args(argv)

    weights = convert_swin_state_dict(load_official_checkpoint(args.input), source=args.input)
    save_weights_file(weights, args.output, author="third_party", matching_heuristics=True)
    num_params = sum(int(np.prod(v.shape)) for v in weights.values())
    print(f"Wrote {len(weights)} tensors ({num_params} values) to {args.output}")


if __name__ == "__main__":
    sys.exit(main())
