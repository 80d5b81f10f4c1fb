"""Predictions on images for people and programs: the :class:`Predictor` API with HuggingFace-style
post-processing, the demo's drawings and JSON. The top application layer of the package (above
modeling, checkpoint and data); ``tools/demo.py`` / ``maskformer-demo`` is its command line."""
from .api import ImageInput, MaskFormerPredictor, Predictor, metadata_class_names, metadata_from_config
from .json_output import class_name, prediction_to_json, save_prediction_json
from .postprocessing import (
    RawOutput,
    as_raw_outputs,
    post_process_instance,
    post_process_panoptic,
    post_process_semantic,
)
from .predictor import (
    SegmentationDemo,
    TaskPrediction,
    check_metadata,
    draw_prediction,
    filter_instances,
    scale_image,
    scale_prediction,
    select_task,
    to_task_prediction,
)
