"""The paper's per-pixel classification baselines, for detectron2's SemanticSegmentor."""
from typing import Dict, Optional

import fvcore.nn.weight_init as weight_init
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn
from torch.nn import functional as F

from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder
from .mask_former_head import check_num_classes, run_pixel_and_transformer_decoders, transformer_in_channels


class _PerPixelClassificationHead(nn.Module):
    """K logits per pixel from a pixel decoder and a ``predictor``, trained with cross-entropy;
    subclasses say what the predictor is (:meth:`layers`)."""

    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, predictor: nn.Module,
                 loss_weight: float, ignore_value: int, common_stride: int):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        self.common_stride = common_stride

    @staticmethod
    def _common_config(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, object]:
        return {
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "common_stride": cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE,
        }

    def layers(self, features: Dict[str, Tensor]) -> Dict[str, object]:
        """Returns "pred_masks" B x K x H_4 x W_4 logits (and "aux_outputs" with deep supervision)."""
        raise NotImplementedError

    def forward(self, features: Dict[str, Tensor], targets: Optional[Tensor] = None):
        """
        Args:
            features: backbone outputs.
            targets: B x H x W ground-truth labels (training only).
        Returns:
            (B x K x H x W logits, {}) in inference; (None, {"loss_sem_seg": ...}) in training.
        """
        outputs = self.layers(features)
        if self.training:
            losses = {"loss_sem_seg": self._loss(outputs["pred_masks"], targets)}
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                losses[f"loss_sem_seg_{i}"] = self._loss(aux["pred_masks"], targets)
            return None, losses
        logits = F.interpolate(outputs["pred_masks"], scale_factor=self.common_stride, mode="bilinear",
                               align_corners=False)
        return logits, {}

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = F.interpolate(logits.float(), scale_factor=self.common_stride, mode="bilinear",
                               align_corners=False)
        return F.cross_entropy(logits, targets, reduction="mean",
                               ignore_index=self.ignore_value) * self.loss_weight


@SEM_SEG_HEADS_REGISTRY.register()
class PerPixelBaselineHead(_PerPixelClassificationHead):
    """Pixel decoder + a 1x1 conv classifier over its per-pixel embeddings."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, loss_weight: float = 1.0,
                 ignore_value: int = -1, common_stride: int = 4):
        """
        Args:
            num_classes: K.
            pixel_decoder: makes per-pixel embeddings of ``pixel_decoder.mask_dim`` channels.
            loss_weight: weight of the cross-entropy loss.
            ignore_value: label ignored by the loss.
            common_stride: stride of the per-pixel embeddings (predictions are upsampled by it).
        """
        classifier = Conv2d(pixel_decoder.mask_dim, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(classifier)
        super().__init__(num_classes=num_classes, pixel_decoder=pixel_decoder, predictor=classifier,
                         loss_weight=loss_weight, ignore_value=ignore_value, common_stride=common_stride)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        return cls._common_config(cfg, input_shape)

    def layers(self, features: Dict[str, Tensor]) -> Dict[str, object]:
        mask_features, _ = self.pixel_decoder.forward_features(features)
        return {"pred_masks": self.predictor(mask_features)}


@SEM_SEG_HEADS_REGISTRY.register()
class PerPixelBaselinePlusHead(_PerPixelClassificationHead):
    """The "+" baseline: a transformer decoder with one query per class and no class head; each
    query's mask is that class's per-pixel logit map. Deep supervision applies the loss to every
    layer."""

    @configurable
    def __init__(self, *, num_classes: int, pixel_decoder: nn.Module, transformer_predictor: nn.Module,
                 transformer_in_feature: str, loss_weight: float = 1.0, ignore_value: int = -1,
                 common_stride: int = 4):
        if transformer_predictor.num_queries != num_classes:
            raise ValueError(
                "PerPixelBaselinePlusHead needs one query per class: MODEL.MASK_FORMER."
                f"NUM_OBJECT_QUERIES={transformer_predictor.num_queries} must equal "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}"
            )
        super().__init__(num_classes=num_classes, pixel_decoder=pixel_decoder,
                         predictor=transformer_predictor, loss_weight=loss_weight,
                         ignore_value=ignore_value, common_stride=common_stride)
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = cls._common_config(cfg, input_shape)
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        in_channels = transformer_in_channels(in_feature, ret["pixel_decoder"], input_shape)
        ret["transformer_predictor"] = build_transformer_decoder(cfg, in_channels, mask_classification=False)
        ret["transformer_in_feature"] = in_feature
        return ret

    def layers(self, features: Dict[str, Tensor]) -> Dict[str, object]:
        return run_pixel_and_transformer_decoders(
            self.pixel_decoder, self.predictor, self.transformer_in_feature, features
        )
