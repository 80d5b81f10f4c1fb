#!/usr/bin/env python
"""`make demo`: the whole MaskFormer pipeline on the built-in synthetic dataset, on 2 CPU cores.

1. generate the synthetic dataset (skipped when it exists);
2. train the small MaskFormer of configs/synthetic/maskformer_panoptic_R18.yaml (resumed if an
   earlier run was interrupted, skipped when it already finished);
3. evaluate it on the val split: PQ, mIoU and mask AP from the one model;
4. run tools/demo.py for each task on val images and on real photographs shipped with
   scikit-image;
5. plot the training curves;
and print a summary. Everything lands in --output (default output/demo).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

DEFAULT_CONFIG = REPO_ROOT / "configs" / "synthetic" / "maskformer_panoptic_R18.yaml"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # bundled with scikit-image (no download)
TASKS = ("panoptic", "semantic", "instance")


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
    """The three headline numbers of one evaluation (None where the task was not evaluated)."""
    return {
        "PQ": results.get("panoptic_seg", {}).get("PQ"),
        "mIoU": results.get("sem_seg", {}).get("mIoU"),
        "mask AP": results.get("segm", {}).get("AP"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo", help="where everything is written")
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("--num-val-images", type=int, default=8, help="val images drawn by the demo")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for training")
    args = parser.parse_args(argv)

    output = (REPO_ROOT / args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    started = time.time()

    # 1. data
    from mask_former.data.datasets.synthetic import generate_synthetic_dataset

    datasets_root = os.environ.get("DETECTRON2_DATASETS", str(REPO_ROOT / "datasets"))
    dataset_dir = Path(generate_synthetic_dataset(root=datasets_root, progress=True))

    # 2. + 3. training, which ends with the evaluation on the val split
    train_dir = output / "train"
    results_file = train_dir / "eval_results.json"
    train_seconds = None
    if (train_dir / "model_final.pth").is_file() and results_file.is_file():
        print(f"Reusing the trained model in {train_dir}")
    else:
        t0 = time.time()
        run([python, "tools/train_net.py", "--config-file", args.config_file, "--resume",
             "OUTPUT_DIR", train_dir, *args.opts])
        train_seconds = time.time() - t0
    results = json.loads(results_file.read_text())

    # 4. demo on val images and on photographs
    weights = train_dir / "model_final.pth"
    val_images = sorted((dataset_dir / "images" / "val").glob("*.png"))[: args.num_val_images]
    photos = write_photos(output / "photos")
    for task in TASKS:
        for name, inputs in (("val", val_images), ("photos", photos)):
            target = output / "predictions" / task / name
            run([python, "tools/demo.py", "--config-file", args.config_file, "--input", *inputs,
                 "--output", target, "--task", task, "--json",
                 "--opts", "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"],
                log_file=output / f"demo_{task}_{name}.log")

    # 5. curves
    curves = output / "training_curves.png"
    run([python, "tools/plot_metrics.py", train_dir / "metrics.json", "--output", curves])

    summary = {
        "config": str(args.config_file),
        "val metrics": headline(results),
        "training seconds": train_seconds,
        "model": str(weights),
        "predictions": str(output / "predictions"),
        "training curves": str(curves),
        "total seconds": round(time.time() - started, 1),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n================ MaskFormer demo summary ================")
    for key, value in headline(results).items():
        print(f"  {key:8s} on synthetic val: {value:.1f}" if value is not None else f"  {key}: not evaluated")
    if train_seconds is not None:
        print(f"  training took {train_seconds / 60:.1f} min (incl. evaluation)")
    print(f"  visualizations:  {output / 'predictions'}/<task>/<val|photos>/")
    print(f"  training curves: {curves}")
    print(f"  all metrics:     {results_file}")
    print(f"  summary:         {output / 'summary.json'}")


if __name__ == "__main__":
    main()
