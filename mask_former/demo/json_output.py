"""One task's prediction as JSON for programs: :func:`prediction_to_json` and
:func:`save_prediction_json` (which also writes a PNG of the label / segment-id map)."""
import json
import os
from typing import Dict, Optional

import numpy as np
import torch
from panopticapi.utils import id2rgb
from PIL import Image

from .api import metadata_class_names
from .postprocessing import encode_coco_rle
from .predictor import TaskPrediction

__all__ = ["PANOPTIC_PNG_ENCODING", "class_name", "prediction_to_json", "save_prediction_json"]

PANOPTIC_PNG_ENCODING = "RGB, segment id = R + 256 * G + 256^2 * B (COCO panoptic); 0 is void"


def class_name(metadata, category_id: int) -> str:
    """Name of contiguous class ``category_id``: ``stuff_classes`` names all classes; a dataset
    with only things names them in ``thing_classes``."""
    names = metadata_class_names(metadata)
    if names is None or not 0 <= category_id < len(names):
        raise KeyError(
            f"Class id {category_id} has no name in the metadata of "
            f"{getattr(metadata, 'name', '<unnamed>')!r} ({0 if names is None else len(names)} names)"
        )
    return names[category_id]


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
          x2/y2 exclusive), "mask" (COCO RLE: "size" [H, W], "counts" str)}].
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
            "mask": encode_coco_rle(mask),
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
