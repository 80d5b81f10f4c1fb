"""Mask AP for models whose class ids are contiguous over ALL classes (things and stuff)."""
import logging

from detectron2.evaluation import COCOEvaluator

logger = logging.getLogger(__name__)

_MAX_NAMED_DROPS = 10  # degenerate annotations warned about one by one; the rest are counted


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

    Polygons of fewer than 3 points (or an odd number of coordinates) in the ground-truth JSON
    are dropped with a warning naming the image and annotation id, and an annotation left without
    a polygon is dropped, as detectron2's ``load_coco_json`` does for training (pycocotools would
    fail on them with "Argument 'bb' has incorrect type").
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
        drop_degenerate_polygons(self._coco_api, self._metadata.get("json_file", None) or dataset_name)

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


def _valid_polygon(polygon) -> bool:
    return isinstance(polygon, (list, tuple)) and len(polygon) >= 6 and len(polygon) % 2 == 0


def drop_degenerate_polygons(coco_api, source: str) -> int:
    """
    Remove from a pycocotools ``COCO`` ground truth the polygons with fewer than 3 points (or an
    odd number of coordinates), and the annotations left without a polygon; log a warning
    naming ``source`` (the JSON), the image and the annotation id of each.

    Returns:
        the number of annotations changed or dropped.
    """
    images = coco_api.dataset.get("images", [])
    file_names = {image.get("id"): image.get("file_name") for image in images}
    kept, changed = [], 0
    for annotation in coco_api.dataset.get("annotations", []):
        segmentation = annotation.get("segmentation")
        if not isinstance(segmentation, list) or (segmentation and all(map(_valid_polygon, segmentation))):
            kept.append(annotation)  # RLE, or good polygons
            continue
        valid = [p for p in segmentation if _valid_polygon(p)]
        changed += 1
        if changed <= _MAX_NAMED_DROPS:
            image_id = annotation.get("image_id")
            if segmentation:
                sizes = [len(p) if isinstance(p, (list, tuple)) else type(p).__name__ for p in segmentation]
                problem = (f"has polygons of {sizes} coordinates; a polygon needs >= 3 points (an even "
                           "number >= 6 of coordinates)")
            else:
                problem = "has an empty polygon list"
            what = "dropped those polygons" if valid else "dropped the annotation"
            logger.warning(
                f"{source}: annotation id {annotation.get('id')} of image id {image_id} "
                f"({file_names.get(image_id)!r}) {problem}: {what} from the evaluation ground truth"
            )
        if valid:
            annotation["segmentation"] = valid
            kept.append(annotation)
    if changed:
        if changed > _MAX_NAMED_DROPS:
            logger.warning(f"{source}: {changed} annotations had degenerate polygons in all")
        coco_api.dataset["annotations"] = kept
        coco_api.createIndex()
    return changed
