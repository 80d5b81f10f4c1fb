"""Optimizer groups, LR schedule, gradient clipping, atomic checkpoints, random-state round trip,
MODEL.WEIGHTS checks and test-time augmentation."""
import io
import random

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from mask_former.checkpoint import MaskFormerCheckpointer, check_weights_available
from mask_former.engine.resume import RandomStates, ResumableTrainingSampler
from mask_former.solver import build_lr_scheduler, build_optimizer
from mask_former.test_time_augmentation import SemanticSegmentorWithTTA
from model_utils import tiny_cfg


def solver_cfg():
    cfg = tiny_cfg()
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    return cfg


def group_of(optimizer, param):
    groups = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(groups) == 1
    return groups[0]


def test_optimizer_groups_backbone_lr_and_no_decay_on_norm_and_embeddings():
    cfg = solver_cfg()
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        sum(1 for p in model.parameters() if p.requires_grad)

    backbone_conv = model.backbone.res2[0].conv1.weight
    assert group_of(optimizer, backbone_conv)["lr"] == pytest.approx(1e-4)
    assert group_of(optimizer, backbone_conv)["weight_decay"] == 0.05
    backbone_norm = model.backbone.res2[0].conv1.norm.weight
    assert group_of(optimizer, backbone_norm)["lr"] == pytest.approx(1e-4)
    assert group_of(optimizer, backbone_norm)["weight_decay"] == 0.0

    head = model.sem_seg_head
    assert group_of(optimizer, head.pixel_decoder.adapter_1.weight)["lr"] == pytest.approx(1e-3)
    assert group_of(optimizer, head.pixel_decoder.adapter_1.norm.weight)["weight_decay"] == 0.0
    decoder_layer = head.predictor.transformer.decoder.layers[0]
    assert group_of(optimizer, decoder_layer.norm1.weight)["weight_decay"] == 0.0
    assert group_of(optimizer, decoder_layer.linear1.weight)["weight_decay"] == 0.05
    assert group_of(optimizer, head.predictor.query_embed.weight)["weight_decay"] == 0.0
    assert group_of(optimizer, head.predictor.query_embed.weight)["lr"] == pytest.approx(1e-3)


def test_sgd_and_unknown_optimizer():
    cfg = solver_cfg()
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(build_optimizer(cfg, build_model(cfg)), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, build_model(cfg))


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_update_by_hand(fused):
    """Three AdamW steps (SOLVER.FUSED_OPTIMIZER on and off) against the update written out:
    decoupled weight decay, bias-corrected moments (PyTorch's defaults betas (0.9, 0.999), eps 1e-8)."""
    cfg = solver_cfg()
    cfg.SOLVER.FUSED_OPTIMIZER = fused
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 0.01, 0.1
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(cfg, model)
    assert all(group["fused"] is (True if fused else None) for group in optimizer.param_groups)
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in expected.items()}
    (beta1, beta2), eps, lr, decay = (0.9, 0.999), 1e-8, 0.01, 0.1
    for step in range(1, 4):
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g)
            m, v = moments[name]
            grad = p.grad.double()
            m.mul_(beta1).add_((1 - beta1) * grad)
            v.mul_(beta2).add_((1 - beta2) * grad**2)
            expected[name] *= 1 - lr * decay
            expected[name] -= lr * (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name], rtol=1e-5, atol=1e-6)


def test_full_model_gradient_clipping_clips_the_global_norm():
    cfg = solver_cfg()
    cfg.SOLVER.BASE_LR = 0.0  # only look at the gradients
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.a, model.b = a, b
    optimizer = build_optimizer(cfg, model)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    optimizer.step()
    # each parameter alone is scaled by the same factor 0.01 / 5
    torch.testing.assert_close(a.grad, torch.tensor([0.006, 0.0]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad, torch.tensor([0.008]), rtol=1e-4, atol=1e-7)


def test_warmup_poly_lr():
    cfg = solver_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.POLY_LR_POWER = 0.9
    model = torch.nn.Linear(1, 1)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(51):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[50] == pytest.approx(1e-3 * (1 - 50 / 100) ** 0.9)


def test_atomic_checkpoint_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    checkpointer = MaskFormerCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = torch.load(tmp_path / "model_0000001.pth", weights_only=False)["model"]

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", crash_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")  # even when overwriting the same name
    monkeypatch.undo()

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    reloaded = torch.load(tmp_path / "model_0000001.pth", weights_only=False)["model"]
    for key in good:
        assert torch.equal(good[key], reloaded[key])
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")


def test_random_states_round_trip_through_torch_save():
    states = RandomStates()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save(states.state_dict(), buffer)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    buffer.seek(0)
    states.load_state_dict(torch.load(buffer, weights_only=True))
    assert states.apply_pending()
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not states.apply_pending()


def test_resumable_sampler_continues_the_stream():
    full = ResumableTrainingSampler(10, seed=4)
    stream = [i for _, i in zip(range(30), iter(full))]
    resumed = ResumableTrainingSampler(10, seed=4, start_sample=12)
    assert [i for _, i in zip(range(18), iter(resumed))] == stream[12:]


def test_weights_check_names_the_missing_file(tmp_path):
    check_weights_available("")
    (tmp_path / "w.pkl").write_bytes(b"x")
    check_weights_available(str(tmp_path / "w.pkl"))
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS=.*missing.pkl"):
        check_weights_available(str(tmp_path / "missing.pkl"))
    # nothing listens on the discard port: the download fails at once
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        check_weights_available("http://127.0.0.1:9/model_final.pkl")


class ImageEcho(torch.nn.Module):
    """A stand-in model whose "sem_seg" is its input image resized to the requested size, so
    flipping and resizing act on it exactly as on the image."""

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            image = x["image"].float()[None]
            sem_seg = torch.nn.functional.interpolate(image, size=(x["height"], x["width"]), mode="bilinear",
                                                      align_corners=False)[0]
            outputs.append({"sem_seg": sem_seg})
        return outputs


def test_tta_undoes_the_flip_and_averages_scales():
    cfg = tiny_cfg()
    cfg.TEST.AUG.MIN_SIZES = (32, 48)
    cfg.TEST.AUG.MAX_SIZE = 200
    cfg.TEST.AUG.FLIP = True
    image = torch.zeros((3, 32, 40), dtype=torch.uint8)
    image[:, :, :10] = 200  # a bright band on the left only
    tta = SemanticSegmentorWithTTA(cfg, ImageEcho())
    (out,) = tta([{"image": image, "height": 32, "width": 40}])
    sem_seg = out["sem_seg"]
    assert sem_seg.shape == (3, 32, 40)
    # were a flip not undone, half of the brightness would show up on the right
    assert sem_seg[:, :, :8].mean() > 190
    assert sem_seg[:, :, -8:].max() < 1


def test_poly_lr_warmup_and_resume_with_a_longer_schedule():
    cfg = solver_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.WARMUP_METHOD = "constant"
    cfg.SOLVER.POLY_LR_POWER = 1.0
    model = torch.nn.Linear(1, 1)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-4, 1e-4] + [1e-3 * (1 - i / 10) for i in range(2, 10)]
    assert lrs == pytest.approx(expected)
    state = scheduler.state_dict()

    # resumed with MAX_ITER 20: the schedule is the new one, from iteration 10
    cfg.SOLVER.MAX_ITER = 20
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    scheduler.load_state_dict(state)
    for group in optimizer.param_groups:  # what the checkpointer restores with the optimizer
        group["lr"] = 1e-3 * (1 - 10 / 20)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 11 / 20))
