"""Train and evaluate MaskFormer models (``maskformer-train``, or ``python tools/train_net.py``).

    maskformer-train --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml --num-gpus 8
    maskformer-train --config-file ... --eval-only MODEL.WEIGHTS model_final.pkl
    maskformer-train --config-file ... --eval-only --precision bf16 MODEL.WEIGHTS model_final.pkl
    maskformer-train --config-file ... --resume          # continue from OUTPUT_DIR/last_checkpoint
    maskformer-train --config-file configs/custom/maskformer_R50_semantic.yaml \
        --dataset my_train semantic data/images/train data/semantic_train data/classes.txt \
        --dataset my_val semantic data/images/val data/semantic_val data/classes.txt OUTPUT_DIR out

``--dataset NAME FORMAT ARG...`` registers your data (semantic PNGs, COCO instances, COCO
panoptic; see ``--help``) in every process before the config is used; a config with
``MODEL.SEM_SEG_HEAD.NUM_CLASSES -1`` takes the class count from the training dataset.
On a machine without GPUs, --num-gpus N starts N CPU processes that train together over Gloo.
The configs of the model zoo are also inside the installed package:
``mask_former.model_zoo.get_config_file("ade20k-150/maskformer_R50_bs16_160k.yaml")``.
"""
import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from mask_former.checkpoint import MaskFormerCheckpointer, check_weights_available
from mask_former.cli.precision import add_precision_argument, apply_precision
from mask_former.config import add_mask_former_config, merge_config_file
from mask_former.data.datasets.command_line import (
    DatasetArgumentError,
    add_dataset_argument,
    check_datasets_registered,
    normalize_dataset_arguments,
    num_classes_from_metadata,
    parse_dataset_specs,
    register_datasets_from_args,
    resolve_num_classes,
)
from mask_former.engine import Trainer

__all__ = ["argument_parser", "parse_args", "setup", "run", "main"]


def argument_parser():
    """detectron2's training argument parser (``--config-file``, ``--eval-only``, ``--resume``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, then config overrides),
    plus ``--dataset`` registrations and this project's safety switches. Parse with
    :func:`parse_args`, which also sorts out config overrides written after a ``--dataset``."""
    parser = default_argument_parser()
    add_dataset_argument(parser)
    parser.add_argument("--allow-unsafe-config", action="store_true",
                        help="accept a config file with !!python tags (they run code while the file loads)")
    parser.add_argument("--allow-weights-mismatch", action="store_true",
                        help="with --eval-only: evaluate even when MODEL.WEIGHTS does not fit the model "
                        "(weights of another shape or missing are left as initialized)")
    add_precision_argument(parser, what="evaluation (with --eval-only, and the evaluations during training)")
    return parser


def parse_args(argv=None, parser=None):
    """Parse ``argv`` (default: ``sys.argv[1:]``): config overrides written after a ``--dataset``
    go to ``args.opts``, and bad ``--dataset`` arguments end the program with a usage error that
    names them (exit status 2)."""
    parser = parser or argument_parser()
    args = parser.parse_args(argv)
    normalize_dataset_arguments(args)
    try:
        parse_dataset_specs(args.dataset)  # checks files now, before processes are started
    except DatasetArgumentError as e:
        parser.error(str(e))
    return args


def setup(args):
    """The frozen config of a run (file + command-line overrides), with logging set up. The
    datasets it names must be registered (:func:`run` registers those of ``--dataset``); a
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` of -1 is replaced by the class count of the first training
    dataset (of the first test dataset with ``--eval-only``)."""
    normalize_dataset_arguments(args)
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, args.config_file, allow_unsafe=args.allow_unsafe_config)
    cfg.merge_from_list(args.opts)
    apply_precision(cfg, args)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE == "cuda":
        cfg.MODEL.DEVICE = "cpu"
    datasets_used = ("DATASETS.TEST",) if args.eval_only else ("DATASETS.TRAIN", "DATASETS.TEST")
    check_datasets_registered(cfg, datasets_used)
    num_classes = resolve_num_classes(cfg, datasets_used[0])
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mask_former")
    logger = logging.getLogger("mask_former.cli")
    for tokens in args.dataset:
        logger.info(f"Dataset {tokens[0]!r}: {num_classes_from_metadata(tokens[0])} classes, "
                    f"registered by --dataset {' '.join(tokens)}")
    if num_classes is not None:
        source = (cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN)[0]
        logger.info(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES: -1 in the config, so {num_classes}: the classes "
                    f"of dataset {source!r} ({datasets_used[0]}[0])")
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming:
        check_weights_available(cfg.MODEL.WEIGHTS)
    return cfg


def run(args):
    """What each process does: register the ``--dataset`` datasets, then train (or, with
    ``--eval-only``, evaluate) and return the results."""
    normalize_dataset_arguments(args)
    register_datasets_from_args(args.dataset)  # in every process: launch() starts fresh ones
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MaskFormerCheckpointer(
            model, save_dir=cfg.OUTPUT_DIR, allow_mismatch=args.allow_weights_mismatch
        ).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv=None):
    """Entry point of ``maskformer-train``: parse ``argv`` (default: ``sys.argv[1:]``) and start
    ``--num-gpus`` processes per machine (CPU processes over Gloo where there is no GPU)."""
    args = parse_args(argv)
    print("Command Line Args:", args)
    launch(
        run,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    main()
