"""The ``--precision`` option of the command-line tools: the inference precision of the network
(``MODEL.MASK_FORMER.TEST.PRECISION``, both model families)."""
import argparse

from mask_former.modeling.inference_optimization import PRECISIONS

__all__ = ["add_precision_argument", "apply_precision"]


def add_precision_argument(parser: argparse.ArgumentParser, what: str = "inference") -> None:
    """Add ``--precision`` (the keys of ``PRECISIONS``) to ``parser``; ``what`` says what it applies to
    in the help."""
    parser.add_argument(
        "--precision", choices=sorted(PRECISIONS),
        help=f"precision of the network in {what} (sets MODEL.MASK_FORMER.TEST.PRECISION, after the "
        "config file and overrides; default: the config's, fp32 unless set): fp32, exact; bf16, "
        "faster on CPUs with AVX-512 bf16 / AMX and on recent GPUs; fp16, for GPUs without "
        "bfloat16 (post-processing stays float32)",
    )


def apply_precision(cfg, args: argparse.Namespace) -> None:
    """Write ``args.precision``, when given, into the (unfrozen) ``cfg``."""
    precision = getattr(args, "precision", None)
    if precision:
        cfg.MODEL.MASK_FORMER.TEST.PRECISION = precision
