"""Mask AP for models whose class ids are contiguous over ALL classes (things and stuff)."""
import itertools
import json
import logging
import os
import warnings

from detectron2.evaluation import COCOEvaluator
from detectron2.utils.file_io import PathManager

from .backends import check_eval_backend, import_hotcoco

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

    ``backend`` (``TEST.EVAL_BACKEND``): "pycocotools" scores with detectron2's COCOEvaluator
    (its C++ COCOeval where detectron2's compiled ops are built, pycocotools' COCOeval otherwise,
    as detectron2 chooses); "hotcoco" scores the same results with hotcoco's COCO and COCOeval
    (equal metrics, faster; ``max_dets_per_image`` >= 10). The results dict is the same.
    """

    def __init__(self, dataset_name, output_dir=None, *, distributed=True, max_dets_per_image=100,
                 backend="pycocotools"):
        self._backend = check_eval_backend(backend, "backend")
        self._hotcoco = import_hotcoco() if backend == "hotcoco" else None  # an ImportError first
        if self._hotcoco and max_dets_per_image is not None and max_dets_per_image < 10:
            # detectron2 then asks for maxDets [1, 10, N], not increasing, on which the per-category
            # APs of hotcoco and pycocotools differ (measured, tests/test_fast_eval.py)
            raise ValueError(
                f"max_dets_per_image = {max_dets_per_image}: backend 'hotcoco' gives pycocotools' mask AP "
                "for max_dets_per_image >= 10 only; use backend 'pycocotools' (TEST.EVAL_BACKEND)"
            )
        super().__init__(
            dataset_name,
            tasks=("segm",),
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
        )
        drop_degenerate_polygons(self._coco_api, self._metadata.get("json_file", None) or dataset_name)
        # hotcoco's ground truth: the one pycocotools loaded, degenerate polygons dropped alike
        self._hotcoco_gt = self._hotcoco.COCO(self._coco_api.dataset) if self._hotcoco else None

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
        if self._backend == "hotcoco":
            self._eval_predictions_with_hotcoco(predictions, img_ids)
            return
        metadata = self._metadata
        self._metadata = _MetadataWithoutThingIdMap(metadata)
        try:
            super()._eval_predictions(predictions, img_ids=img_ids)
        finally:
            self._metadata = metadata

    def _eval_predictions_with_hotcoco(self, predictions, img_ids=None):
        """What COCOEvaluator does for "segm" (results file, metrics in ``self._results``), with
        hotcoco's COCO and COCOeval."""
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {file_path}")
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        self._logger.info("Evaluating predictions with hotcoco's COCOeval ...")
        coco_eval = self._hotcoco_cocoeval(coco_results, img_ids) if coco_results else None
        self._results["segm"] = self._derive_coco_results(coco_eval, "segm")

    def _hotcoco_cocoeval(self, coco_results, img_ids):
        # without the boxes, as detectron2 does: the area ranges (APs/APm/APl) use the mask area
        results = [{k: v for k, v in result.items() if k != "bbox"} for result in coco_results]
        coco_eval = self._hotcoco.COCOeval(self._hotcoco_gt, self._hotcoco_gt.loadRes(results), "segm")
        coco_eval.params.maxDets = self._max_dets_per_image
        if img_ids is not None:
            coco_eval.params.imgIds = img_ids
        with warnings.catch_warnings():
            # maxDets other than [1, 10, 100] (max_dets_per_image): the AP lines use its last value,
            # as detectron2's COCOevalMaxDets does; the AR lines, which we do not report, may not
            warnings.filterwarnings("ignore", message="hotcoco: max_dets differ")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return coco_eval

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
