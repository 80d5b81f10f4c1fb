#!/usr/bin/env python
"""Draw a MaskFormer model's semantic, instance or panoptic predictions on images, a video or a webcam.

    python tools/demo.py --config-file configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml \
        --input img1.jpg images/ "more/*.png" --output out/ --json \
        --opts MODEL.WEIGHTS model_final.pkl

The same program as the console script ``maskformer-demo`` (same arguments; ``--help`` lists
them), run from a source checkout. The code is in ``mask_former/cli/demo.py``; its functions are
reachable from this module too.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mask_former.cli.demo import *  # noqa: E402,F401,F403
from mask_former.cli.demo import (  # noqa: E402,F401
    check_args,
    expand_inputs,
    get_parser,
    main,
    run_on_images,
    run_on_video,
    run_on_webcam,
    setup_cfg,
    visualization_paths,
)

if __name__ == "__main__":
    sys.exit(main())
