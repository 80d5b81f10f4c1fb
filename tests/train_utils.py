"""Run tools/train_net.py in a subprocess on the tiny synthetic dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "tools" / "train_net.py"
CONFIG = REPO_ROOT / "configs" / "synthetic" / "maskformer_panoptic_R18.yaml"

# A small, fast version of the built-in recipe on 64x64 images.
TINY_OPTS = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
]

TASK_OPTS = {
    "panoptic": [],
    "semantic": [
        "DATASETS.TRAIN", "('synthetic_sem_seg_train',)", "DATASETS.TEST", "('synthetic_sem_seg_val',)",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
    ],
    "instance": [
        "DATASETS.TRAIN", "('synthetic_instance_train',)", "DATASETS.TEST", "('synthetic_instance_val',)",
        "INPUT.DATASET_MAPPER_NAME", "mask_former_instance", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5",
        "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False",
    ],
}


def train_net_cmd(*args, opts=(), config=CONFIG):
    return [sys.executable, str(TRAIN_NET), "--config-file", str(config), *args, *TINY_OPTS, *opts]


def train_net_env(datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_train_net(datasets_root, *args, opts=(), timeout=600, check=True):
    proc = subprocess.run(
        train_net_cmd(*args, opts=opts), cwd=REPO_ROOT, env=train_net_env(datasets_root),
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(output_dir):
    """Lines of detectron2's metrics.json (one JSON object per line)."""
    lines = Path(output_dir, "metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
