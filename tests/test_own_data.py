"""README.md's "Train on your own data", done as written: its commands are read from the README
and run in a folder holding a small dataset in the layout the section shows (the tiny synthetic
dataset, whose three annotation formats agree), with a tiny model and a few iterations appended
as config overrides. Each format trains, writes its metrics and draws the demo's pictures; the
fine-tuning command loads the panoptic model into the instance model, dropping the class head."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mask_former.data.datasets.synthetic import SYNTHETIC_METADATA
from train_utils import REPO_ROOT, read_metrics, train_net_env

SECTION = "## Train on your own data"

# A tiny model trained for a few iterations from scratch (no ImageNet download): ResNet-18,
# 32-d features, 1 encoder and 2 decoder layers, 64-pixel images.
TRAIN_OVERRIDES = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
    "MODEL.MASK_FORMER.DEC_LAYERS", "2", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "INPUT.CROP.ENABLED", "False",
    "INPUT.COLOR_AUG_SSD", "False", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "1",
]

# what each format's final evaluation reports (eval_results.json)
EXPECTED_METRICS = {
    "semantic": {"sem_seg": "mIoU"},
    "instance": {"segm": "AP"},
    "panoptic": {"panoptic_seg": "PQ", "sem_seg": "mIoU", "segm": "AP"},
}


def readme_commands():
    """The commands of each bash block of the section, by the format of the config they train
    (the fine-tuning block: "finetune"), with line continuations joined."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(r"```bash\n(.*?)```", text[start:end], re.S)
    commands = {}
    for block in blocks:
        lines = block.replace("\\\n", " ").splitlines()
        argvs = [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        config = argvs[0][argvs[0].index("--config-file") + 1]
        task = re.search(r"maskformer_R50_(\w+)\.yaml", config).group(1)
        key = "finetune" if "MODEL.WEIGHTS" in argvs[0] else task
        commands[key] = argvs
    return commands


COMMANDS = readme_commands()


def test_the_section_has_one_block_per_format_and_a_fine_tuning_command():
    assert set(COMMANDS) == {"semantic", "instance", "panoptic", "finetune"}
    for task in EXPECTED_METRICS:
        train, demo = COMMANDS[task]
        assert train[:2] == ["python", "tools/train_net.py"] and demo[:2] == ["python", "tools/demo.py"]
        assert f"configs/custom/maskformer_R50_{task}.yaml" in train
    assert COMMANDS["finetune"][0][:2] == ["python", "tools/train_net.py"]


@pytest.fixture(scope="module")
def workspace(tiny_synthetic_root, tmp_path_factory) -> Path:
    """A folder with data/ laid out as the section shows, where its commands run."""
    root = tmp_path_factory.mktemp("own_data")
    shutil.copytree(Path(tiny_synthetic_root) / "synthetic", root / "data")
    (root / "data" / "classes.txt").write_text("\n".join(SYNTHETIC_METADATA["stuff_classes"]) + "\n")
    return root


def run_readme_command(argv, workspace: Path):
    """Run a README command from ``workspace``: ``python`` is this interpreter, the tools and
    configs those of this checkout; a training gets the tiny-model overrides."""
    assert argv[0] == "python"
    argv = [sys.executable] + [str(REPO_ROOT / a) if a.startswith(("tools/", "configs/")) else a for a in argv[1:]]
    if argv[1].endswith("train_net.py"):
        argv += TRAIN_OVERRIDES
        if "MODEL.WEIGHTS" not in argv:
            argv += ["MODEL.WEIGHTS", ""]  # the configs start from ImageNet weights (a download)
    proc = subprocess.run(argv, cwd=workspace, env=train_net_env(workspace / "unused_datasets_root"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def output_dir(train_argv) -> str:
    return train_argv[train_argv.index("OUTPUT_DIR") + 1]


def demo_output(demo_argv) -> str:
    return demo_argv[demo_argv.index("--output") + 1]


@pytest.fixture(scope="module")
def trained(workspace):
    """Runs the commands of a format's block once; returns its OUTPUT_DIR and demo folder."""
    done = {}

    def run(task):
        if task not in done:
            train, demo = COMMANDS[task]
            run_readme_command(train, workspace)
            run_readme_command(demo, workspace)
            done[task] = workspace / output_dir(train), workspace / demo_output(demo)
        return done[task]

    return run


@pytest.mark.parametrize("task", sorted(EXPECTED_METRICS))
def test_readme_commands_train_evaluate_and_draw(task, trained, workspace):
    out, demo = trained(task)
    assert (out / "model_final.pth").is_file()
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics if "total_loss" in m][-1] == 2  # SOLVER.MAX_ITER 3
    results = json.loads((out / "eval_results.json").read_text())
    for group, metric in EXPECTED_METRICS[task].items():
        assert metric in results[group], results.keys()
    # the class count came from the data (NUM_CLASSES -1 in the config)
    expected_classes = 5 if task == "instance" else 8
    assert (f"MODEL.SEM_SEG_HEAD.NUM_CLASSES: -1 in the config, so {expected_classes}: the classes of "
            "dataset 'my_train'") in (out / "log.txt").read_text()
    assert f"NUM_CLASSES: {expected_classes}" in (out / "config.yaml").read_text()
    # one picture per validation image
    images = sorted(p.name for p in (workspace / "data" / "images" / "val").iterdir())
    assert sorted(p.name for p in demo.iterdir()) == images


def test_readme_fine_tuning_drops_the_class_head_and_keeps_the_rest(trained, workspace):
    trained("panoptic")  # the model it starts from
    (train,) = COMMANDS["finetune"]
    run_readme_command(train, workspace)
    log = (workspace / output_dir(train) / "log.txt").read_text()
    for key, shape in (("sem_seg_head.predictor.class_embed.weight", "(9, 32) in the checkpoint but (6, 32)"),
                       ("sem_seg_head.predictor.class_embed.bias", "(9,) in the checkpoint but (6,)"),
                       ("criterion.empty_weight", "(9,) in the checkpoint but (6,)")):
        assert f"Skip loading parameter '{key}' to the model due to incompatible shapes: {shape}" in log
    assert log.count("Skip loading parameter") == 3  # everything else was loaded
    assert "eval_results.json" in {p.name for p in (workspace / output_dir(train)).iterdir()}
