"""Dataset registration: the standard datasets of the model zoo, the built-in synthetic dataset,
and helpers to register custom data in one call, all through one layer:

- ``classes/*.json`` + :mod:`.class_tables`: the class tables, shared with ``datasets/prepare_*.py``;
- :mod:`.metadata`: class metadata from categories and an explicit numbering, one palette;
- :mod:`.registration`: one registration (and loader) per format: semantic folders, COCO
  instance JSON, COCO panoptic;
- :mod:`.standard`, :mod:`.synthetic`, :mod:`.custom`: the three users of that layer.

Importing this package registers the standard and the synthetic datasets under
``$DETECTRON2_DATASETS`` (default ``datasets``), reading no dataset file.
"""
from .command_line import add_dataset_argument, register_datasets_from_args
from .custom import register_coco_instance_json, register_coco_panoptic_json, register_semantic_folder
from .registration import datasets_root
from .standard import register_all_standard
from .synthetic import register_all_synthetic

__all__ = ["register_semantic_folder", "register_coco_instance_json", "register_coco_panoptic_json",
           "add_dataset_argument", "register_datasets_from_args"]

register_all_standard(datasets_root())
register_all_synthetic(datasets_root())
