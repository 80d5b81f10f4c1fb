"""End-to-end runs of tools/train_net.py on the tiny synthetic dataset: training of each task,
evaluation, --eval-only (with test-time augmentation), exact resume after a kill, 2-process Gloo
training, and faults."""
import json
import math
import shutil
import signal
import subprocess
import time

import pytest
import torch

from train_utils import REPO_ROOT, TASK_OPTS, read_metrics, run_train_net, train_net_cmd, train_net_env

EXPECTED_METRICS = {
    "panoptic": {"panoptic_seg": "PQ", "sem_seg": "mIoU", "segm": "AP"},
    "semantic": {"sem_seg": "mIoU"},
    "instance": {"segm": "AP"},
}


@pytest.fixture(scope="module", params=sorted(TASK_OPTS))
def trained(request, tiny_synthetic_root, tmp_path_factory):
    task = request.param
    out = tmp_path_factory.mktemp(f"train_{task}")
    run_train_net(tiny_synthetic_root, opts=TASK_OPTS[task] + [
        "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "20", "OUTPUT_DIR", str(out)])
    return task, out


def test_training_writes_checkpoints_metrics_and_decreasing_loss(trained):
    task, out = trained
    assert (out / "model_0000019.pth").is_file()
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    train_lines = [m for m in read_metrics(out) if "total_loss" in m]
    assert [m["iteration"] for m in train_lines] == [19, 39]
    losses = [m["total_loss"] for m in train_lines]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


def test_end_of_training_evaluation_reports_every_metric(trained):
    task, out = trained
    results = json.loads((out / "eval_results.json").read_text())
    for group, metric in EXPECTED_METRICS[task].items():
        assert math.isfinite(results[group][metric]), (group, metric, results)
    assert set(results) == set(EXPECTED_METRICS[task])


# The semantic model is also evaluated with multi-scale + flip test-time augmentation in the same
# run: its results come as "sem_seg_TTA" beside the plain ones.
TTA_OPTS = {"semantic": ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48, 64)", "TEST.AUG.MAX_SIZE", "256"]}


def test_eval_only_reproduces_end_of_training_metrics(trained, tiny_synthetic_root, tmp_path):
    task, out = trained
    proc = run_train_net(tiny_synthetic_root, "--eval-only", opts=TASK_OPTS[task] + TTA_OPTS.get(task, []) + [
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)])
    after_training = json.loads((out / "eval_results.json").read_text())
    eval_only = json.loads((tmp_path / "eval_results.json").read_text())
    if task in TTA_OPTS:
        tta = eval_only.pop("sem_seg_TTA")
        assert 0 <= tta["mIoU"] <= 100
        assert (tmp_path / "inference_TTA").is_dir()
    assert eval_only.keys() == after_training.keys()
    for group in after_training:
        for metric, value in after_training[group].items():
            if value is None:
                assert eval_only[group][metric] is None
            else:
                assert eval_only[group][metric] == pytest.approx(value, abs=1e-6), (group, metric)
    # the printed tables carry the same numbers
    headline = EXPECTED_METRICS[task]
    printed = proc.stdout + proc.stderr
    assert "copypaste:" in printed
    for group, metric in headline.items():
        assert f"{after_training[group][metric]:.4f}" in printed


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# 12 iterations, a checkpoint every 4; colour augmentation and dropout draw random numbers, whose
# state a resumed run must restore
SHORT_RUN_OPTS = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "0",
                  "INPUT.COLOR_AUG_SSD", "True", "MODEL.MASK_FORMER.DROPOUT", "0.1"]


@pytest.fixture(scope="module")
def short_run(tiny_synthetic_root, tmp_path_factory):
    """The output folder of a run of SHORT_RUN_OPTS that went through without a stop."""
    out = tmp_path_factory.mktemp("short_run")
    run_train_net(tiny_synthetic_root, opts=SHORT_RUN_OPTS + ["OUTPUT_DIR", str(out)])
    return out


def test_resume_after_kill_matches_uninterrupted_run(short_run, tiny_synthetic_root, tmp_path):
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(train_net_cmd(opts=SHORT_RUN_OPTS + ["OUTPUT_DIR", str(interrupted)]), cwd=REPO_ROOT,
                            env=train_net_env(tiny_synthetic_root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tag = interrupted / "last_checkpoint"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if tag.is_file() and tag.read_text() == "model_0000007.pth":
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "model_final.pth").exists(), "the run finished before it could be killed"
    killed_at = tag.read_text()
    assert killed_at in ("model_0000007.pth", "model_0000011.pth")

    run_train_net(tiny_synthetic_root, "--resume", opts=SHORT_RUN_OPTS + ["OUTPUT_DIR", str(interrupted)])
    resumed_log = (interrupted / "log.txt").read_text()
    assert "Starting training from iteration 8" in resumed_log

    expected = load_weights(short_run / "model_final.pth")
    actual = load_weights(interrupted / "model_final.pth")
    assert expected.keys() == actual.keys()
    # Same seed, CPU, no data loader workers: the resumed run repeats the uninterrupted one
    # operation for operation, so the weights are bitwise equal.
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_two_gloo_processes_match_one_process(tiny_synthetic_root, tmp_path):
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "2",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
            "INPUT.RANDOM_FLIP", "none"]
    single, double = tmp_path / "one", tmp_path / "two"
    # one iteration each: metrics.json then holds exactly the losses of iteration 1
    run_train_net(tiny_synthetic_root, opts=opts + ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(single)])
    run_train_net(tiny_synthetic_root, "--num-gpus", "2",
                  opts=opts + ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(double)])
    one = [m for m in read_metrics(single) if "total_loss" in m]
    two = [m for m in read_metrics(double) if "total_loss" in m]
    assert [m["iteration"] for m in one] == [m["iteration"] for m in two] == [0]
    # Both see the same two images (the sampler's stream is split between the processes) and the
    # same initial weights (DDP broadcasts those of process 0). The mask losses are normalized by
    # the number of masks averaged over the processes, so the mean over processes equals the
    # single-process value up to float rounding. The class loss is a weighted mean per process
    # (as in DETR): it differs from the weighted mean over the whole batch when the images have
    # different numbers of segments, by a few percent here.
    for key in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-4), key
    assert two[0]["loss_ce"] == pytest.approx(one[0]["loss_ce"], rel=0.05)

    # a few more iterations together: one set of checkpoints, written by the main process
    run_train_net(tiny_synthetic_root, "--num-gpus", "2", "--resume",
                  opts=opts + ["SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(double)])
    assert sorted(p.name for p in double.glob("*.pth")) == ["model_0000001.pth", "model_0000003.pth",
                                                             "model_final.pth"]
    assert (double / "last_checkpoint").read_text() == "model_final.pth"
    assert "Starting training from iteration 1" in (double / "log.txt").read_text()


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(short_run, tiny_synthetic_root, tmp_path):
    # the run as it stood after its checkpoint of iteration 4
    shutil.copy(short_run / "model_0000003.pth", tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    good = load_weights(tmp_path / "model_0000003.pth")
    # Continue with a fault that makes every prediction non-finite from iteration 4 on: a zero
    # normalization std turns the input images into inf/NaN (as diverged weights would). A
    # checkpoint every iteration: none may be written after the fault.
    proc = run_train_net(tiny_synthetic_root, "--resume", check=False, opts=SHORT_RUN_OPTS + [
        "SOLVER.CHECKPOINT_PERIOD", "1", "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", "OUTPUT_DIR", str(tmp_path)])
    assert proc.returncode != 0
    assert "Starting training from iteration 4" in (tmp_path / "log.txt").read_text()
    assert "Loss became infinite or NaN at iteration=4" in proc.stderr
    assert "cost of image" in proc.stderr  # which image and which term
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000003.pth"]
    weights = load_weights(tmp_path / "model_0000003.pth")
    for key in good:
        assert torch.equal(good[key], weights[key])


def test_missing_weights_fail_before_training(tiny_synthetic_root, tmp_path):
    proc = run_train_net(tiny_synthetic_root, check=False, opts=[
        "MODEL.WEIGHTS", str(tmp_path / "nope.pkl"), "OUTPUT_DIR", str(tmp_path / "out")])
    assert proc.returncode != 0
    assert "MODEL.WEIGHTS" in proc.stderr and "nope.pkl" in proc.stderr
    assert "Starting training" not in proc.stderr + proc.stdout


def test_amp_on_cpu_is_refused_with_a_clear_error(tiny_synthetic_root, tmp_path):
    proc = run_train_net(tiny_synthetic_root, check=False, opts=[
        "SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path)])
    assert proc.returncode != 0
    assert "SOLVER.AMP.ENABLED=True needs a CUDA device" in proc.stderr
