#!/usr/bin/env python
"""`make demo`: the whole pipeline on the built-in synthetic dataset, on 2 CPU cores, for the built-in
MaskFormer (about 12 minutes), or for both model families side by side with
``--models maskformer panoptic_segformer`` (about twice as long; `make demo DEMO_MODELS=...`):

1. generate the synthetic dataset (skipped when it exists);
then for each model:
2. train its small config (configs/synthetic/*_R18.yaml; resumed if an earlier run was
   interrupted, skipped when it already finished) and evaluate it on the val split: PQ, mIoU and
   mask AP from the one model;
3. run tools/demo.py for each task on val images (drawn 3 times larger) and on real photographs
   shipped with scikit-image;
4. plot the training curves;
and, for MaskFormer, evaluate again with mask-wise merging. It prints the metrics of the models
side by side. Everything lands in --output (default output/demo), one folder per model. Each step
is announced as "[step i/N] what it does" and ends with its duration and the time since the start.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# The built-in models, trained for about the same CPU time on the synthetic dataset.
MODELS = {
    "maskformer": REPO_ROOT / "configs" / "synthetic" / "maskformer_panoptic_R18.yaml",
    "panoptic_segformer": REPO_ROOT / "configs" / "synthetic" / "panoptic_segformer_R18.yaml",
}
# What --models trains by default: make demo stays within about 15 minutes on 2 cores.
DEFAULT_MODELS = ("maskformer",)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image (no download)
VAL_SCALE = 3  # the 128 x 128 val images are drawn 3 times larger so that their labels are legible


def format_seconds(seconds: float) -> str:
    """``"42s"``, ``"5m 07s"`` or ``"1h 02m 03s"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class Steps:
    """Announces the numbered steps of a run and how long each took::

        steps = Steps(3)
        with steps.step("train the model"):
            ...
        # [step 1/3] train the model (at 0s)
        # [step 1/3] done in 5m 07s (5m 07s since the start)
    """

    def __init__(self, total: int, out=None, clock=time.monotonic):
        self.total = total
        self.index = 0
        self.out = out
        self.clock = clock
        self.started = clock()

    def _print(self, message: str) -> None:
        print(message, file=self.out if self.out is not None else sys.stdout, flush=True)

    @contextlib.contextmanager
    def step(self, what: str):
        self.index += 1
        prefix = f"[step {self.index}/{self.total}]"
        begin = self.clock()
        self._print(f"\n{prefix} {what} (at {format_seconds(begin - self.started)})")
        try:
            yield
        except BaseException:
            self._print(f"{prefix} failed after {format_seconds(self.clock() - begin)}")
            raise
        end = self.clock()
        self._print(f"{prefix} done in {format_seconds(end - begin)} "
                    f"({format_seconds(end - self.started)} since the start)")


def run(cmd, log_file=None):
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    if log_file is None:
        subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, check=True)
        return
    with open(log_file, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-40:]
        raise SystemExit(f"command failed ({proc.returncode}), see {log_file}:\n" + "\n".join(tail))


def write_photos(photo_dir: Path):
    """Save a few of scikit-image's sample photographs as PNG files."""
    import skimage.data
    from PIL import Image

    photo_dir.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        path = photo_dir / f"{name}.png"
        if not path.exists():
            image = getattr(skimage.data, name)()
            if image.ndim == 2:
                image = image[:, :, None].repeat(3, axis=2)
            Image.fromarray(image[:, :, :3]).save(path)
    return sorted(photo_dir.glob("*.png"))


def headline(results):
    """The headline numbers of one evaluation (None where the task was not evaluated)."""
    panoptic = results.get("panoptic_seg", {})
    return {
        "PQ": panoptic.get("PQ"),
        "PQ things": panoptic.get("PQ_th"),
        "PQ stuff": panoptic.get("PQ_st"),
        "mIoU": results.get("sem_seg", {}).get("mIoU"),
        "mask AP": results.get("segm", {}).get("AP"),
    }


def format_table(rows):
    """A markdown table of ``{model: {metric: value}}``, one row per model."""
    metrics = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model, values in rows.items():
        cells = [("-" if v is None else f"{v:.1f}") for v in values.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo", help="where everything is written")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS),
                        help="which built-in models to train and show side by side (default: maskformer)")
    parser.add_argument("--config-file", help="train and show this config instead of the built-in models")
    parser.add_argument("--num-val-images", type=int, default=8, help="val images drawn by the demo")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for training")
    args = parser.parse_args(argv)

    output = (REPO_ROOT / args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    started = time.time()
    if args.config_file:
        models = {Path(args.config_file).stem: Path(args.config_file)}
    else:
        models = {name: MODELS[name] for name in args.models}
    compare_merging = "maskformer" in models and not args.config_file

    from mask_former.data.datasets.synthetic import generate_synthetic_dataset
    from mask_former.tasks import TASK_NAMES

    steps = Steps(1 + len(models) * (2 + len(TASK_NAMES)) + int(compare_merging))
    with steps.step("generate the synthetic dataset (skipped when it exists)"):
        datasets_root = os.environ.get("DETECTRON2_DATASETS", str(REPO_ROOT / "datasets"))
        dataset_dir = Path(generate_synthetic_dataset(root=datasets_root, progress=True))
    val_images = sorted((dataset_dir / "images" / "val").glob("*.png"))[: args.num_val_images]
    photos = write_photos(output / "photos")

    summary = {"models": {}}
    for model, config in models.items():
        model_dir = output / model
        train_dir = model_dir / "train"
        results_file = train_dir / "eval_results.json"
        train_seconds = None
        with steps.step(f"{model}: train {config.name} and evaluate it on the val split (PQ, mIoU, mask AP)"):
            if (train_dir / "model_final.pth").is_file() and results_file.is_file():
                print(f"Reusing the trained model in {train_dir}")
            else:
                t0 = time.time()
                run([python, "tools/train_net.py", "--config-file", config, "--resume",
                     "OUTPUT_DIR", train_dir, *args.opts])
                train_seconds = time.time() - t0
            results = json.loads(results_file.read_text())
        weights = train_dir / "model_final.pth"
        for task in TASK_NAMES:
            with steps.step(f"{model}: draw {task} predictions on {len(val_images)} val images and "
                            f"{len(photos)} photographs"):
                for name, inputs, scale in (("val", val_images, VAL_SCALE), ("photos", photos, 1)):
                    target = model_dir / "predictions" / task / name
                    run([python, "tools/demo.py", "--config-file", config, "--input", *inputs,
                         "--output", target, "--task", task, "--json", "--scale", scale,
                         "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"],
                        log_file=model_dir / f"demo_{task}_{name}.log")
        curves = model_dir / "training_curves.png"
        with steps.step(f"{model}: plot the training curves"):
            run([python, "tools/plot_metrics.py", train_dir / "metrics.json", "--output", curves])
        summary["models"][model] = {
            "config": str(config), "val metrics": headline(results), "training seconds": train_seconds,
            "model": str(weights), "predictions": str(model_dir / "predictions"), "training curves": str(curves),
        }

    if compare_merging:
        merged_dir = output / "maskformer" / "eval_mask_wise_merge"
        with steps.step("maskformer: evaluate again with mask-wise merging (TEST.PANOPTIC_MERGE mask)"):
            run([python, "tools/train_net.py", "--config-file", models["maskformer"], "--eval-only",
                 "MODEL.WEIGHTS", output / "maskformer" / "train" / "model_final.pth",
                 "MODEL.MASK_FORMER.TEST.PANOPTIC_MERGE", "mask", "OUTPUT_DIR", merged_dir],
                log_file=output / "maskformer" / "eval_mask_wise_merge.log")
        merged = json.loads((merged_dir / "eval_results.json").read_text())
        summary["models"]["maskformer, mask-wise merging"] = {"val metrics": headline(merged)}

    summary["total seconds"] = round(time.time() - started, 1)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table({m: v["val metrics"] for m, v in summary["models"].items()})
    (output / "summary.md").write_text(table + "\n")
    print("\n================ demo summary (synthetic val) ================")
    print(table)
    for model, values in summary["models"].items():
        if values.get("training seconds"):
            print(f"  {model}: training took {values['training seconds'] / 60:.1f} min (incl. evaluation)")
    print(f"  visualizations:  {output}/<model>/predictions/<task>/<val|photos>/")
    print(f"  training curves: {output}/<model>/training_curves.png")
    print(f"  summary:         {output / 'summary.json'}, {output / 'summary.md'}")


if __name__ == "__main__":
    main()
