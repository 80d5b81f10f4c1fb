"""Mask AP for models whose class ids are contiguous over ALL classes (things and stuff)."""
from detectron2.evaluation import COCOEvaluator


class _MetadataWithoutThingIdMap:
    """Read-only view of a Metadata without ``thing_dataset_id_to_contiguous_id``, so that
    COCOEvaluator does not remap category ids a second time."""

    def __init__(self, metadata):
        self._metadata = metadata

    def __getattr__(self, name):
        if name == "thing_dataset_id_to_contiguous_id":
            raise AttributeError(name)
        return getattr(self._metadata, name)

    def get(self, name, default=None):
        if name == "thing_dataset_id_to_contiguous_id":
            return default
        return self._metadata.get(name, default)


class InstanceSegEvaluator(COCOEvaluator):
    """COCO mask AP ("segm" only: the model's boxes are not evaluated).

    detectron2's COCOEvaluator requires thing classes to have contiguous ids 0..T-1, but a model
    trained on a panoptic dataset numbers things and stuff together (ADE20K interleaves them).
    This evaluator maps predicted contiguous ids back to dataset category ids itself and rejects
    a prediction of a non-thing class with a clear error. Per-category APs are named after the
    instance JSON's categories: metadata ``thing_classes`` may list all classes (indexed by
    contiguous id, as the visualizer wants for ADE20K), which COCOEvaluator cannot use.
    """

    def __init__(self, dataset_name, output_dir=None, *, distributed=True, max_dets_per_image=100):
        super().__init__(
            dataset_name,
            tasks=("segm",),
            distributed=distributed,
            output_dir=output_dir,
            use_fast_impl=False,  # the fast C++ COCOeval needs detectron2's compiled ops
            max_dets_per_image=max_dets_per_image,
        )

    def _eval_predictions(self, predictions, img_ids=None):
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if mapping is not None:
            contiguous_to_dataset = {v: k for k, v in mapping.items()}
            for prediction in predictions:
                for result in prediction["instances"]:
                    category_id = result["category_id"]
                    if category_id not in contiguous_to_dataset:
                        raise ValueError(
                            f"A prediction for image {result.get('image_id')} has class {category_id}, "
                            f"which is not a thing class of {self._metadata.name} (thing ids: "
                            f"{sorted(contiguous_to_dataset)})"
                        )
                    result["category_id"] = contiguous_to_dataset[category_id]
        metadata = self._metadata
        self._metadata = _MetadataWithoutThingIdMap(metadata)
        try:
            super()._eval_predictions(predictions, img_ids=img_ids)
        finally:
            self._metadata = metadata

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        category_ids = sorted(self._coco_api.getCatIds())  # the order of COCOeval's class axis
        class_names = [category["name"] for category in self._coco_api.loadCats(category_ids)]
        return super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
