#!/usr/bin/env python
"""Train and evaluate MaskFormer models.

    python tools/train_net.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pkl
    python tools/train_net.py --config-file ... --eval-only --precision bf16 MODEL.WEIGHTS model_final.pkl
    python tools/train_net.py --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint

On a machine without GPUs, --num-gpus N starts N CPU processes that train together over Gloo.
The code is in mask_former/cli/train_net.py, installed as the console script ``maskformer-train``.
"""
import os
import sys

# Run from a source checkout without installing the package (as before the console script existed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former.cli.train_net import argument_parser, main, run, setup  # noqa: E402,F401

if __name__ == "__main__":
    main()
