"""PQ, SQ and RQ computed by hotcoco (``TEST.EVAL_BACKEND hotcoco``)."""
import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Optional

from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.evaluation.panoptic_evaluation import _print_panoptic_results
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .backends import import_hotcoco

__all__ = ["HotcocoPanopticEvaluator", "panoptic_metrics"]

logger = logging.getLogger(__name__)


def panoptic_metrics(pq_res) -> "OrderedDict[str, float]":
    """The metrics detectron2's ``COCOPanopticEvaluator`` reports, in percent, from the dict of a
    panopticapi-compatible ``pq_compute``."""
    metrics = OrderedDict()
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for name in ("PQ", "SQ", "RQ"):
            metrics[name + suffix] = 100 * pq_res[group][name.lower()]
    return metrics


class HotcocoPanopticEvaluator(COCOPanopticEvaluator):
    """
    detectron2's ``COCOPanopticEvaluator`` with PQ computed by hotcoco's ``pq_compute`` (the
    protocol and return shape of panopticapi's, in Rust) instead of panopticapi's. ``process``
    and the files written are detectron2's; the results dict has the same keys and scale. The
    whole ``pq_compute`` dict (with ``per_class``) of the last evaluation is kept as
    ``self.pq_results``.

    ``evaluate`` is overridden, not patched: detectron2 imports panopticapi's ``pq_compute``
    inside its ``evaluate``, so there is no hook to give it another one.
    """

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        self._pq_compute = import_hotcoco().panoptic.pq_compute  # an ImportError before any work
        super().__init__(dataset_name, output_dir)
        self.pq_results = None

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions)))
        if not comm.is_main_process():
            return None

        gt_json = PathManager.get_local_path(self._metadata.panoptic_json)
        gt_folder = PathManager.get_local_path(self._metadata.panoptic_root)
        with tempfile.TemporaryDirectory(prefix="panoptic_eval") as pred_dir:
            logger.info(f"Writing all panoptic predictions to {pred_dir} ...")
            annotations = []
            for prediction in predictions:
                with open(os.path.join(pred_dir, prediction["file_name"]), "wb") as f:
                    f.write(prediction["png_string"])
                annotations.append({k: v for k, v in prediction.items() if k != "png_string"})
            with open(gt_json) as f:
                json_data = json.load(f)
            json_data["annotations"] = annotations
            predictions_json = os.path.join(self._output_dir or pred_dir, "predictions.json")
            with PathManager.open(predictions_json, "w") as f:
                f.write(json.dumps(json_data))
            with contextlib.redirect_stdout(io.StringIO()):  # the table is logged below
                pq_res = self._pq_compute(
                    gt_json, PathManager.get_local_path(predictions_json), gt_folder=gt_folder, pred_folder=pred_dir
                )
        self.pq_results = pq_res
        _print_panoptic_results(pq_res)
        return OrderedDict({"panoptic_seg": panoptic_metrics(pq_res)})
