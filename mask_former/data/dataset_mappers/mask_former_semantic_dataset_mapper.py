"""Mapper for semantic segmentation data: an image and a PNG of per-pixel class ids."""

import numpy as np
import torch

from .base import MaskFormerDatasetMapperBase, pad_bottom_right, read_semantic_label, register_mapper

__all__ = ["MaskFormerSemanticDatasetMapper"]


@register_mapper("mask_former_semantic")
class MaskFormerSemanticDatasetMapper(MaskFormerDatasetMapperBase):
    """
    Reads ``file_name`` and ``sem_seg_file_name`` (uint8/uint16 class ids, ``ignore_label`` for
    unlabelled pixels), augments both (see :func:`build_train_augmentations`), pads to
    ``INPUT.SIZE_DIVISIBILITY`` and returns, besides the image,

    - "sem_seg": int64 H x W class ids, ``ignore_label`` in the padding;
    - "instances": one mask per class present: ``gt_classes`` (K, ascending) and ``gt_masks``
      (K x H x W bool, disjoint; ignored and padded pixels are in none).
    """


    def map_for_training(self, dataset_dict: dict) -> dict:
        if "sem_seg_file_name" not in dataset_dict:
            raise KeyError(
                f"{type(self).__name__} needs 'sem_seg_file_name' in dataset dicts; "
                f"{dataset_dict['file_name']!r} has keys {sorted(dataset_dict)}"
            )
        label_file = dataset_dict["sem_seg_file_name"]
        image = self.read_image(dataset_dict)
        label = read_semantic_label(
            label_file, dataset_dict["file_name"], image.shape[:2], self.num_classes, self.ignore_label
        )

        image, label, _ = self.augment(image, label)

        classes = [int(c) for c in np.unique(label) if c != self.ignore_label]
        masks = [label == c for c in classes]
        pad_h, pad_w = self.padding(image)
        sem_seg = pad_bottom_right(label.astype(np.int64), pad_h, pad_w, self.ignore_label)
        dataset_dict = self.finish(dataset_dict, image, classes, masks)
        dataset_dict["sem_seg"] = torch.from_numpy(sem_seg)
        return dataset_dict
