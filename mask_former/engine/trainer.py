"""MaskFormer's trainer: detectron2's DefaultTrainer with the MaskFormer data, optimizer,
evaluators, CPU-friendly distributed training, atomic checkpoints and exact resumption."""
import functools
import json
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from unittest import mock

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, create_ddp_model, hooks
from detectron2.engine import defaults as detectron2_defaults
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm

from ..checkpoint import MaskFormerCheckpointer
from ..data import build_dataset_mapper
from ..data.dataset_mappers import StopWhenNothingReadable, check_num_classes
from ..evaluation import CheckedSemSegEvaluator, build_evaluator
from ..solver import build_lr_scheduler, build_optimizer
from ..test_time_augmentation import SemanticSegmentorWithTTA
from ..utils.cpu_info import cpu_runs_bf16_fast, no_bf16_kernels_note
from .resume import RandomStates, RestoreRandomStatesHook, ResumableTrainingSampler

RESULTS_FILE = "eval_results.json"


def _json_safe(value):
    """Metrics as strict JSON: NaN (e.g. AP of a size range without objects) becomes null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _save_results(cfg, results, add_to_existing=False):
    """Write the evaluation results to OUTPUT_DIR/eval_results.json (main process only)."""
    if not comm.is_main_process() or not cfg.OUTPUT_DIR:
        return
    path = os.path.join(cfg.OUTPUT_DIR, RESULTS_FILE)
    saved = {}
    if add_to_existing and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    saved.update(_json_safe(results))
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump(saved, f, indent=2)


def create_cpu_aware_ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model``, except that a model on the CPU (Gloo) gets no
    ``device_ids``: DistributedDataParallel pins a process to its GPU with them and refuses them
    for a CPU module."""
    if next(model.parameters()).device.type != "cuda":
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


# SOLVER.AMP.PRECISION -> the autocast dtype
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class AutocastTrainer(AMPTrainer):
    """detectron2's :class:`AMPTrainer` for any device: the forward pass (model and losses) runs
    under ``torch.autocast`` of the model's device type with dtype ``precision``, and the gradients
    are scaled (GradScaler) only for float16; bfloat16 has float32's exponent range and needs no
    scaling. detectron2's own AMPTrainer is CUDA-only."""

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype):
        """
        Args:
            model, data_loader, optimizer: as for :class:`SimpleTrainer`.
            precision: the autocast dtype, torch.bfloat16 or torch.float16.
        """
        self.device_type = next(model.parameters()).device.type
        grad_scaler = torch.amp.GradScaler(self.device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=grad_scaler, precision=precision)

    def run_step(self):
        if not self.model.training:
            raise RuntimeError("AutocastTrainer: the model was switched to eval mode during training")
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            total = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        # the backward pass outside autocast: it runs in the dtypes autocast chose for the forward
        self.grad_scaler.scale(total).backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def _amp_trainer(cfg):
    """The class (or factory) that builds the inner trainer when SOLVER.AMP.ENABLED, after checking
    SOLVER.AMP.PRECISION against MODEL.DEVICE: detectron2's AMPTrainer for float16 on CUDA (with a
    GradScaler), :class:`AutocastTrainer` for bfloat16 on CUDA or the CPU."""
    name = cfg.SOLVER.AMP.PRECISION
    if name not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION={name!r}: expected one of {', '.join(map(repr, AMP_PRECISIONS))}"
        )
    if not cfg.SOLVER.AMP.ENABLED:
        return AMPTrainer  # not used
    if name == "float16" and torch.device(cfg.MODEL.DEVICE).type != "cuda":
        raise ValueError(
            f"SOLVER.AMP.ENABLED=True needs a CUDA device for SOLVER.AMP.PRECISION='float16', but "
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r}; on the CPU set SOLVER.AMP.PRECISION bfloat16 "
            "(bfloat16 autocast, fast on CPUs with AVX-512 BF16 or AMX), or SOLVER.AMP.ENABLED False"
        )
    if name == "float16":
        return AMPTrainer
    return functools.partial(AutocastTrainer, precision=AMP_PRECISIONS[name])


def warn_if_amp_is_slow_on_this_cpu(cfg) -> bool:
    """Log a warning, and return True, when SOLVER.AMP trains on a CPU for which PyTorch has no
    bfloat16 kernels (AVX2 CPUs): the training is valid, but slower than without autocast."""
    if torch.device(cfg.MODEL.DEVICE).type != "cpu" or cpu_runs_bf16_fast():
        return False
    logging.getLogger(__name__).warning(
        f"SOLVER.AMP.PRECISION {cfg.SOLVER.AMP.PRECISION} on {no_bf16_kernels_note()}, slower than "
        "float32 training; SOLVER.AMP.ENABLED False is the fast path on this CPU"
    )
    return True


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with MaskFormer's data, optimizer, schedule and evaluators, plus:
    distributed training on CPUs (Gloo), atomic checkpoints that also hold the random states, and a
    data stream that continues where an interrupted run stopped (exact resumption)."""

    def __init__(self, cfg):
        amp_trainer = _amp_trainer(cfg)  # checks SOLVER.AMP.* before anything is built
        # DefaultTrainer.__init__ wraps the model with detectron2's create_ddp_model, which always
        # passes GPU device_ids, and builds its inner trainer with detectron2's CUDA-only
        # AMPTrainer when SOLVER.AMP.ENABLED: swap in the CPU-aware wrapper and the trainer of
        # SOLVER.AMP.PRECISION for the duration of the call only.
        with (
            mock.patch.object(detectron2_defaults, "create_ddp_model", create_cpu_aware_ddp_model),
            mock.patch.object(detectron2_defaults, "AMPTrainer", amp_trainer),
        ):
            super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:
            logging.getLogger(__name__).info(
                f"Mixed-precision training: {cfg.SOLVER.AMP.PRECISION} autocast on "
                f"{cfg.MODEL.DEVICE} ({type(self._trainer).__name__})"
            )
            warn_if_amp_is_slow_on_this_cpu(cfg)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # continue the data stream where the interrupted run stopped
            self._trainer.data_loader = self.build_train_loader(
                self.cfg, start_sample=self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
            )

    def build_hooks(self):
        # DefaultTrainer.__init__ calls this right after making its checkpointer, and the hooks
        # (PeriodicCheckpointer) take the checkpointer from here: swap in the atomic one that also
        # saves the random states.
        self.random_states = RandomStates()
        self.checkpointer = MaskFormerCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            random_states=self.random_states,
        )
        ret = [RestoreRandomStatesHook(self.random_states)] + super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            ret.insert(-1, hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        if getattr(model, "optimize_training", False):
            # the weights in the layout training runs them in: here, before DistributedDataParallel
            # wraps the model (its gradient buckets take the weights' layout) and before the
            # optimizer's moments exist (they take it too)
            model.store_conv_weights(model.channels_last_training())
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg, start_sample: int = 0):
        """detectron2's train loader over DATASETS.TRAIN with the configured mapper, after checking
        MODEL.SEM_SEG_HEAD.NUM_CLASSES against the datasets' metadata; samples whose files cannot
        be read are skipped, and a dataset none of whose samples can be read stops training with
        an error naming the first files (:class:`StopWhenNothingReadable`)."""
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=None,
        )
        check_num_classes(cfg, cfg.DATASETS.TRAIN, "DATASETS.TRAIN")  # after loading: metadata complete
        mapper = StopWhenNothingReadable(build_dataset_mapper(cfg, is_train=True), len(dataset), cfg.DATASETS.TRAIN)
        seed = cfg.SEED if cfg.SEED >= 0 else None
        sampler = ResumableTrainingSampler(len(dataset), seed=seed, start_sample=start_sample)
        return build_detection_train_loader(
            cfg, dataset=dataset, mapper=mapper, sampler=sampler,
            # the loader's own generator: starting it draws nothing from the global one (resume)
            seed=seed,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_dataset_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        _save_results(cfg, results)
        return results

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Semantic segmentation with TEST.AUG (multi-scale + flip); metrics get a "_TTA" suffix."""
        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with test-time augmentation ...")
        model = SemanticSegmentorWithTTA(cfg, model)
        evaluators = [
            DatasetEvaluators([CheckedSemSegEvaluator(name, distributed=True,
                                               output_dir=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))])
            for name in cfg.DATASETS.TEST
        ]
        results = OrderedDict({k + "_TTA": v for k, v in super().test(cfg, model, evaluators).items()})
        _save_results(cfg, results, add_to_existing=True)  # next to the results without TTA
        return results
