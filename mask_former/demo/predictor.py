"""Turn one task's result of a model into a drawing: the reusable part of ``tools/demo.py``.

* :func:`select_task` picks the task to show and switches it on in the config;
* :class:`SegmentationDemo` predicts one task with :class:`mask_former.demo.Predictor` and draws
  it with detectron2's ``Visualizer`` / ``VideoVisualizer``, optionally enlarged
  (:func:`scale_prediction`) so that the labels of small images are legible.

What each task is (its config switch, output key, drawing method, needed metadata) comes from
``mask_former.tasks``. Class ids are contiguous ids in ``[0, K)``. By this project's metadata
convention ``stuff_classes`` names all K classes and ``thing_classes[c]`` names thing class ``c``.
"""
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import Metadata
from detectron2.structures import Boxes, Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from ..modeling.postprocessing import filter_panoptic
from ..tasks import TASK_NAMES, enabled_tasks, get_task, set_task_enabled
from .api import MaskFormerPredictor, Predictor, metadata_from_config

__all__ = [
    "select_task",
    "check_metadata",
    "TaskPrediction",
    "to_task_prediction",
    "filter_instances",
    "scale_prediction",
    "scale_image",
    "draw_prediction",
    "MaskFormerPredictor",  # defined in .api; kept importable from here
    "SegmentationDemo",
]


def select_task(cfg, task: Optional[str] = None) -> str:
    """
    Pick the task to show and make sure the model computes it.

    Args:
        cfg: an unfrozen config; the task's ``MODEL.MASK_FORMER.TEST.<TASK>_ON`` is set True.
        task: "semantic", "instance" or "panoptic"; None picks the first task of
            ``mask_former.tasks.TASKS`` that the config has on.
    Returns:
        the task's name.
    """
    if task is None:
        enabled = enabled_tasks(cfg)
        if not enabled:
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON} are all False; "
                "pass --task " + "|".join(TASK_NAMES)
            )
        task = enabled[0].name
    return set_task_enabled(cfg, task).name


def check_metadata(metadata, task: str, num_classes: int) -> None:
    """
    Raise a ValueError unless ``metadata`` can name (and the Visualizer draw) the ``num_classes``
    classes of ``task``'s predictions.
    """
    name = getattr(metadata, "name", "<unnamed>")
    for fields in get_task(task).required_metadata:
        fields = fields if isinstance(fields, tuple) else (fields,)
        if not any(metadata.get(f, None) is not None for f in fields):
            raise ValueError(
                f"The {task} demo needs metadata {' or '.join(fields)} to name the classes, but the "
                f"metadata of {name!r} (DATASETS.TEST[0]) has none; register it with "
                "MetadataCatalog.get(name).set(...) or set DATASETS.TEST to a registered dataset"
            )
    stuff_classes = metadata.get("stuff_classes", None)
    if stuff_classes is not None and len(stuff_classes) != num_classes:
        raise ValueError(
            f"The metadata of {name!r} lists {len(stuff_classes)} stuff_classes but the model "
            f"predicts MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes} classes; they must match"
        )


@dataclass
class TaskPrediction:
    """
    One image's result for one task, on the CPU, at the original image size (H, W).

    Attributes:
        task: "semantic", "instance" or "panoptic".
        sem_seg: (semantic) H x W int64 class ids, the argmax of the model's K x H x W scores.
        panoptic_seg: (panoptic) H x W int32 segment ids, 0 is void.
        segments_info: (panoptic) one dict per segment in ``panoptic_seg``.
        instances: (instance) Instances with pred_masks, pred_boxes, pred_classes, scores.
        num_below_threshold: instances / thing segments dropped by the confidence threshold.
    """

    task: str
    sem_seg: Optional[torch.Tensor] = None
    panoptic_seg: Optional[torch.Tensor] = None
    segments_info: Optional[List[Dict]] = None
    instances: Optional[Instances] = None
    num_below_threshold: int = 0

    def draw_args(self) -> Tuple[object, ...]:
        """The arguments of the task's ``draw_method`` (``mask_former.tasks``) after the image."""
        if self.task == "semantic":
            return (self.sem_seg,)
        if self.task == "panoptic":
            # copies: detectron2's Visualizer overwrites each segment's "area" with the drawn one
            return (self.panoptic_seg, [dict(info) for info in self.segments_info])
        return (self.instances,)

    def summary(self) -> str:
        if self.task == "semantic":
            return f"{len(torch.unique(self.sem_seg))} classes"
        dropped = ""
        if self.num_below_threshold:
            dropped = f" ({self.num_below_threshold} more below the confidence threshold)"
        if self.task == "panoptic":
            return f"{len(self.segments_info)} segments{dropped}"
        return f"{len(self.instances)} instances{dropped}"


def filter_instances(instances: Instances, threshold: float) -> Instances:
    """The instances with ``scores >= threshold``."""
    return instances[instances.scores >= threshold]


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    return scale


def scale_image(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` (H x W x C) enlarged ``scale`` times, each pixel a ``scale`` x ``scale`` block."""
    if _check_scale(scale) == 1:
        return image
    height, width = image.shape[:2]
    return cv2.resize(image, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)


def scale_prediction(prediction: "TaskPrediction", scale: int) -> "TaskPrediction":
    """
    ``prediction`` enlarged ``scale`` times to be drawn over :func:`scale_image`'s image: each
    pixel of a label / segment map or mask becomes a ``scale`` x ``scale`` block and boxes are
    multiplied by ``scale``; classes, scores and segments_info (ids, classes, scores) are kept
    (areas are those of the original image).
    """
    if _check_scale(scale) == 1:
        return prediction

    def enlarge(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)

    if prediction.task == "semantic":
        return replace(prediction, sem_seg=enlarge(prediction.sem_seg))
    if prediction.task == "panoptic":
        return replace(prediction, panoptic_seg=enlarge(prediction.panoptic_seg))
    instances = prediction.instances
    height, width = instances.image_size
    scaled = Instances((height * scale, width * scale))
    for name, value in instances.get_fields().items():
        if name == "pred_masks":
            value = enlarge(value)
        elif name == "pred_boxes":
            value = Boxes(value.tensor * scale)
        scaled.set(name, value)
    return replace(prediction, instances=scaled)


def to_task_prediction(outputs: Dict, task: str, confidence_threshold: float) -> TaskPrediction:
    """
    Args:
        outputs: the model's result for one image ("sem_seg", "panoptic_seg" and/or "instances").
        task: which of them to keep.
        confidence_threshold: instances and thing segments scoring below it are dropped.
    """
    output_key = get_task(task).output_key
    if output_key not in outputs:
        raise KeyError(f"The model returned no {output_key!r} for the {task} task; got {sorted(outputs)}")
    result = outputs[output_key]
    if task == "semantic":
        return TaskPrediction(task, sem_seg=result.argmax(dim=0).cpu())
    if task == "panoptic":
        panoptic_seg, segments_info = result
        kept_seg, kept_info = filter_panoptic(panoptic_seg.cpu(), segments_info, confidence_threshold)
        return TaskPrediction(task, panoptic_seg=kept_seg, segments_info=kept_info,
                              num_below_threshold=len(segments_info) - len(kept_info))
    kept = filter_instances(result.to("cpu"), confidence_threshold)
    return TaskPrediction(task, instances=kept, num_below_threshold=len(result) - len(kept))


def _drawing_metadata(metadata, task: str):
    """For instances: a dataset without ``thing_classes`` (semantic-only) names its classes in
    ``stuff_classes``; give the Visualizer those."""
    if task != "instance" or metadata.get("thing_classes", None) is not None:
        return metadata
    fields = {"thing_classes": metadata.stuff_classes}
    if metadata.get("stuff_colors", None) is not None:
        fields["thing_colors"] = metadata.stuff_colors
    return Metadata(name=getattr(metadata, "name", "")).set(**fields)


def draw_prediction(image_rgb: np.ndarray, prediction: TaskPrediction, metadata,
                    instance_mode: ColorMode = ColorMode.IMAGE) -> VisImage:
    """Draw ``prediction`` over ``image_rgb`` (H x W x 3 uint8, RGB) with detectron2's Visualizer."""
    visualizer = Visualizer(image_rgb, _drawing_metadata(metadata, prediction.task),
                            instance_mode=instance_mode)
    return getattr(visualizer, get_task(prediction.task).draw_method)(*prediction.draw_args())


class SegmentationDemo:
    """
    Predict one task on BGR images / video frames and draw it.

    Example::

        cfg = ...  # MaskFormer config with MODEL.WEIGHTS
        task = select_task(cfg, "panoptic")
        demo = SegmentationDemo(cfg, task, confidence_threshold=0.5)
        prediction, vis = demo.run_on_image(cv2.imread("input.jpg"))
        cv2.imwrite("out.jpg", vis.get_image()[:, :, ::-1])
    """

    def __init__(self, cfg, task: str, confidence_threshold: float = 0.5,
                 instance_mode: ColorMode = ColorMode.IMAGE):
        """
        Args:
            cfg: a MaskFormer config with ``task`` switched on (see :func:`select_task`).
            task: "semantic", "instance" or "panoptic".
            confidence_threshold: instances and thing segments scoring below it are not kept.
            instance_mode: detectron2's Visualizer color mode.
        """
        config_key = get_task(task).config_key
        if not getattr(cfg.MODEL.MASK_FORMER.TEST, config_key):
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.{config_key} is False: the model would not "
                f"compute the {task} result (use select_task(cfg, {task!r}))"
            )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}")
        metadata = metadata_from_config(cfg)
        if metadata is None:
            raise ValueError(
                "DATASETS.TEST is empty and MODEL.CLASS_NAMES is not set: the demo names and colours "
                "classes with the metadata of DATASETS.TEST[0]; set it to a registered dataset (or "
                "MODEL.CLASS_NAMES to the K class names)"
            )
        check_metadata(metadata, task, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        self.task = task
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.predictor = Predictor(cfg)
        self.metadata = self.predictor.metadata

    def predict(self, image_bgr: np.ndarray) -> TaskPrediction:
        """Args: image_bgr: H x W x 3 uint8 in BGR order (as cv2 reads)."""
        return to_task_prediction(self.predictor(image_bgr, format="BGR"), self.task, self.confidence_threshold)

    def draw(self, image_bgr: np.ndarray, prediction: TaskPrediction, scale: int = 1) -> VisImage:
        """The drawing of ``prediction`` over the image (``vis.get_image()`` is RGB), both
        enlarged ``scale`` times (:func:`scale_prediction`)."""
        return draw_prediction(scale_image(image_bgr[:, :, ::-1], scale), scale_prediction(prediction, scale),
                               self.metadata, self.instance_mode)

    def run_on_image(self, image_bgr: np.ndarray, scale: int = 1) -> Tuple[TaskPrediction, VisImage]:
        """Returns the prediction (at the image's size) and its drawing over the image, enlarged
        ``scale`` times (the prediction is made on the original image)."""
        prediction = self.predict(image_bgr)
        return prediction, self.draw(image_bgr, prediction, scale)

    def run_on_video(self, frames: Iterator[np.ndarray], scale: int = 1) -> Iterator[np.ndarray]:
        """Yield each BGR frame of ``frames`` with the prediction drawn on it (BGR, enlarged
        ``scale`` times); instance colours are kept across frames by detectron2's VideoVisualizer."""
        video_visualizer = VideoVisualizer(_drawing_metadata(self.metadata, self.task), self.instance_mode)
        draw = getattr(video_visualizer, get_task(self.task).video_draw_method)
        for frame in frames:
            prediction = scale_prediction(self.predict(frame), scale)
            vis = draw(scale_image(frame[:, :, ::-1], scale), *prediction.draw_args())
            yield vis.get_image()[:, :, ::-1]
