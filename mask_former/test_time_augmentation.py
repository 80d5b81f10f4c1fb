"""Multi-scale + flip test-time augmentation for semantic segmentation."""
import copy
from typing import Dict, List

import torch
from detectron2.data.transforms import HFlipTransform
from detectron2.modeling import DatasetMapperTTA
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SemanticSegmentorWithTTA(nn.Module):
    """Runs a segmentation model on the augmentations of TEST.AUG (each MIN_SIZES, optionally
    flipped) and averages the un-flipped "sem_seg" scores, all at the original resolution."""

    def __init__(self, cfg, model: nn.Module, tta_mapper=None, batch_size: int = 1):
        """
        Args:
            cfg: config with TEST.AUG.{MIN_SIZES,MAX_SIZE,FLIP}.
            model: a model returning "sem_seg" (MaskFormer with SEMANTIC_ON, SemanticSegmentor).
            tta_mapper: makes the augmented inputs; default detectron2's DatasetMapperTTA(cfg).
            batch_size: augmented images per forward pass.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        """Same inputs and outputs as the model (only "sem_seg" is returned)."""
        return [self._inference_one_image(x) for x in batched_inputs]

    def _inference_one_image(self, inputs: Dict) -> Dict[str, torch.Tensor]:
        inputs = copy.copy(inputs)
        if "height" not in inputs:
            inputs["height"], inputs["width"] = inputs["image"].shape[1:]
        augmented = self.tta_mapper(inputs)
        total, count = None, 0
        for start in range(0, len(augmented), self.batch_size):
            batch = augmented[start:start + self.batch_size]
            with torch.no_grad():
                outputs = self.model([{k: v for k, v in x.items() if k != "transforms"} for x in batch])
            for aug_input, output in zip(batch, outputs):
                sem_seg = output["sem_seg"]
                if any(isinstance(t, HFlipTransform) for t in aug_input["transforms"].transforms):
                    sem_seg = sem_seg.flip(dims=[2])
                total = sem_seg if total is None else total + sem_seg
                count += 1
        return {"sem_seg": total / count}
