#!/usr/bin/env python
"""Generate the built-in synthetic dataset under ``<root>/synthetic``.

    python datasets/prepare_synthetic.py                      # 400 train / 50 val, 128 x 128
    python datasets/prepare_synthetic.py --root /data --num-train 2000 --size 256 --seed 1

``<root>`` defaults to ``$DETECTRON2_DATASETS`` (or ``datasets``), where the registered
``synthetic_*`` datasets look for it. Running it again with the same arguments does nothing;
other arguments replace the previous copy. See datasets/README.md for the layout.
"""

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "mask_former")):
    # run from a checkout without `pip install -e .`
    sys.path.insert(0, _REPO_ROOT)

from mask_former.data.datasets.synthetic.generator import generate_synthetic_dataset  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
        help="datasets root; the dataset goes to <root>/synthetic (default: $DETECTRON2_DATASETS "
        "or 'datasets')",
    )
    parser.add_argument("--num-train", type=int, default=400, help="images in the train split")
    parser.add_argument("--num-val", type=int, default=50, help="images in the val split")
    parser.add_argument("--size", type=int, default=128, help="image height and width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--max-instances",
        type=int,
        default=6,
        help="things drawn per image (before dropping hidden ones)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dataset_dir = generate_synthetic_dataset(
        root=args.root,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.size,
        seed=args.seed,
        max_instances=args.max_instances,
        progress=True,
    )
    print(f"Synthetic dataset ready in {dataset_dir}")
    return dataset_dir


if __name__ == "__main__":
    main()
