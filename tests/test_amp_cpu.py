"""bfloat16 autocast training on the CPU (SOLVER.AMP.ENABLED True, SOLVER.AMP.PRECISION bfloat16):
the inner trainer, the config checks, and a short run of tools/train_net.py."""
import itertools
import logging
import math

import pytest
import torch
from detectron2.modeling import build_model

from mask_former.engine import trainer as trainer_module
from mask_former.engine.trainer import AutocastTrainer, Trainer, warn_if_amp_is_slow_on_this_cpu
from mask_former.utils.cpu_info import cpu_runs_bf16_fast
from model_utils import tiny_cfg
from test_model import make_batch
from train_utils import read_metrics, run_train_net


def test_autocast_trainer_runs_the_network_in_bfloat16_and_the_losses_in_float32():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen = {"conv": set(), "losses": set()}
    model.backbone.stem.conv1.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype))
    model.criterion.register_forward_hook(
        lambda m, i, out: seen["losses"].update(value.dtype for value in out.values())
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # the same batch every step: the loss must fall
    trainer = AutocastTrainer(model, itertools.repeat(make_batch()), optimizer, precision=torch.bfloat16)
    assert not trainer.grad_scaler.is_enabled()  # bfloat16 needs no gradient scaling
    trainer.train(0, 8)

    assert seen == {"conv": {torch.bfloat16}, "losses": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [value for value, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert trainer.state_dict()["grad_scaler"] == {}  # resumable like detectron2's AMPTrainer


def test_float16_on_cpu_is_refused_with_a_clear_error():
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    assert cfg.SOLVER.AMP.PRECISION == "float16"  # the default, detectron2's
    with pytest.raises(ValueError, match=r"needs a CUDA device for SOLVER.AMP.PRECISION='float16'.*bfloat16"):
        Trainer(cfg)


def test_unknown_precision_is_refused():
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bf16"
    with pytest.raises(ValueError, match=r"SOLVER.AMP.PRECISION='bf16': expected one of 'float16', 'bfloat16'"):
        Trainer(cfg)


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bfloat16_training_on_a_cpu_without_bf16_kernels_is_warned_about(caplog, monkeypatch, fast_bf16):
    monkeypatch.setattr(trainer_module, "cpu_runs_bf16_fast", lambda: fast_bf16)
    cfg = tiny_cfg()
    cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE = True, "bfloat16", "cpu"
    with caplog.at_level(logging.WARNING):
        assert warn_if_amp_is_slow_on_this_cpu(cfg) == (not fast_bf16)
    assert ("slower than float32 training" in caplog.text) == (not fast_bf16)
    assert ("SOLVER.AMP.PRECISION bfloat16" in caplog.text) == (not fast_bf16)
    cfg.MODEL.DEVICE = "cuda"  # not about GPUs
    assert not warn_if_amp_is_slow_on_this_cpu(cfg)


def test_train_net_with_bfloat16_autocast_on_cpu(tiny_synthetic_root, tmp_path):
    # 40 iterations of 2 images: detectron2 writes the metrics (losses as medians of the last 20
    # iterations) at iterations 19 and 39
    run_train_net(tiny_synthetic_root, opts=[
        "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16", "MODEL.DEVICE", "cpu",
        "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path)])
    log = (tmp_path / "log.txt").read_text()
    assert "Mixed-precision training: bfloat16 autocast on cpu (AutocastTrainer)" in log
    # the warning where this CPU has no bfloat16 kernels, none where it has them
    assert ("slower than float32 training" in log) == (not cpu_runs_bf16_fast())
    train_lines = [m for m in read_metrics(tmp_path) if "total_loss" in m]
    assert [m["iteration"] for m in train_lines] == [19, 39]
    losses = [m["total_loss"] for m in train_lines]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
