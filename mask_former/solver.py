"""Optimizer and learning-rate schedule of the MaskFormer recipe."""
import copy
import itertools
from typing import Any, Dict, List, Set, Type

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import ParamScheduler

NORM_MODULE_TYPES = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)

# Parameters that are positional tables, not weights: never decayed.
NO_DECAY_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
# Layers that place the sampling points of deformable attention (Deformable DETR trains them slower).
SAMPLING_OFFSET_MODULE_NAMES = ("sampling_offsets", "reference_points")


def get_param_groups(cfg, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """One group per parameter with its own lr and weight decay:
    backbone parameters get ``BASE_LR * BACKBONE_MULTIPLIER``, the sampling offsets and reference
    points of deformable attention ``BASE_LR * SAMPLING_OFFSET_MULTIPLIER``; normalization
    parameters get ``WEIGHT_DECAY_NORM``, embeddings ``WEIGHT_DECAY_EMBED`` and positional tables 0."""
    norm_types = NORM_MODULE_TYPES + (FrozenBatchNorm2d,)
    solver = cfg.SOLVER
    defaults = {"lr": solver.BASE_LR, "weight_decay": solver.WEIGHT_DECAY}
    params: List[Dict[str, Any]] = []
    seen: Set[torch.nn.parameter.Parameter] = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in seen:
                continue
            seen.add(value)
            group = copy.copy(defaults)
            if module_name == "backbone" or module_name.startswith("backbone.") or ".backbone." in module_name:
                group["lr"] = group["lr"] * solver.BACKBONE_MULTIPLIER
            if module_name.rsplit(".", 1)[-1] in SAMPLING_OFFSET_MODULE_NAMES:
                group["lr"] = group["lr"] * solver.SAMPLING_OFFSET_MULTIPLIER
            if param_name in NO_DECAY_PARAM_NAMES:
                group["weight_decay"] = 0.0
            if isinstance(module, norm_types):
                group["weight_decay"] = solver.WEIGHT_DECAY_NORM
            if isinstance(module, torch.nn.Embedding):
                group["weight_decay"] = solver.WEIGHT_DECAY_EMBED
            params.append({"params": [value], **group})
    return params


def _with_full_model_gradient_clipping(optim_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Subclass of ``optim_cls`` whose step first clips the gradient norm over ALL parameters
    together (detectron2's own clipping works per parameter)."""

    class FullModelGradientClippingOptimizer(optim_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"FullModelGradientClipping{optim_cls.__name__}"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER ("ADAMW" or "SGD") over :func:`get_param_groups`, with gradient clipping
    from SOLVER.CLIP_GRADIENTS: CLIP_TYPE "full_model" clips the global norm; "value"/"norm"
    are detectron2's per-parameter clipping. AdamW runs PyTorch's fused kernel when
    SOLVER.FUSED_OPTIMIZER (an optimizer state saved without it, when loaded, keeps its own
    setting: the same updates, PyTorch's loop)."""
    params = get_param_groups(cfg, model)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model_clip = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0.0

    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    elif name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {}
        if cfg.SOLVER.FUSED_OPTIMIZER:
            kwargs["fused"] = True
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={name!r} is not supported; expected 'ADAMW' or 'SGD'")
    if full_model_clip:
        optim_cls = _with_full_model_gradient_clipping(optim_cls, clip.CLIP_VALUE)
    optimizer = optim_cls(params, cfg.SOLVER.BASE_LR, **kwargs)
    if clip.ENABLED and clip.CLIP_TYPE != "full_model":
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


class PolyParamScheduler(ParamScheduler):
    """``(1 - where) ** power``, held at ``constant_ending`` once it falls below it (when > 0)."""

    def __init__(self, power: float, constant_ending: float = 0.0):
        self.power = power
        self.constant_ending = constant_ending

    def __call__(self, where: float) -> float:
        value = max(1.0 - where, 0.0) ** self.power
        if self.constant_ending > 0 and value < self.constant_ending:
            return self.constant_ending
        return value


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's schedulers plus "WarmupPolyLR": ``BASE_LR * (1 - iter / MAX_ITER) ** POLY_LR_POWER``
    after the warm-up, as in detectron2's DeepLab project.

    Built on detectron2's LRMultiplier, which saves only the iteration in checkpoints: a run
    resumed with a larger SOLVER.MAX_ITER follows the new schedule (DeepLab's WarmupPolyLR would
    keep the old MAX_ITER from the checkpoint and fail past it).
    """
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return build_d2_lr_scheduler(cfg, optimizer)
    schedule = WarmupParamScheduler(
        PolyParamScheduler(solver.POLY_LR_POWER, solver.POLY_LR_CONSTANT_ENDING),
        solver.WARMUP_FACTOR,
        min(solver.WARMUP_ITERS / solver.MAX_ITER, 1.0),
        solver.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=solver.MAX_ITER)
