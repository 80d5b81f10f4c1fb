from . import datasets  # noqa: F401  (registers datasets)
from .dataset_mappers import DATASET_MAPPER_REGISTRY, build_dataset_mapper
