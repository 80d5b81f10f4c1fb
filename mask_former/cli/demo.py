"""Draw a MaskFormer model's semantic, instance or panoptic predictions on images, a video or a webcam
(``maskformer-demo``, or ``python tools/demo.py`` from a source checkout: the same program).

    maskformer-demo --config-file configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml \
        --input img1.jpg images/ "more/*.png" --output out/ --json \
        --opts MODEL.WEIGHTS model_final.pkl
    maskformer-demo --config-file ... --video-input video.mp4 --output out/ --opts MODEL.WEIGHTS ...

The task defaults to the first of panoptic / instance / semantic that the config has on; --task
asks for another (it is switched on for this run). Class names and colours come from the metadata
of DATASETS.TEST[0] (or MODEL.CLASS_NAMES, e.g. of a converted HuggingFace model); register your
own data with --dataset, as for tools/train_net.py. --scale N draws small images N times larger
(the predictions are made on the original images) so that the labels are legible. Inputs that
cannot be read are reported by name and skipped; the exit status is then 1.
"""
import argparse
import glob
import logging
import os
import sys
import time
from typing import List, Tuple

import cv2
import torch
import tqdm
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from mask_former.cli.precision import add_precision_argument, apply_precision
from mask_former.config import add_mask_former_config, merge_config_file
from mask_former.data.dataset_mappers import read_image  # the reader training uses
from mask_former.data.datasets.command_line import (
    DatasetArgumentError,
    add_dataset_argument,
    normalize_dataset_arguments,
    parse_dataset_specs,
    register_datasets_from_args,
    resolve_num_classes,
)
from mask_former.demo import SegmentationDemo, save_prediction_json, select_task
from mask_former.tasks import TASK_NAMES

__all__ = [
    "WINDOW_NAME",
    "IMAGE_EXTENSIONS",
    "get_parser",
    "check_args",
    "setup_cfg",
    "expand_inputs",
    "visualization_paths",
    "show",
    "run_on_images",
    "run_on_video",
    "run_on_webcam",
    "main",
]

WINDOW_NAME = "MaskFormer"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")

logger = logging.getLogger("mask_former.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="MaskFormer demo: draw predictions on images or videos")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+",
                        help="image files, glob patterns (quoted) or directories of images")
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="take frames from webcam 0")
    parser.add_argument(
        "--output",
        help="directory for the visualizations (a file name is allowed for a single image or a "
        "video); without it results are shown in a window",
    )
    parser.add_argument("--task", choices=TASK_NAMES,
                        help="what to draw; default: the first of " + ", ".join(TASK_NAMES)
                        + " that the config has on")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="instances and thing segments scoring below this are not drawn")
    add_precision_argument(parser)
    parser.add_argument("--scale", type=int, default=1, metavar="N",
                        help="draw the images N times larger (each pixel an N x N block) so that the "
                        "labels of small images are legible; the predictions are made on the original "
                        "images and the JSON is at their size")
    parser.add_argument("--json", action="store_true",
                        help="also write <name>.json (and a PNG of the label / segment map) "
                        "next to each visualization")
    parser.add_argument("--allow-unsafe-config", action="store_true",
                        help="let --config-file use !!python YAML tags, which run code while the "
                        "file loads: only for config files you trust (project configs are plain "
                        "YAML)")
    add_dataset_argument(parser)  # labels of your own data: the metadata of DATASETS.TEST[0]
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pkl")
    return parser


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Reject option combinations that cannot work (exits with status 2 and a message)."""
    normalize_dataset_arguments(args)  # config overrides written after a --dataset go to --opts
    try:
        parse_dataset_specs(args.dataset)
    except DatasetArgumentError as e:
        parser.error(str(e))
    if args.scale < 1:
        parser.error(f"--scale must be a positive integer, got {args.scale}")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must lie in [0, 1], got {args.confidence_threshold}")
    if args.json and not args.input:
        parser.error("--json is only supported with --input images")
    if args.json and not args.output:
        parser.error("--json writes files next to the visualizations: pass --output too")
    if args.webcam and args.output:
        parser.error("--webcam shows results in a window; --output is not supported")
    if args.video_input and not os.path.isfile(args.video_input):
        parser.error(f"--video-input {args.video_input}: no such file")


def setup_cfg(args):
    """Config from the file and --opts, with the requested task on and CPU when there is no GPU.
    Returns (frozen cfg, task)."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, args.config_file, allow_unsafe=args.allow_unsafe_config)
    cfg.merge_from_list(args.opts)
    apply_precision(cfg, args)
    resolve_num_classes(cfg, "DATASETS.TEST")  # NUM_CLASSES -1: the class count of the test dataset
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu":
        logger.info(f"CUDA is not available: running on the CPU instead of MODEL.DEVICE={cfg.MODEL.DEVICE}")
        cfg.MODEL.DEVICE = "cpu"
    task = select_task(cfg, args.task)
    cfg.freeze()
    return cfg, task


def expand_inputs(patterns: List[str]) -> Tuple[List[str], List[str]]:
    """
    Files to process from --input: files as given, glob patterns expanded, directories listed
    (their image files, by extension; other files there are logged and skipped).

    Returns:
        (paths, errors): errors name each pattern / path that gave nothing to process.
    """
    paths, errors = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            names = sorted(n for n in os.listdir(pattern) if not n.startswith("."))
            files = [os.path.join(pattern, n) for n in names if os.path.isfile(os.path.join(pattern, n))]
            images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
            skipped = sorted(set(files) - set(images))
            if skipped:
                logger.info(f"{pattern}: skipping files without an image extension: {skipped}")
            if not images:
                errors.append(f"{pattern}: directory holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(images)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        elif _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not matches:
                errors.append(f"{pattern}: pattern matches no files")
            paths.extend(matches)
        else:
            errors.append(f"{pattern}: no such file or directory")
    return paths, errors


def visualization_paths(inputs: List[str], output: str) -> List[str]:
    """
    Where each input's visualization goes. ``output`` is a file name only for a single input
    and when it has an image extension; otherwise it is a directory (created) and each
    visualization keeps its input's base name (``.png`` for extensions OpenCV cannot write).
    """
    if not os.path.isdir(output) and output.lower().endswith(IMAGE_EXTENSIONS):
        if len(inputs) > 1:
            raise ValueError(
                f"--output {output} names an image file but there are {len(inputs)} inputs; "
                "pass a directory"
            )
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return [output]
    os.makedirs(output, exist_ok=True)
    names = []
    for path in inputs:
        name = os.path.basename(path)
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            name = os.path.splitext(name)[0] + ".png"
        names.append(name)
    first_input = {}
    for name, path in zip(names, inputs):
        if name in first_input and first_input[name] != path:
            raise ValueError(
                f"Inputs {first_input[name]} and {path} would both be written to "
                f"{os.path.join(output, name)}; rename one or run them separately"
            )
        first_input.setdefault(name, path)
    return [os.path.join(output, n) for n in names]


def show(image_bgr, wait_ms: int) -> int:
    """Show an image in the demo window for ``wait_ms`` (0: until a key is pressed); returns the
    key pressed (-1 if none)."""
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, image_bgr)
    except cv2.error as e:
        raise RuntimeError(
            "Cannot open a window (OpenCV without GUI support, or no display); pass --output"
        ) from e
    return cv2.waitKey(wait_ms)


def run_on_images(demo: SegmentationDemo, args) -> int:
    """Returns the number of inputs that failed."""
    paths, errors = expand_inputs(args.input)
    for error in errors:
        logger.error(error)
    # de-duplicate while keeping order
    paths = list(dict.fromkeys(paths))
    outputs = visualization_paths(paths, args.output) if args.output and paths else [None] * len(paths)
    failed = list(errors)
    for path, out_path in zip(tqdm.tqdm(paths, desc="images", disable=not paths), outputs):
        try:
            # as training reads images (16-bit files keep their high byte, EXIF orientation applied)
            image = read_image(path, "BGR")
        except (OSError, ValueError) as e:  # ImageReadError is an OSError
            message = f"{path}: cannot read it as an image ({type(e).__name__}: {e}); skipped"
            logger.error(message)
            failed.append(message)
            continue
        start = time.perf_counter()
        prediction, vis = demo.run_on_image(image, scale=args.scale)
        logger.info(f"{path}: {prediction.summary()} in {time.perf_counter() - start:.2f}s")
        vis_bgr = vis.get_image()[:, :, ::-1]
        if out_path is None:
            if show(vis_bgr, wait_ms=0) == 27:  # esc
                break
            continue
        if not cv2.imwrite(out_path, vis_bgr):
            raise OSError(f"Could not write the visualization of {path} to {out_path}")
        if args.json:
            json_path = os.path.splitext(out_path)[0] + ".json"
            save_prediction_json(json_path, prediction, demo.metadata,
                                 file_name=os.path.abspath(path), visualization=os.path.basename(out_path))
    if failed:
        logger.error(f"{len(failed)} input(s) failed:\n  " + "\n  ".join(failed))
    return len(failed)


def _frames(capture):
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        yield frame


def run_on_video(demo: SegmentationDemo, args) -> int:
    capture = cv2.VideoCapture(args.video_input)
    if not capture.isOpened():
        raise ValueError(f"--video-input {args.video_input}: OpenCV cannot open it as a video")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer = None
    if args.output:
        output = args.output
        if os.path.isdir(output) or not os.path.splitext(output)[1]:
            os.makedirs(output, exist_ok=True)
            output = os.path.join(output, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
        size = (width * args.scale, height * args.scale)
        writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, size, True)
        if not writer.isOpened():
            raise OSError(f"--output {output}: OpenCV cannot write a video there")
    try:
        frames = demo.run_on_video(_frames(capture), scale=args.scale)
        for vis_frame in tqdm.tqdm(frames, total=num_frames, desc="frames"):
            if writer is not None:
                writer.write(vis_frame)
            elif show(vis_frame, wait_ms=1) == 27:
                break
    finally:
        capture.release()
        if writer is not None:
            writer.release()
            logger.info(f"Wrote {output}")
    return 0


def run_on_webcam(demo: SegmentationDemo, args) -> int:
    capture = cv2.VideoCapture(0)
    if not capture.isOpened():
        raise RuntimeError("Cannot open webcam 0")
    try:
        for vis_frame in demo.run_on_video(_frames(capture), scale=args.scale):
            if show(vis_frame, wait_ms=1) == 27:
                break
    finally:
        capture.release()
    return 0


def _setup_logging() -> None:
    """detectron2's console logging for the ``mask_former`` loggers, unless the calling program
    has configured logging itself (an application or a test calling :func:`main`)."""
    if not logging.getLogger().handlers and not logging.getLogger("mask_former").handlers:
        setup_logger(name="mask_former")


def main(argv=None) -> int:
    """Entry point of ``maskformer-demo``: parse ``argv`` (default: ``sys.argv[1:]``) and run.
    Returns the exit status: 0, or 1 when some input could not be processed."""
    _setup_logging()
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    register_datasets_from_args(args.dataset)  # before the config names them
    cfg, task = setup_cfg(args)
    logger.info(f"Task: {task}; config: {args.config_file}; weights: {cfg.MODEL.WEIGHTS or '(none)'}")
    demo = SegmentationDemo(cfg, task, confidence_threshold=args.confidence_threshold)
    if args.input:
        failed = run_on_images(demo, args)
    elif args.video_input:
        failed = run_on_video(demo, args)
    else:
        failed = run_on_webcam(demo, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
