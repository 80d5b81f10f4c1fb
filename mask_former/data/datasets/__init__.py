"""Dataset registration: the built-in synthetic dataset, the standard datasets of the model zoo,
and helpers to register custom data in one call."""
from . import standard, synthetic  # noqa: F401  (register on import)
from .custom import register_coco_instance_json, register_coco_panoptic_json, register_semantic_folder
