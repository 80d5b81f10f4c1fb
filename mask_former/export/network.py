"""MaskFormer's network as one function of one tensor, and the padding that goes before it."""
from typing import Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..modeling import MaskFormer

__all__ = ["ExportableMaskFormer", "pad_image"]


class ExportableMaskFormer(nn.Module):
    """
    The network of a :class:`MaskFormer` (normalization, backbone, segmentation head) with one
    tensor in and two tensors out, for tracing and export:

    * input ``image``: 1 x 3 x H x W float32, raw pixel values (0-255) in the config's
      ``INPUT.FORMAT`` channel order (what the dataset mappers put in ``"image"``), H and W
      multiples of :attr:`size_divisibility`. :func:`pad_image` pads any image to that;
    * outputs ``pred_logits``: 1 x Q x (K+1) class logits (the last column is "no object"), and
      ``pred_masks``: 1 x Q x H/4 x W/4 mask logits.

    The normalization (``MODEL.PIXEL_MEAN``, ``MODEL.PIXEL_STD``) is part of the network; the
    padding and the post-processing are not (see :class:`~mask_former.export.Postprocessor`).
    The outputs are those of ``MaskFormer``'s reference inference path (``optimize_inference =
    False``) before post-processing, in float32, whatever ``MODEL.MASK_FORMER.TEST.PRECISION``.

    The wrapper shares the modules (and so the weights) of the model it wraps, and puts them in
    eval mode.
    """

    input_names = ("image",)
    output_names = ("pred_logits", "pred_masks")

    def __init__(self, model: nn.Module):
        """
        Args:
            model: a :class:`MaskFormer` (``build_model(cfg)`` with its weights loaded).
        """
        super().__init__()
        if not isinstance(model, MaskFormer):
            raise TypeError(
                f"ExportableMaskFormer exports the MaskFormer meta-architecture; got a "
                f"{type(model).__name__} (MODEL.META_ARCHITECTURE)"
            )
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("pixel_std", model.pixel_std.detach().clone().view(1, -1, 1, 1))
        self.size_divisibility = int(model.size_divisibility)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        """
        Args:
            image: 1 x 3 x H x W raw pixel values in INPUT.FORMAT, H and W multiples of
                ``size_divisibility``.
        Returns:
            pred_logits (1 x Q x (K+1)) and pred_masks (1 x Q x H/4 x W/4).
        """
        outputs = self.sem_seg_head(self.backbone((image - self.pixel_mean) / self.pixel_std))
        if "pred_logits" not in outputs:
            raise ValueError(
                f"{type(self.sem_seg_head).__name__} gives no class logits ('pred_logits'): the "
                "export needs a mask-classification head (MODEL.SEM_SEG_HEAD.NAME MaskFormerHead)"
            )
        return outputs["pred_logits"], outputs["pred_masks"]


def pad_image(image: Union[Tensor, np.ndarray], size_divisibility: int,
              pixel_mean: Sequence[float]) -> Tuple[Tensor, Tuple[int, int]]:
    """
    Make the exported network's input from one image, padded as ``MaskFormer`` pads its batch.

    The model pads the *normalized* image with zeros at the bottom and right; the exported network
    normalizes inside, so the raw image is padded with ``pixel_mean`` (which the normalization
    turns into exactly zero).

    Args:
        image: 3 x H x W (torch tensor, the model's ``"image"`` input) or H x W x 3 (numpy array,
            e.g. from ``detectron2.data.detection_utils.read_image``), raw values in the config's
            ``INPUT.FORMAT`` channel order, any numeric dtype.
        size_divisibility: the network's (``ExportableMaskFormer.size_divisibility``,
            ``MODEL.MASK_FORMER.SIZE_DIVISIBILITY``, 32 for the ResNet and Swin configs).
        pixel_mean: ``MODEL.PIXEL_MEAN``.
    Returns:
        the 1 x 3 x H' x W' float32 input (H', W' the next multiples of ``size_divisibility``;
        ``.numpy()`` it for onnxruntime), and ``(H, W)``, where the image lies inside it.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be H x W x 3, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"a tensor image must be 3 x H x W, got shape {tuple(image.shape)}")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    image = image.to(torch.float32)
    height, width = int(image.shape[1]), int(image.shape[2])
    pad_h = -height % size_divisibility
    pad_w = -width % size_divisibility
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    padded = mean.expand(3, height + pad_h, width + pad_w).clone()
    padded[:, :height, :width] = image
    return padded[None], (height, width)
