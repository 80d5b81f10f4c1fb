#!/usr/bin/env python
"""Plot the training losses, learning rate and evaluation metrics of a detectron2 ``metrics.json``.

    python tools/plot_metrics.py output/metrics.json --output output/curves.png

``metrics.json`` holds one JSON object per line, written by detectron2's JSONWriter: training
lines carry "iteration", "total_loss", "loss_*" and "lr"; evaluation results carry keys such as
"sem_seg/mIoU", "panoptic_seg/PQ" or "segm/AP" (on their own line or on a training line).

The figure has up to three panels: the total loss and the final decoder layer's loss terms (names
without a ``_<layer>`` suffix), each drawn raw (faint) and smoothed with a moving average; the
learning rate; and the evaluation metrics against iteration.
"""
import argparse
import json
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Headline metrics, plotted by default when present.
DEFAULT_METRICS = (
    "sem_seg/mIoU",
    "sem_seg/mACC",
    "panoptic_seg/PQ",
    "panoptic_seg/PQ_th",
    "panoptic_seg/PQ_st",
    "segm/AP",
    "segm/AP50",
)
# Loss terms of intermediate decoder layers end in "_<layer index>" (deep supervision).
_INTERMEDIATE_LOSS = re.compile(r"_\d+$")

Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(path: str) -> List[Dict]:
    """The JSON objects of ``path``, one per non-empty line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected detectron2's metrics.json)")
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line_number}: not a JSON object ({e.msg}); metrics.json must hold one "
                    f"JSON object per line. Line starts with: {line[:80]!r}"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def split_series(records: Sequence[Dict], path: str = "metrics.json") -> Tuple[Series, Series, Series]:
    """
    Returns:
        (losses, learning_rates, metrics): each ``{name: [(iteration, value), ...]}`` in file
        order; losses are "total_loss" and the "loss_*" keys, metrics the keys with a "/".
        Values that are not numbers are skipped (NaN, from a diverged run, is kept).
    """
    losses, learning_rates, metrics = defaultdict(list), defaultdict(list), defaultdict(list)
    for index, record in enumerate(records):
        if "iteration" not in record:
            raise KeyError(f"{path}: entry {index + 1} has no 'iteration' key; keys: {sorted(record)[:10]}")
        iteration = record["iteration"]
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key == "total_loss" or key.startswith("loss_"):
                losses[key].append((iteration, float(value)))
            elif key == "lr":
                learning_rates[key].append((iteration, float(value)))
            elif "/" in key:
                metrics[key].append((iteration, float(value)))
    return dict(losses), dict(learning_rates), dict(metrics)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of the last ``window`` values (fewer at the start), so the curve keeps its length."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def main_loss_names(losses: Series) -> List[str]:
    """"total_loss" first, then the final layer's terms, sorted."""
    names = sorted(k for k in losses if k != "total_loss" and not _INTERMEDIATE_LOSS.search(k))
    return (["total_loss"] if "total_loss" in losses else []) + names


def plot(losses: Series, learning_rates: Series, metrics: Series, metric_names: Sequence[str],
         output: str, smooth: int, title: str = "") -> None:
    panels = []
    if losses:
        panels.append("loss")
    if learning_rates:
        panels.append("lr")
    if metric_names:
        panels.append("metrics")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "loss":
            for name in main_loss_names(losses):
                iterations, values = zip(*losses[name])
                line, = ax.plot(iterations, moving_average(values, smooth), label=name)
                ax.plot(iterations, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
            ax.set_ylabel(f"loss (moving average of {smooth} logged values)")
            finite = [v for name in main_loss_names(losses) for _, v in losses[name] if math.isfinite(v)]
            if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                ax.set_yscale("log")
        elif panel == "lr":
            iterations, values = zip(*learning_rates["lr"])
            ax.plot(iterations, values, label="lr")
            ax.set_ylabel("learning rate")
        else:
            for name in metric_names:
                iterations, values = zip(*metrics[name])
                ax.plot(iterations, values, marker="o", label=name)
            ax.set_ylabel("metric")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Plot loss, learning-rate and metric curves of metrics.json")
    parser.add_argument("metrics_json", help="detectron2's metrics.json (one JSON object per line)")
    parser.add_argument("--output", help="PNG to write (default: curves.png beside metrics.json)")
    parser.add_argument("--smooth", type=int, default=5,
                        help="moving-average window for the losses, in logged values (detectron2 "
                        "logs the median of every 20 iterations)")
    parser.add_argument("--metrics", nargs="+",
                        help="evaluation keys to plot (default: those of " + ", ".join(DEFAULT_METRICS)
                        + " that are present)")
    return parser


def main(argv: Optional[List[str]] = None) -> str:
    """Returns the path of the PNG written."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.metrics_json)), "curves.png")

    records = read_metrics(args.metrics_json)
    losses, learning_rates, metrics = split_series(records, args.metrics_json)
    if args.metrics:
        missing = [m for m in args.metrics if m not in metrics]
        if missing:
            raise KeyError(
                f"{args.metrics_json}: no values for --metrics {missing}; evaluation keys present: "
                f"{sorted(metrics) or 'none'}"
            )
        metric_names = list(args.metrics)
    else:
        metric_names = [m for m in DEFAULT_METRICS if m in metrics]
    if not losses and not learning_rates and not metric_names:
        raise ValueError(
            f"{args.metrics_json}: nothing to plot: no 'total_loss' / 'loss_*' / 'lr' values and none "
            f"of the metrics {list(DEFAULT_METRICS)} (evaluation keys present: {sorted(metrics) or 'none'})"
        )
    plot(losses, learning_rates, metrics, metric_names, output, args.smooth, title=args.metrics_json)
    print(f"Wrote {output}")
    return output


if __name__ == "__main__":
    main()
