"""MaskFormer's trainer: detectron2's DefaultTrainer with the MaskFormer data, optimizer,
evaluators, CPU-friendly distributed training, atomic checkpoints and exact resumption."""
import json
import logging
import math
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicDetectionCheckpointer
from ..data import build_dataset_mapper
from ..evaluation import build_evaluator
from ..solver import build_lr_scheduler, build_optimizer
from ..test_time_augmentation import SemanticSegmentorWithTTA
from .resume import RandomStates, RestoreRandomStatesHook, ResumableTrainingSampler

RESULTS_FILE = "eval_results.json"


def ddp_kwargs(cfg):
    """DistributedDataParallel pins a process to its GPU with device_ids; a CPU (Gloo) process
    must not be given any."""
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        return {"device_ids": [comm.get_local_rank()]}
    return {"device_ids": None}


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


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes: DDP without device_ids on CPU, and a
        # checkpointer that writes atomically and saves the random states.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        if cfg.SOLVER.AMP.ENABLED and torch.device(cfg.MODEL.DEVICE).type != "cuda":
            raise ValueError(
                f"SOLVER.AMP.ENABLED=True needs a CUDA device, but MODEL.DEVICE={cfg.MODEL.DEVICE!r}; "
                "set SOLVER.AMP.ENABLED False to train on the CPU"
            )

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs(cfg))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.random_states = RandomStates()
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), random_states=self.random_states
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            # continue the data stream where the interrupted run stopped
            self._trainer.data_loader = self.build_train_loader(
                self.cfg, start_sample=self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
            )

    def build_hooks(self):
        ret = [RestoreRandomStatesHook(self.random_states)] + super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            ret.insert(-1, hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model)))
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg, start_sample: int = 0):
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=None,
        )
        seed = cfg.SEED if cfg.SEED >= 0 else None
        sampler = ResumableTrainingSampler(len(dataset), seed=seed, start_sample=start_sample)
        return build_detection_train_loader(
            cfg, dataset=dataset, mapper=build_dataset_mapper(cfg, is_train=True), sampler=sampler,
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
            DatasetEvaluators([SemSegEvaluator(name, distributed=True,
                                               output_dir=os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))])
            for name in cfg.DATASETS.TEST
        ]
        results = OrderedDict({k + "_TTA": v for k, v in super().test(cfg, model, evaluators).items()})
        _save_results(cfg, results, add_to_existing=True)  # next to the results without TTA
        return results
