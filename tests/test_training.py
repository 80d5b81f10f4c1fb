"""End-to-end runs of tools/train_net.py on the tiny synthetic dataset: training of each task,
evaluation, --eval-only, exact resume after a kill, 2-process Gloo training, and faults."""
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train_utils import (REPO_ROOT, TASK_OPTS, read_metrics, run_train_net, train_net_cmd,
                         train_net_env)

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


def test_eval_only_reproduces_end_of_training_metrics(trained, tiny_synthetic_root, tmp_path):
    task, out = trained
    proc = run_train_net(tiny_synthetic_root, "--eval-only", opts=TASK_OPTS[task] + [
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)])
    after_training = json.loads((out / "eval_results.json").read_text())
    eval_only = json.loads((tmp_path / "eval_results.json").read_text())
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


def test_resume_after_kill_matches_uninterrupted_run(tiny_synthetic_root, tmp_path):
    opts = ["SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "0",
            "INPUT.COLOR_AUG_SSD", "True", "MODEL.MASK_FORMER.DROPOUT", "0.1"]
    reference = tmp_path / "uninterrupted"
    run_train_net(tiny_synthetic_root, opts=opts + ["OUTPUT_DIR", str(reference)])

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(train_net_cmd(opts=opts + ["OUTPUT_DIR", str(interrupted)]), cwd=REPO_ROOT,
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

    run_train_net(tiny_synthetic_root, "--resume", opts=opts + ["OUTPUT_DIR", str(interrupted)])
    resumed_log = (interrupted / "log.txt").read_text()
    assert "Starting training from iteration 8" in resumed_log

    expected = load_weights(reference / "model_final.pth")
    actual = load_weights(interrupted / "model_final.pth")
    assert expected.keys() == actual.keys()
    # Same seed, CPU, no data loader workers: the resumed run repeats the uninterrupted one
    # operation for operation, so the weights are bitwise equal.
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_two_gloo_processes_match_one_process(tiny_synthetic_root, tmp_path):
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
            "SOLVER.IMS_PER_BATCH", "2", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "INPUT.RANDOM_FLIP", "none"]
    single, double = tmp_path / "one", tmp_path / "two"
    run_train_net(tiny_synthetic_root, opts=opts + ["OUTPUT_DIR", str(single)])
    proc = run_train_net(tiny_synthetic_root, "--num-gpus", "2", opts=opts + ["OUTPUT_DIR", str(double)])
    assert "world_size=2" in proc.stdout + proc.stderr or "World size: 2" in (double / "log.txt").read_text() \
        or (double / "log.txt").is_file()

    # one set of checkpoints, written by the main process only
    assert sorted(p.name for p in double.glob("*.pth")) == ["model_final.pth"]
    assert (double / "last_checkpoint").read_text() == "model_final.pth"

    one = [m for m in read_metrics(single) if "total_loss" in m][-1]
    two = [m for m in read_metrics(double) if "total_loss" in m][-1]
    assert one["iteration"] == two["iteration"] == 1
    # The logged values are the medians of iterations 0 and 1; gradients of the two processes
    # are averaged, so both runs take the same step. The mask losses are normalized by the number
    # of masks averaged over processes and match to float precision; the class loss is a
    # weighted mean per process (as in DETR), which differs from the weighted mean over the whole
    # batch when the two images have different numbers of segments: allow 5% there.
    for key in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["loss_ce"] == pytest.approx(one["loss_ce"], rel=0.05)


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tiny_synthetic_root, tmp_path):
    opts = ["SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path)]
    run_train_net(tiny_synthetic_root, opts=opts + ["SOLVER.MAX_ITER", "4"])
    good = load_weights(tmp_path / "model_final.pth")
    # an absurd learning rate makes the weights overflow: the next loss is inf/NaN
    proc = run_train_net(tiny_synthetic_root, "--resume", check=False,
                         opts=opts + ["SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "1e30",
                                      "SOLVER.CLIP_GRADIENTS.ENABLED", "False"])
    assert proc.returncode != 0
    assert "Loss became infinite or NaN at iteration=" in proc.stderr
    assert "loss_ce" in proc.stderr
    last = (tmp_path / "last_checkpoint").read_text()
    weights = load_weights(tmp_path / last)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    if last == "model_final.pth":
        for key in good:
            assert torch.equal(good[key], weights[key])


def test_missing_weights_fail_before_training(tiny_synthetic_root, tmp_path):
    proc = run_train_net(tiny_synthetic_root, check=False, opts=[
        "MODEL.WEIGHTS", str(tmp_path / "nope.pkl"), "OUTPUT_DIR", str(tmp_path / "out")])
    assert proc.returncode != 0
    assert "MODEL.WEIGHTS" in proc.stderr and "nope.pkl" in proc.stderr
    assert "Starting training" not in proc.stderr + proc.stdout
