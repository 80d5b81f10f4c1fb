"""The Python API for predictions: :class:`Predictor` (a config or model-zoo name and weights in,
per-image results out, for any image type), and :class:`MaskFormerPredictor`, detectron2's
``DefaultPredictor`` with this project's checkpointer, on which it is built.

    from mask_former.demo import Predictor

    predictor = Predictor("ade20k-150/maskformer_R50_bs16_160k.yaml", weights="model_final.pkl")
    result = predictor("photo.jpg")                   # {"sem_seg": K x H x W scores, ...}
    results = predictor([image_rgb, pil_image])        # one dict per image
    raw = predictor.raw_outputs(["photo.jpg"])         # class and mask logits per image
    labels = predictor.post_process_semantic(raw)[0]   # H x W class ids, HuggingFace-style
    panoptic = predictor.post_process_panoptic(raw, label_ids_to_fuse={...})[0]

The post-processing follows ``transformers.MaskFormerImageProcessor`` (see
:mod:`mask_former.demo.postprocessing` for the deliberate differences).
"""
import logging
import os
from typing import Collection, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import Metadata, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image

from ..checkpoint import MaskFormerCheckpointer, check_weights_available
from ..config import add_mask_former_config, merge_config_file
from ..data.dataset_mappers import read_image
from ..model_zoo import get_config_file
from ..modeling import MaskFormer
from ..modeling.meta_arch.maskformer import detections_per_image
from ..tasks import TASKS, set_task_enabled
from .postprocessing import (
    RawOutput,
    Size,
    post_process_instance,
    post_process_panoptic,
    post_process_semantic,
)

__all__ = ["ImageInput", "metadata_from_config", "metadata_class_names", "MaskFormerPredictor", "Predictor"]

logger = logging.getLogger(__name__)

# A numpy H x W x 3 uint8 array, a PIL image or the path of an image file.
ImageInput = Union[np.ndarray, Image.Image, str, os.PathLike]
_FORMATS = ("RGB", "BGR")


def metadata_from_config(cfg) -> Optional[Metadata]:
    """
    The metadata that names the model's classes: that of ``DATASETS.TEST[0]``; when the config
    names no test dataset, ``MODEL.CLASS_NAMES`` as ``stuff_classes`` (all K classes, e.g. from a
    converted HuggingFace checkpoint); None when neither is set.
    """
    if len(cfg.DATASETS.TEST):
        return MetadataCatalog.get(cfg.DATASETS.TEST[0])
    names = list(cfg.MODEL.CLASS_NAMES)
    if not names:
        return None
    if len(names) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
        raise ValueError(
            f"MODEL.CLASS_NAMES names {len(names)} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
            f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}; they must match"
        )
    return Metadata(name="MODEL.CLASS_NAMES").set(stuff_classes=names)


def metadata_class_names(metadata) -> Optional[List[str]]:
    """The names of the K classes in ``metadata``: ``stuff_classes`` names them all (this
    project's convention); a dataset with only things names them in ``thing_classes``. None when
    neither is set."""
    names = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None)
    return None if names is None else list(names)


class MaskFormerPredictor(DefaultPredictor):
    """detectron2's ``DefaultPredictor`` whose weights are loaded by :class:`MaskFormerCheckpointer`
    (published MaskFormer checkpoints keep their pixel decoder where detectron2's own checkpointer
    would not find it). Call it with one H x W x 3 uint8 image in BGR order (detectron2's
    convention); it returns the model's result for that image at the image's size.
    ``metadata`` is :func:`metadata_from_config` (None when the config names no classes).
    """

    def __init__(self, cfg):
        # DefaultPredictor.__init__ would load the weights with detectron2's checkpointer; this sets
        # the same attributes, which DefaultPredictor.__call__ uses.
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.metadata = metadata_from_config(cfg)
        MaskFormerCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in _FORMATS:
            raise ValueError(f"INPUT.FORMAT={self.input_format!r}: expected 'RGB' or 'BGR'")

    def model_input(self, image: np.ndarray) -> Dict[str, object]:
        """What the model takes for one H x W x 3 image in ``INPUT.FORMAT`` order: the image
        resized to the test size, and the size the results are returned at (the image's)."""
        height, width = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": height, "width": width}


def _config_node(config, allow_unsafe: bool = False) -> CfgNode:
    """A config with this project's keys from a CfgNode (cloned), a YAML file or a model-zoo name
    (unfrozen)."""
    if isinstance(config, CfgNode):
        cfg = config.clone()
        if not hasattr(cfg.MODEL, "MASK_FORMER"):
            raise ValueError("the config lacks this project's keys: build it with get_cfg() and "
                             "mask_former.add_mask_former_config(cfg)")
        cfg.defrost()
        return cfg
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a config file, a model-zoo config name or a CfgNode, got "
                        f"{type(config).__name__}")
    path = os.fspath(config)
    if not os.path.isfile(path):
        try:
            path = get_config_file(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path!r} is neither a config file nor a model-zoo config: {e}") from e
    cfg = get_cfg()
    add_mask_former_config(cfg)
    merge_config_file(cfg, path, allow_unsafe=allow_unsafe)
    return cfg


class Predictor:
    """
    Predictions of a MaskFormer (or Panoptic SegFormer) model on images of any kind.

    ``predictor(images)`` returns the model's results: per image a dict with "sem_seg" (K x H x W
    class scores), "panoptic_seg" ((H x W int32 segment ids, segments_info)) and/or "instances"
    (detectron2 ``Instances``), for the tasks the config switches on, at each image's size, on
    the model's device. :meth:`raw_outputs` gives the class and mask logits before
    post-processing, and :meth:`post_process_semantic`, :meth:`post_process_instance` and
    :meth:`post_process_panoptic` turn them into HuggingFace-style results.

    Attributes:
        cfg: the frozen config; model: the model (eval mode); metadata: the metadata naming the
        classes (:func:`metadata_from_config`; may be None); class_names: the K class names or None.
    """

    def __init__(
        self,
        config,
        weights: Optional[str] = None,
        *,
        opts: Sequence[str] = (),
        device: Optional[str] = None,
        tasks: Optional[Iterable[str]] = None,
        batch_size: int = 1,
        allow_unsafe_config: bool = False,
    ):
        """
        Args:
            config: a config file, the name of a model-zoo config (``"ade20k-150/maskformer_R50_bs16_160k.yaml"``,
                see ``mask_former.model_zoo.list_configs()``) or a CfgNode with this project's keys.
            weights: ``MODEL.WEIGHTS`` (a file or URL, loaded with :class:`MaskFormerCheckpointer`);
                None keeps the config's; "" means random weights.
            opts: config overrides, ``["KEY", "VALUE", ...]`` as on the tools' command lines.
            device: "cpu", "cuda", "cuda:1", ...; None: ``MODEL.DEVICE``, or the CPU when CUDA is
                not available.
            tasks: the outputs to compute, any of "semantic", "instance", "panoptic" (the others
                are switched off); None: those the config has on.
            batch_size: images per forward pass. Images of one batch are padded to a common size,
                which can change MaskFormer's results slightly (its transformer decoder attends to
                the padding); 1 gives each image's results exactly.
            allow_unsafe_config: accept a config file with ``!!python`` YAML tags (which run code).
        """
        cfg = _config_node(config, allow_unsafe=allow_unsafe_config)
        cfg.merge_from_list(list(opts))
        if weights is not None:
            cfg.MODEL.WEIGHTS = str(weights)
        if device is not None:
            cfg.MODEL.DEVICE = device
        elif cfg.MODEL.DEVICE != "cpu" and not torch.cuda.is_available():
            logger.info(f"CUDA is not available: running on the CPU instead of MODEL.DEVICE={cfg.MODEL.DEVICE}")
            cfg.MODEL.DEVICE = "cpu"
        if tasks is not None:
            tasks = list(tasks)
            for task in TASKS:
                set_task_enabled(cfg, task.name, False)
            for name in tasks:
                set_task_enabled(cfg, name)  # a ValueError for an unknown task
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cfg.freeze()
        check_weights_available(cfg.MODEL.WEIGHTS)
        if not cfg.MODEL.WEIGHTS:
            logger.warning("MODEL.WEIGHTS is empty: the model has random weights")

        self._predictor = MaskFormerPredictor(cfg)
        self.cfg = self._predictor.cfg
        self.model = self._predictor.model
        self.metadata = self._predictor.metadata
        self.batch_size = batch_size

    # ------------------------------------------------------------------ inputs

    @property
    def input_format(self) -> str:
        """The channel order the model takes (``INPUT.FORMAT``)."""
        return self._predictor.input_format

    @property
    def class_names(self) -> Optional[List[str]]:
        """The names of the K classes (``stuff_classes`` of the metadata names them all), or None."""
        return None if self.metadata is None else metadata_class_names(self.metadata)

    def _as_array(self, image: ImageInput, format: str) -> np.ndarray:
        """One image as H x W x 3 uint8 in the model's channel order."""
        if isinstance(image, (str, os.PathLike)):  # the reader training uses (EXIF, 16-bit, ...)
            return read_image(os.fspath(image), self.input_format)
        if isinstance(image, Image.Image):
            array, format = np.asarray(image.convert("RGB")), "RGB"
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"a numpy image must be H x W x 3 uint8, got shape {image.shape} and dtype {image.dtype}"
                    + ("; pass a list of images, not a batch array" if image.ndim == 4 else "")
                )
            array = image
        else:
            raise TypeError(f"an image must be a numpy array (H x W x 3 uint8), a PIL image or a file "
                            f"path, got {type(image).__name__}")
        if format not in _FORMATS:
            raise ValueError(f"format must be 'RGB' or 'BGR', got {format!r}")
        return array if format == self.input_format else array[:, :, ::-1]

    def _batches(self, images, format: str):
        """(is a single image, batches of model inputs)."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        inputs = [self._predictor.model_input(self._as_array(image, format)) for image in images]
        return single, [inputs[i:i + self.batch_size] for i in range(0, len(inputs), self.batch_size)]

    # ------------------------------------------------------------------ predictions

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]], format: str = "RGB"):
        """
        Args:
            images: one image or a list of images; each a numpy H x W x 3 uint8 array, a PIL image
                or the path of an image file (read as training reads images).
            format: the channel order of numpy arrays, "RGB" (PIL, matplotlib, HuggingFace) or
                "BGR" (OpenCV); PIL images and files are converted whatever it says.
        Returns:
            the model's dict for a single image, a list of dicts for a list.
        """
        single, batches = self._batches(images, format)
        results = []
        with torch.no_grad():
            for batch in batches:
                results.extend(self.model(batch))
        return results[0] if single else results

    def raw_outputs(self, images: Union[ImageInput, Sequence[ImageInput]], format: str = "RGB") -> List[RawOutput]:
        """
        The network's outputs before post-processing, for :meth:`post_process_semantic` and the
        others (or :mod:`mask_former.demo.postprocessing`).

        Args:
            images, format: as for ``__call__``.
        Returns:
            a list (also for one image) of :class:`RawOutput`: ``class_logits`` Q x (K+1),
            ``mask_logits`` Q x h x w (float32, on the model's device), ``padded_size``,
            ``image_size`` (the resized image inside the padded input) and ``original_size``.
        Raises:
            NotImplementedError: the model is not a ``MaskFormer`` (Panoptic SegFormer has no such
                logits: its thing queries score classes with sigmoids, without "no object", and its
                stuff queries are fixed to one class each).
        """
        if not isinstance(self.model, MaskFormer):
            raise NotImplementedError(
                f"raw_outputs() and the HuggingFace-style post-processing need MODEL.META_ARCHITECTURE "
                f"'MaskFormer' (Q x (K+1) class logits with a 'no object' class and Q mask logits); this "
                f"model is {type(self.model).__name__!r} ({self.cfg.MODEL.META_ARCHITECTURE}). "
                "Panoptic SegFormer's thing queries score classes with sigmoids and its stuff queries are "
                "fixed to one class each; use predictor(images), whose results hold its sem_seg, "
                "panoptic_seg and instances"
            )
        single, batches = self._batches(images, format)
        raw = []
        with torch.no_grad():
            for batch in batches:
                padded = self.model.preprocess_images(batch)
                if self.model.optimize_inference:
                    outputs = self.model.run_network_for_inference(padded.tensor)
                else:
                    outputs = self.model.sem_seg_head(self.model.backbone(padded.tensor))
                padded_size = tuple(int(s) for s in padded.tensor.shape[-2:])
                for i, x in enumerate(batch):
                    raw.append(RawOutput(
                        class_logits=outputs["pred_logits"][i].float(),
                        mask_logits=outputs["pred_masks"][i].float(),
                        padded_size=padded_size,
                        image_size=tuple(int(s) for s in padded.image_sizes[i]),
                        original_size=(int(x["height"]), int(x["width"])),
                    ))
        return raw

    # ------------------------------------------------------------------ post-processing

    @property
    def thing_ids(self) -> Optional[List[int]]:
        """The contiguous ids of the thing classes (the model's, from the metadata of
        ``DATASETS.TEST[0]``); None when nothing says which classes are things."""
        thing_ids = getattr(self.model, "thing_ids", None)
        if thing_ids is None and self.metadata is not None:
            thing_ids = self.metadata.get("thing_dataset_id_to_contiguous_id", {}).values() or None
        return None if thing_ids is None else sorted({int(c) for c in thing_ids})

    def post_process_semantic(self, outputs, target_sizes: Optional[Sequence[Size]] = None,
                              *, resize_masks_first: Optional[bool] = None) -> List[torch.Tensor]:
        """:func:`mask_former.demo.postprocessing.post_process_semantic`; ``resize_masks_first``
        defaults to what this model's inference does, so the maps are the argmax of the model's
        ``sem_seg`` (up to float rounding)."""
        if resize_masks_first is None:
            resize_masks_first = bool(getattr(self.model, "sem_seg_postprocess_before_inference", False))
        return post_process_semantic(outputs, target_sizes, resize_masks_first=resize_masks_first)

    def post_process_instance(
        self,
        outputs,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Optional[Sequence[Size]] = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        *,
        top_k: Optional[int] = None,
        label_ids: Optional[Collection[int]] = None,
    ) -> List[Dict]:
        """:func:`mask_former.demo.postprocessing.post_process_instance` with this model's
        defaults: ``top_k`` = ``TEST.DETECTIONS_PER_IMAGE`` and ``label_ids`` = the thing classes
        (all classes when the metadata does not name them), as the model's own instances."""
        return post_process_instance(
            outputs, threshold, mask_threshold, overlap_mask_area_threshold, target_sizes,
            return_coco_annotation, return_binary_maps,
            top_k=detections_per_image(self.cfg) if top_k is None else top_k,
            label_ids=self.thing_ids if label_ids is None else label_ids,
        )

    def post_process_panoptic(
        self,
        outputs,
        threshold: Optional[float] = None,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: Optional[float] = None,
        label_ids_to_fuse: Optional[Collection[int]] = None,
        target_sizes: Optional[Sequence[Size]] = None,
    ) -> List[Dict]:
        """:func:`mask_former.demo.postprocessing.post_process_panoptic` with this model's
        defaults: ``threshold`` = ``MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD``,
        ``overlap_mask_area_threshold`` = ``...OVERLAP_THRESHOLD`` and ``label_ids_to_fuse`` = the
        stuff classes (nothing when the metadata does not name the things); with these the result
        is the model's ``panoptic_seg``."""
        test = self.cfg.MODEL.MASK_FORMER.TEST
        if label_ids_to_fuse is None and self.thing_ids is not None:
            things = set(self.thing_ids)
            label_ids_to_fuse = [c for c in range(self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES) if c not in things]
        return post_process_panoptic(
            outputs,
            threshold=test.OBJECT_MASK_THRESHOLD if threshold is None else threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=(test.OVERLAP_THRESHOLD if overlap_mask_area_threshold is None
                                         else overlap_mask_area_threshold),
            label_ids_to_fuse=label_ids_to_fuse,
            target_sizes=target_sizes,
        )
