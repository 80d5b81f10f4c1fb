"""mIoU with the ground truth checked as training checks it."""
from typing import Optional, Tuple

import numpy as np
from detectron2.evaluation import SemSegEvaluator

from ..data.dataset_mappers import read_semantic_label

__all__ = ["CheckedSemSegEvaluator"]


class CheckedSemSegEvaluator(SemSegEvaluator):
    """
    detectron2's ``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC, boundary IoU) whose ground-truth
    label maps pass the checks of the training mapper before they are scored, each error naming
    the label file: one channel of integers, the size of the image (of its prediction), values
    that are class ids in [0, K) (K: the dataset's ``stuff_classes``) or the dataset's
    ``ignore_label``. detectron2's evaluator would fail on such a file with a reshape or
    broadcast error naming no file, or score it wrongly (labels numbered 1..K: class K falls
    into the ignore bin and every other class is shifted).
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None):
        super().__init__(
            dataset_name,
            distributed=distributed,
            output_dir=output_dir,
            sem_seg_loading_fn=self._read_checked_label,
        )
        # (image file, H x W of its prediction) of the image being scored
        self._scoring: Optional[Tuple[str, Tuple[int, int]]] = None

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            file_name = input["file_name"]
            if file_name not in self.input_file_to_gt_file:
                raise KeyError(
                    f"{file_name!r} has no semantic label in dataset {self._dataset_name!r} (no "
                    "record with this file_name and a sem_seg_file_name)"
                )
            self._scoring = (file_name, tuple(output["sem_seg"].shape[-2:]))
            try:
                super().process([input], [output])
            finally:
                self._scoring = None

    def _read_checked_label(self, label_file: str, dtype=int) -> np.ndarray:
        """The loading function given to SemSegEvaluator: read and check ``label_file``."""
        image_file, size = self._scoring
        label = read_semantic_label(
            label_file,
            image_file,
            size,
            self._num_classes,
            self._ignore_label,
            classes_from=f"the {self._num_classes} stuff_classes of dataset {self._dataset_name!r}",
        )
        return label.astype(dtype)
