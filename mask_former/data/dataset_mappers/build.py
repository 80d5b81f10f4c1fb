"""DATASET_MAPPER_REGISTRY: one mapper per input format, chosen by INPUT.DATASET_MAPPER_NAME."""
from detectron2.utils.registry import Registry

from ...utils.registry import lookup

DATASET_MAPPER_REGISTRY = Registry("DATASET_MAPPER")
DATASET_MAPPER_REGISTRY.__doc__ = """
Dataset mappers turn a dataset dict into the model's input. A registered mapper is a class whose
constructor is ``@configurable`` with ``from_config(cls, cfg, is_train=True)``.
"""


def build_dataset_mapper(cfg, is_train: bool = True):
    """Instantiate the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    return lookup(DATASET_MAPPER_REGISTRY, name, "INPUT.DATASET_MAPPER_NAME")(cfg, is_train)
