"""Which evaluators score a dataset, from its metadata's evaluator_type and the enabled tasks."""
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator

from .instance_evaluation import InstanceSegEvaluator

logger = logging.getLogger(__name__)

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "ade20k_panoptic_seg", "cityscapes_panoptic_seg")


def build_evaluator(cfg, dataset_name: str, output_folder: str = None) -> DatasetEvaluators:
    """
    semantic datasets ("sem_seg") -> mIoU, fwIoU, pixel accuracy (SemSegEvaluator);
    panoptic datasets -> PQ (COCOPanopticEvaluator) + mIoU + mask AP where an instance JSON exists;
    instance datasets ("coco") -> mask AP; Cityscapes -> its own evaluators.
    Which of them run follows MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON}
    (a SemanticSegmentor, e.g. the per-pixel baselines, is scored on mIoU only).
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    metadata = MetadataCatalog.get(dataset_name)
    evaluator_type = metadata.get("evaluator_type", None)
    if evaluator_type is None:
        raise KeyError(
            f"Dataset {dataset_name!r} has no evaluator_type in its metadata; register it with one "
            "(see datasets/README.md)"
        )
    test = cfg.MODEL.MASK_FORMER.TEST
    mask_classification = cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    semantic_on = test.SEMANTIC_ON or not mask_classification
    panoptic_on = test.PANOPTIC_ON and mask_classification
    instance_on = test.INSTANCE_ON and mask_classification

    evaluators = []
    if evaluator_type == "sem_seg" or (evaluator_type in PANOPTIC_EVALUATOR_TYPES and semantic_on):
        if semantic_on:
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if evaluator_type in PANOPTIC_EVALUATOR_TYPES and evaluator_type != "cityscapes_panoptic_seg":
        if panoptic_on:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        if instance_on:
            if metadata.get("json_file", None):
                evaluators.append(InstanceSegEvaluator(dataset_name, output_dir=output_folder))
            else:
                logger.warning(f"{dataset_name} has no instance json_file in its metadata: no mask AP")
    if evaluator_type == "coco" and instance_on:
        evaluators.append(InstanceSegEvaluator(dataset_name, output_dir=output_folder))
    if evaluator_type.startswith("cityscapes"):
        evaluators.extend(_cityscapes_evaluators(evaluator_type, dataset_name, semantic_on, instance_on))
    if not evaluators:
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r} (evaluator_type={evaluator_type!r}) with "
            f"SEMANTIC_ON={test.SEMANTIC_ON}, INSTANCE_ON={test.INSTANCE_ON}, "
            f"PANOPTIC_ON={test.PANOPTIC_ON}"
        )
    return DatasetEvaluators(evaluators)


def _cityscapes_evaluators(evaluator_type, dataset_name, semantic_on, instance_on):
    from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

    try:
        import cityscapesscripts  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"Evaluating {dataset_name} needs cityscapesscripts: pip install cityscapesscripts"
        ) from e
    evaluators = []
    if evaluator_type == "cityscapes_sem_seg" and semantic_on:
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if evaluator_type == "cityscapes_instance" and instance_on:
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    return evaluators
