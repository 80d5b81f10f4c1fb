"""MaskFormer for Detectron2: per-pixel classification is not all you need."""
from setuptools import find_packages, setup

setup(
    name="mask_former",
    version="0.1.0",
    description="MaskFormer (mask classification for semantic, instance and panoptic segmentation) "
    "as a detectron2 extension",
    packages=find_packages(include=["mask_former", "mask_former.*"]),
    python_requires=">=3.8",
    # detectron2 is not on the package index under its own name: install it first
    # (scripts/install_detectron2.sh, or from source, see README.md).
    install_requires=[
        "torch>=1.9",
        "torchvision",
        "numpy",
        "scipy",
        "pycocotools",
        "panopticapi-lite",
        "fvcore",
        "opencv-python-headless",
        "pillow",
        "tqdm",
    ],
)
