"""MaskFormer for Detectron2: per-pixel classification is not all you need.

The metadata is in pyproject.toml. This file says which files make the package: the Python
packages under mask_former/, the class tables (*.json) of mask_former/data/datasets/, and the
model-zoo configs: the top-level configs/ folder (where users and the docs name them) is installed
as mask_former/model_zoo/configs/, so mask_former.model_zoo.get_config_file() finds them in an
installed package. Nothing is copied into the source tree: package_dir maps the folder.
"""
from setuptools import find_packages, setup

CONFIGS_PACKAGE = "mask_former.model_zoo.configs"

setup(
    packages=find_packages(include=["mask_former", "mask_former.*"]) + [CONFIGS_PACKAGE],
    package_dir={CONFIGS_PACKAGE: "configs"},
    package_data={
        CONFIGS_PACKAGE: ["**/*.yaml"],
        "mask_former.data.datasets": ["*.json", "**/*.json"],
    },
    include_package_data=False,
    zip_safe=False,
)
