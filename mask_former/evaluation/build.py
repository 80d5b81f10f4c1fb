"""Which evaluators score a dataset: one builder per task (``mask_former.tasks``), chosen by the
tasks the model returns and the dataset's ``evaluator_type``."""
import logging
import os
from typing import List, Tuple

from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
)
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.registry import Registry

from ..data.dataset_mappers import check_num_classes
from ..tasks import TASKS
from .backends import CONFIG_KEY, check_eval_backend
from .instance_evaluation import InstanceSegEvaluator
from .panoptic_evaluation import HotcocoPanopticEvaluator
from .sem_seg_evaluation import CheckedSemSegEvaluator

logger = logging.getLogger(__name__)

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")
# the panoptic datasets scored on PQ and mask AP here (Cityscapes' panoptic evaluation is not wired)
COCO_FORMAT_PANOPTIC_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg")

TASK_EVALUATORS = Registry("TASK_EVALUATOR")
TASK_EVALUATORS.__doc__ = """
Per task, a function ``(dataset_name, evaluator_type, metadata, output_folder, *, backend) -> list
of DatasetEvaluator`` (empty when the task is not scored on that kind of dataset), registered under
the name the task's ``evaluator`` field gives (``mask_former.tasks.TASKS``). ``backend`` is
``TEST.EVAL_BACKEND`` ("pycocotools" or "hotcoco", checked), the library of mask AP and PQ; a
builder whose metrics do not depend on it ignores it.
"""


@TASK_EVALUATORS.register()
def semantic(dataset_name, evaluator_type, metadata, output_folder, *, backend="pycocotools") -> List[DatasetEvaluator]:
    """mIoU, fwIoU and pixel accuracy on semantic and panoptic datasets (label maps checked like
    the training mapper checks them)."""
    if evaluator_type == "sem_seg" or evaluator_type in PANOPTIC_EVALUATOR_TYPES:
        return [CheckedSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)]
    if evaluator_type == "cityscapes_sem_seg":
        return [CityscapesSemSegEvaluator(dataset_name)]
    return []


@TASK_EVALUATORS.register()
def panoptic(dataset_name, evaluator_type, metadata, output_folder, *, backend="pycocotools") -> List[DatasetEvaluator]:
    """PQ, SQ, RQ on panoptic datasets (not Cityscapes', whose panoptic evaluation is not wired):
    panopticapi's ``pq_compute`` (detectron2's evaluator) or hotcoco's."""
    if evaluator_type in COCO_FORMAT_PANOPTIC_TYPES:
        if check_eval_backend(backend) == "hotcoco":
            return [HotcocoPanopticEvaluator(dataset_name, output_folder)]
        return [COCOPanopticEvaluator(dataset_name, output_folder)]
    return []


@TASK_EVALUATORS.register()
def instance(dataset_name, evaluator_type, metadata, output_folder, *, backend="pycocotools") -> List[DatasetEvaluator]:
    """Mask AP (pycocotools or hotcoco) on instance datasets and on panoptic datasets whose
    metadata names an instance JSON."""
    if evaluator_type in COCO_FORMAT_PANOPTIC_TYPES:
        if metadata.get("json_file", None):
            return [InstanceSegEvaluator(dataset_name, output_dir=output_folder, backend=backend)]
        logger.warning(f"{dataset_name} has no instance json_file in its metadata: no mask AP")
        return []
    if evaluator_type == "coco":
        return [InstanceSegEvaluator(dataset_name, output_dir=output_folder, backend=backend)]
    if evaluator_type == "cityscapes_instance":
        return [CityscapesInstanceEvaluator(dataset_name)]
    return []


def model_output_tasks(cfg) -> Tuple[str, ...]:
    """The tasks the model of ``cfg`` returns: its meta-architecture's ``output_tasks(cfg)``;
    a meta-architecture without one (detectron2's SemanticSegmentor, which the per-pixel
    baselines use) returns semantic results only."""
    meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if hasattr(meta_arch, "output_tasks"):
        return tuple(meta_arch.output_tasks(cfg))
    return ("semantic",)


def build_evaluator(cfg, dataset_name: str, output_folder: str = None) -> DatasetEvaluators:
    """
    The evaluators of every task the model returns (see :func:`model_output_tasks`) that the
    dataset's ``evaluator_type`` can score: semantic datasets ("sem_seg") -> mIoU;
    panoptic datasets -> PQ + mIoU + mask AP where an instance JSON exists; instance datasets
    ("coco") -> mask AP; Cityscapes -> its own evaluators. ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``
    must agree with the dataset's class metadata (:func:`check_num_classes`). ``TEST.EVAL_BACKEND``
    chooses the library of mask AP and PQ (a ValueError for an unknown one; an ImportError for
    "hotcoco" without hotcoco installed, when a task needs it).
    """
    backend = check_eval_backend(cfg.TEST.EVAL_BACKEND, CONFIG_KEY)
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", None)
    if evaluator_type is None:
        raise KeyError(
            f"Dataset {dataset_name!r} has no evaluator_type in its metadata; register it with one "
            "(see datasets/README.md)"
        )
    if evaluator_type.startswith("cityscapes"):
        _require_cityscapesscripts(dataset_name)
    tasks_on = model_output_tasks(cfg)
    evaluators = []
    for task in TASKS:
        if task.name in tasks_on:
            build = TASK_EVALUATORS.get(task.evaluator)
            evaluators.extend(build(dataset_name, evaluator_type, metadata, output_folder, backend=backend))
    # after building: the evaluators have loaded the dataset, which completes lazy metadata
    check_num_classes(cfg, [dataset_name], "DATASETS.TEST")
    if not evaluators:
        test = cfg.MODEL.MASK_FORMER.TEST
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}) with "
            f"SEMANTIC_ON={test.SEMANTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, "
            f"PANOPTIC_ON={test.PANOPTIC_ON}"
        )
    return DatasetEvaluators(evaluators)


def _require_cityscapesscripts(dataset_name: str) -> None:
    try:
        import cityscapesscripts  # noqa: F401  (an optional dependency, checked before use)
    except ImportError as e:
        raise ImportError(
            f"Evaluating {dataset_name} needs cityscapesscripts: pip install cityscapesscripts"
        ) from e
