"""Run a MaskFormer model on single images and turn one task's result into a drawing and JSON.

This is the reusable part of ``tools/demo.py``:

* :func:`select_task` picks the task to show and switches it on in the config;
* :class:`SegmentationDemo` wraps detectron2's ``DefaultPredictor`` (BGR image in, resize to
  ``INPUT.MIN_SIZE_TEST``, predictions at the original size out) and draws one task with
  detectron2's ``Visualizer`` / ``VideoVisualizer``;
* :func:`save_prediction_json` writes a :class:`TaskPrediction` as JSON (plus a PNG for the
  label / segment-id map).

Class ids are contiguous ids in ``[0, K)``. By this project's metadata convention
``stuff_classes`` names all K classes and ``thing_classes[c]`` names thing class ``c``.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import Metadata, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer
from panopticapi.utils import id2rgb
from PIL import Image

from ..checkpoint import check_weights_available

__all__ = [
    "TASKS",
    "enabled_tasks",
    "select_task",
    "check_metadata",
    "class_name",
    "TaskPrediction",
    "to_task_prediction",
    "filter_instances",
    "filter_panoptic",
    "draw_prediction",
    "prediction_to_json",
    "save_prediction_json",
    "SegmentationDemo",
]

# In the order a default is picked: the richest output first.
TASKS = ("panoptic", "instance", "semantic")
_TASK_CONFIG_KEYS = {"panoptic": "PANOPTIC_ON", "instance": "INSTANCE_ON", "semantic": "SEMANTIC_ON"}
# Metadata fields each task needs to be drawn and named (tuples are "any of").
_REQUIRED_METADATA = {
    "semantic": ["stuff_classes"],
    "panoptic": ["stuff_classes", "thing_classes"],
    "instance": [("thing_classes", "stuff_classes")],
}
PANOPTIC_PNG_ENCODING = "RGB, segment id = R + 256 * G + 256^2 * B (COCO panoptic); 0 is void"


def enabled_tasks(cfg) -> List[str]:
    """The tasks whose ``MODEL.MASK_FORMER.TEST.*_ON`` is True, in :data:`TASKS` order."""
    return [t for t in TASKS if getattr(cfg.MODEL.MASK_FORMER.TEST, _TASK_CONFIG_KEYS[t])]


def select_task(cfg, task: Optional[str] = None) -> str:
    """
    Pick the task to show and make sure the model computes it.

    Args:
        cfg: an unfrozen config; ``MODEL.MASK_FORMER.TEST.<TASK>_ON`` is set True for the task.
        task: "semantic", "instance" or "panoptic"; None picks the first of panoptic, instance,
            semantic that the config has on.
    Returns:
        the task.
    """
    if task is None:
        enabled = enabled_tasks(cfg)
        if not enabled:
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,INSTANCE_ON,PANOPTIC_ON} are all False; "
                "pass --task semantic|instance|panoptic"
            )
        task = enabled[0]
    if task not in _TASK_CONFIG_KEYS:
        raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}")
    setattr(cfg.MODEL.MASK_FORMER.TEST, _TASK_CONFIG_KEYS[task], True)
    return task


def check_metadata(metadata, task: str, num_classes: int) -> None:
    """
    Raise a ValueError unless ``metadata`` can name (and the Visualizer draw) the ``num_classes``
    classes of ``task``'s predictions.
    """
    name = getattr(metadata, "name", "<unnamed>")
    for fields in _REQUIRED_METADATA[task]:
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


def class_name(metadata, category_id: int) -> str:
    """Name of contiguous class ``category_id``: ``stuff_classes`` names all classes; a dataset
    with only things names them in ``thing_classes``."""
    names = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None)
    if names is None or not 0 <= category_id < len(names):
        raise KeyError(
            f"Class id {category_id} has no name in the metadata of "
            f"{getattr(metadata, 'name', '<unnamed>')!r} ({0 if names is None else len(names)} names)"
        )
    return names[category_id]


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


def filter_panoptic(
    panoptic_seg: torch.Tensor, segments_info: Sequence[Dict], threshold: float
) -> Tuple[torch.Tensor, List[Dict]]:
    """
    Drop thing segments whose "score" is below ``threshold`` (their pixels become void, 0);
    segments without a score (stuff) are kept.

    Args:
        panoptic_seg: H x W segment ids.
        segments_info: dicts with "id", "isthing" and, for things, "score".
    Returns:
        a new (panoptic_seg, segments_info); the inputs are not modified.
    """
    kept, dropped_ids = [], []
    for info in segments_info:
        if info["isthing"] and "score" in info and info["score"] < threshold:
            dropped_ids.append(info["id"])
        else:
            kept.append(dict(info))
    panoptic_seg = panoptic_seg.clone()
    if dropped_ids:
        panoptic_seg[torch.isin(panoptic_seg, torch.tensor(dropped_ids, dtype=panoptic_seg.dtype))] = 0
    return panoptic_seg, kept


def to_task_prediction(outputs: Dict, task: str, confidence_threshold: float) -> TaskPrediction:
    """
    Args:
        outputs: the model's result for one image ("sem_seg", "panoptic_seg" and/or "instances").
        task: which of them to keep.
        confidence_threshold: instances and thing segments scoring below it are dropped.
    """
    output_key = {"semantic": "sem_seg", "panoptic": "panoptic_seg", "instance": "instances"}[task]
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


def _drawing_metadata(metadata):
    """For instances: a dataset without ``thing_classes`` (semantic-only) names its classes in
    ``stuff_classes``; give the Visualizer those."""
    if metadata.get("thing_classes", None) is not None:
        return metadata
    fields = {"thing_classes": metadata.stuff_classes}
    if metadata.get("stuff_colors", None) is not None:
        fields["thing_colors"] = metadata.stuff_colors
    return Metadata(name=getattr(metadata, "name", "")).set(**fields)


def draw_prediction(image_rgb: np.ndarray, prediction: TaskPrediction, metadata,
                    instance_mode: ColorMode = ColorMode.IMAGE) -> VisImage:
    """Draw ``prediction`` over ``image_rgb`` (H x W x 3 uint8, RGB) with detectron2's Visualizer."""
    if prediction.task == "instance":
        visualizer = Visualizer(image_rgb, _drawing_metadata(metadata), instance_mode=instance_mode)
        return visualizer.draw_instance_predictions(prediction.instances)
    visualizer = Visualizer(image_rgb, metadata, instance_mode=instance_mode)
    if prediction.task == "semantic":
        return visualizer.draw_sem_seg(prediction.sem_seg)
    return visualizer.draw_panoptic_seg(prediction.panoptic_seg, prediction.segments_info)


def _encode_mask(mask: np.ndarray) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def prediction_to_json(prediction: TaskPrediction, metadata, map_png: Optional[str] = None) -> Dict:
    """
    A JSON-serializable description of ``prediction``.

    Args:
        map_png: for semantic / panoptic, the file name (relative to the JSON) of the label /
            segment-id PNG, recorded in the result.
    Returns:
        dict with "task" and
        - semantic: "label_map" (PNG of class ids) and "classes": [{"id", "name", "pixel_count"}]
          for each predicted class;
        - panoptic: "panoptic_png", "png_encoding" and "segments_info": [{"id", "category_id",
          "category_name", "isthing", "area", "score" (things)}];
        - instance: "instances": [{"category_id", "class", "score", "box" (XYXY, absolute,
          x1/y1 exclusive), "mask" (COCO RLE: "size" [H, W], "counts" str)}].
    """
    task = prediction.task
    if task == "semantic":
        labels, counts = torch.unique(prediction.sem_seg, return_counts=True)
        classes = [
            {"id": int(c), "name": class_name(metadata, int(c)), "pixel_count": int(n)}
            for c, n in zip(labels.tolist(), counts.tolist())
        ]
        height, width = prediction.sem_seg.shape
        return {"task": task, "height": height, "width": width, "label_map": map_png, "classes": classes}
    if task == "panoptic":
        segments = []
        for info in prediction.segments_info:
            segment = {
                "id": int(info["id"]),
                "category_id": int(info["category_id"]),
                "category_name": class_name(metadata, int(info["category_id"])),
                "isthing": bool(info["isthing"]),
                "area": int(info["area"]),
            }
            if "score" in info:
                segment["score"] = float(info["score"])
            segments.append(segment)
        height, width = prediction.panoptic_seg.shape
        return {"task": task, "height": height, "width": width, "panoptic_png": map_png,
                "png_encoding": PANOPTIC_PNG_ENCODING, "segments_info": segments}
    instances = prediction.instances
    height, width = instances.image_size
    masks = instances.pred_masks.numpy()
    results = [
        {
            "category_id": int(c),
            "class": class_name(metadata, int(c)),
            "score": float(s),
            "box": [float(v) for v in box],
            "mask": _encode_mask(mask),
        }
        for c, s, box, mask in zip(
            instances.pred_classes.tolist(), instances.scores.tolist(),
            instances.pred_boxes.tensor.tolist(), masks,
        )
    ]
    return {"task": task, "height": height, "width": width, "instances": results}


def save_prediction_json(json_path: str, prediction: TaskPrediction, metadata, **extra) -> Dict:
    """
    Write ``prediction_to_json(prediction)`` (plus ``extra`` fields, e.g. the input file name) to
    ``json_path``; semantic / panoptic also write ``<json stem>_sem_seg.png`` (class ids, 8 bit,
    16 bit above 255 classes) / ``<json stem>_panoptic.png`` (COCO panoptic RGB ids) beside it.

    Returns:
        the JSON dict written.
    """
    stem = os.path.splitext(json_path)[0]
    map_png = None
    if prediction.task == "semantic":
        labels = prediction.sem_seg.numpy()
        dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
        map_png = stem + "_sem_seg.png"
        Image.fromarray(labels.astype(dtype)).save(map_png)
    elif prediction.task == "panoptic":
        map_png = stem + "_panoptic.png"
        Image.fromarray(id2rgb(prediction.panoptic_seg.numpy())).save(map_png)
    result = dict(extra)
    result.update(prediction_to_json(prediction, metadata, map_png and os.path.basename(map_png)))
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    return result


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
        if task not in _TASK_CONFIG_KEYS:
            raise ValueError(f"Unknown task {task!r}; expected one of {list(TASKS)}")
        if not getattr(cfg.MODEL.MASK_FORMER.TEST, _TASK_CONFIG_KEYS[task]):
            raise ValueError(
                f"MODEL.MASK_FORMER.TEST.{_TASK_CONFIG_KEYS[task]} is False: the model would not "
                f"compute the {task} result (use select_task(cfg, {task!r}))"
            )
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {confidence_threshold}")
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "DATASETS.TEST is empty: the demo names and colours classes with the metadata of "
                "DATASETS.TEST[0]; set it to a registered dataset"
            )
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        check_metadata(self.metadata, task, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        check_weights_available(cfg.MODEL.WEIGHTS)
        self.task = task
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.predictor = DefaultPredictor(cfg)

    def predict(self, image_bgr: np.ndarray) -> TaskPrediction:
        """Args: image_bgr: H x W x 3 uint8 in BGR order (as cv2 reads)."""
        return to_task_prediction(self.predictor(image_bgr), self.task, self.confidence_threshold)

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[TaskPrediction, VisImage]:
        """Returns the prediction and its drawing over the image (``vis.get_image()`` is RGB)."""
        prediction = self.predict(image_bgr)
        return prediction, draw_prediction(image_bgr[:, :, ::-1], prediction, self.metadata,
                                           self.instance_mode)

    def run_on_video(self, frames: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Yield each BGR frame of ``frames`` with the prediction drawn on it (BGR); instance
        colours are kept across frames by detectron2's VideoVisualizer."""
        video_visualizer = VideoVisualizer(_drawing_metadata(self.metadata)
                                           if self.task == "instance" else self.metadata,
                                           self.instance_mode)
        for frame in frames:
            prediction = self.predict(frame)
            frame_rgb = frame[:, :, ::-1]
            if self.task == "semantic":
                vis = video_visualizer.draw_sem_seg(frame_rgb, prediction.sem_seg)
            elif self.task == "panoptic":
                vis = video_visualizer.draw_panoptic_seg_predictions(
                    frame_rgb, prediction.panoptic_seg, prediction.segments_info
                )
            else:
                vis = video_visualizer.draw_instance_predictions(frame_rgb, prediction.instances)
            yield vis.get_image()[:, :, ::-1]
