"""What the meta-architectures share: the tasks their inference returns (``output_tasks``, read by
``mask_former.evaluation``), their switches, the normalization and padding of the input images, and
the backbone call of training (``backbone_features``), the precision of inference
(``inference_autocast``), the weights the optimised inference path keeps beside the model
(``prepare_for_inference``) and the memory of its large outputs (``output_buffer``).

A new meta-architecture subclasses :class:`SegmentationMetaArch`, registers ``pixel_mean`` and
``pixel_std`` buffers (C x 1 x 1), sets ``size_divisibility`` and calls :meth:`set_task_switches`.
"""
import contextlib
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

from ...layers.winograd_conv import nnpack_ready
from ...tasks import enabled_tasks, get_task
from ...utils.cpu_info import (
    cpu_has_avx2_kernels,
    cpu_has_avx512_kernels,
    cpu_runs_bf16_fast,
    no_bf16_kernels_note,
)
from ..backbone.swin import zero_masked_attention
from ..inference_optimization import InferenceWeights, inference_dtype
from ..reusable_buffers import ReusableBuffers
from ..training_optimization import (
    channels_last_conv_weights,
    folded_frozen_norms,
    has_checkpointed_activations,
    winograd_convolutions,
)

__all__ = ["SegmentationMetaArch", "task_switches"]

logger = logging.getLogger(__name__)

SEMANTIC, PANOPTIC, INSTANCE = (get_task(name) for name in ("semantic", "panoptic", "instance"))


def task_switches(tasks: Sequence[str]) -> Dict[str, bool]:
    """The constructor keywords ``semantic_on``, ``panoptic_on``, ``instance_on`` of the task names
    ``tasks`` (``output_tasks(cfg)``)."""
    return {
        "semantic_on": SEMANTIC.name in tasks,
        "panoptic_on": PANOPTIC.name in tasks,
        "instance_on": INSTANCE.name in tasks,
    }


class SegmentationMetaArch(nn.Module):
    """Base of MaskFormer and PanopticSegFormer (see the module docstring)."""

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    size_divisibility: int
    backbone: nn.Module
    # Train with the backbone's frozen batch norms folded into their convolutions, channels-last
    # where ``train_channels_last`` says so (``backbone_features``); False trains the modules as built.
    optimize_training: bool = True
    # MODEL.TRAIN_CHANNELS_LAST: True, False, or None for "where it pays" (``channels_last_training``)
    train_channels_last: Optional[bool] = None
    # MODEL.TRAIN_WINOGRAD_CONV: True, False, or None for "where it pays" (``winograd_training``)
    train_winograd_conv: Optional[bool] = None
    # MODEL.MASK_FORMER.TEST.WINOGRAD_CONV: the same in inference (``winograd_inference``)
    test_winograd_conv: Optional[bool] = None
    # the layout the convolution weights were last stored in (True: channels-last), None: as built
    _conv_weights_channels_last: Optional[bool] = None
    # MODEL.MASK_FORMER.TEST.PRECISION of the network in inference ("fp32", "bf16" or "fp16")
    precision: str = "fp32"
    # Run inference through the optimised path (channels-last convolutions, in ``precision``, in
    # bf16 / fp16 with folded batch norms; see ``prepare_for_inference``); False runs the modules as built.
    optimize_inference: bool = True
    # Keep the memory of the optimised path's large outputs for the next call (``output_buffer``):
    # True, False, or None for "with bf16 or fp16" (MODEL.MASK_FORMER.TEST.REUSE_OUTPUT_MEMORY)
    reuse_output_memory: Optional[bool] = None
    _inference_weights = None  # InferenceWeights, an inference-only cache (prepare_for_inference)
    _inference_buffers = None  # ReusableBuffers of the optimised path's large outputs
    _warned_slow_precision = False  # said once per model that its precision is slow on this CPU

    @classmethod
    def output_tasks(cls, cfg) -> Tuple[str, ...]:
        """Names of the tasks (``mask_former.tasks``) whose results inference returns under ``cfg``."""
        return tuple(task.name for task in enabled_tasks(cfg))

    def set_task_switches(self, semantic_on: bool, panoptic_on: bool, instance_on: bool) -> None:
        """Keep the switches; a ValueError when all are off."""
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.{SEMANTIC_ON,PANOPTIC_ON,INSTANCE_ON} are all False: "
                "inference would produce nothing"
            )
        self.semantic_on, self.panoptic_on, self.instance_on = semantic_on, panoptic_on, instance_on

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def inference_autocast(self):
        """The context the network runs in at inference: nothing in fp32, autocast to bfloat16 or
        float16 (matrix products and convolutions) with ``precision`` "bf16" or "fp16"."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if self.device.type == "cpu" and not self._warned_slow_precision:
            self._warn_if_slow_on_this_cpu()
        return torch.autocast(self.device.type, dtype=inference_dtype(self.precision))

    def _warn_if_slow_on_this_cpu(self) -> None:
        """Say (once per model) when ``precision`` is slower than fp32 on this CPU: the results are
        valid, but a user who chose a fast path should know that it is not one here."""
        if self.precision == "fp16":
            logger.warning("MODEL.MASK_FORMER.TEST.PRECISION fp16 on a CPU: most CPUs have no float16 "
                           "arithmetic and run it no faster than fp32; bf16 is the CPU fast path")
        elif self.precision == "bf16" and not cpu_runs_bf16_fast():
            logger.warning(
                f"MODEL.MASK_FORMER.TEST.PRECISION bf16 on {no_bf16_kernels_note()}, slower than fp32 "
                "(an R50 MaskFormer at 512 x 512 took 4.4x fp32's time on an AVX2 CPU); fp32 is the "
                "fast path on this CPU"
            )
        self._warned_slow_precision = True

    def check_low_precision_outputs(self, outputs: Sequence[torch.Tensor]) -> None:
        """In fp16, a FloatingPointError when the network's ``outputs`` are not all finite: float16
        overflows beyond 65504, where bfloat16 and float32 do not, and the outputs would be NaN."""
        if self.precision != "fp16":
            return
        if not all(bool(torch.isfinite(t).all()) for t in outputs):
            raise FloatingPointError(
                "MODEL.MASK_FORMER.TEST.PRECISION fp16: the network's outputs are not finite (float16 "
                "overflows beyond 65504); run this model in bf16 (float32's range) or fp32"
            )

    def train(self, mode: bool = True):
        if mode:
            self._inference_weights = None  # training changes the weights; free the copy
            self._inference_buffers = None  # and needs the memory
        return super().train(mode)

    def output_buffer(self, key, shape: Sequence[int]) -> Optional[torch.Tensor]:
        """
        Where the optimised path writes a large float32 output of ``shape`` (``key`` names it, e.g.
        the semantic scores of the i-th image): with ``reuse_output_memory`` (None: with bf16 or fp16), the
        memory of the previous call's output under ``key`` once the caller has let go of it
        (``ReusableBuffers``; ``train()`` frees it); otherwise None, for new memory.
        """
        reuse = self.reuse_output_memory
        if reuse is None:
            reuse = self.precision != "fp32"
        if not reuse:
            self._inference_buffers = None  # reuse switched off: free what an earlier call kept
            return None
        if self._inference_buffers is None:
            self._inference_buffers = ReusableBuffers()
        return self._inference_buffers.empty(key, shape, device=self.device)

    def _weights_dtype(self):
        return None if self.precision == "fp32" else inference_dtype(self.precision)

    def prepare_for_inference(self, fold: Optional[bool] = None,
                              winograd: Optional[bool] = None) -> InferenceWeights:
        """
        Build, or rebuild when the weights changed, what the optimised inference path keeps beside
        the model (``InferenceWeights``): in bf16 and fp16, the weights of every convolution with a
        frozen batch norm with the norm folded in (channels-last) and low-precision copies of the other
        weights of matrix products and convolutions. In float32 nothing is copied and the
        convolutions run as built (1x1 ones of channels-last inputs as matrix products): the folded
        weights would be copies (R50: 94 MB, a fifth of the reference path's inference memory at
        512x512) for no time that ``tools/benchmark_inference.py --levers`` could tell from its
        noise. ``fold`` overrides that choice (for measuring what folding pays). Large float32 3x3
        convolutions run by Winograd where :meth:`winograd_inference` (``winograd`` overrides it).

        When it builds them, it first stores every convolution weight of the model channels-last,
        in place, as training does (``training_optimization.channels_last_conv_weights``): the
        optimised path's activations are channels-last, and a planar weight would be reordered at
        every call (a 512 x 512 x 3 x 3 weight of a 4 x 4 input: 1.6 against 0.9 ms).

        Called by every optimised forward in eval mode (cheap when nothing changed); the modules,
        parameters and the values of ``state_dict()`` are left as they are, so training,
        checkpoints and the reference path (``optimize_inference = False``) are unaffected.
        ``train()`` drops the copies.
        """
        dtype = self._weights_dtype()
        if fold is None:
            fold = dtype is not None
        if winograd is None:
            winograd = self.winograd_inference()
        weights = self._inference_weights
        if (weights is None or weights.fold != fold or weights.winograd != winograd
                or not weights.is_current(self, dtype)):
            self._inference_weights = None  # free the stale copies before making new ones
            self.store_conv_weights(channels_last=True)  # before the copies, which take its layout
            weights = self._inference_weights = InferenceWeights(self, dtype, fold=fold, winograd=winograd)
        return weights

    def backbone_features(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The backbone's features of a B x 3 x H x W batch. In training with
        ``optimize_training``, the backbone's frozen batch norms are folded into their
        convolutions (``training_optimization.folded_frozen_norms``) and, where
        :meth:`channels_last_training` says so, the images go in channels-last (oneDNN's own layout
        on AVX-512 CPUs): the same losses and gradients to float rounding. Every convolution weight
        of the model is stored in the training layout (:meth:`store_conv_weights`; again after an
        inference stored them channels-last), so the features keep that layout through the heads
        without a reorder of the weights at every call. A Swin backbone's shifted windows are
        masked with -inf (``swin.zero_masked_attention``: no denormal numbers)."""
        if self.training and self.optimize_training:
            channels_last = self.channels_last_training()
            self.store_conv_weights(channels_last)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with folded_frozen_norms(self.backbone), zero_masked_attention():
                return self.backbone(images)
        return self.backbone(images)

    def set_train_channels_last(self, value: Optional[bool]) -> None:
        """Keep MODEL.TRAIN_CHANNELS_LAST (None, True or False; a ValueError naming the key otherwise)."""
        if not (value is None or isinstance(value, bool)):
            raise ValueError(
                f"MODEL.TRAIN_CHANNELS_LAST={value!r}: expected None (channels-last where it pays: "
                "GPUs and CPUs with AVX-512), True or False"
            )
        self.train_channels_last = value

    def channels_last_training(self) -> bool:
        """Whether the optimised training path runs the convolutions channels-last:
        ``train_channels_last`` (MODEL.TRAIN_CHANNELS_LAST) where set, else on GPUs and on CPUs
        with PyTorch's AVX-512 kernels. On an AVX2 CPU (AMD EPYC, family 25 model 1) the R50 step
        took 1.2x-1.3x the time of planar convolutions: oneDNN's channels-last backward of a 3 x 3
        convolution took 2-2.5x the planar time there, while on AVX-512 / AMX CPUs channels-last
        made the step about 0.9x."""
        if self.train_channels_last is not None:
            return self.train_channels_last
        return self.device.type != "cpu" or cpu_has_avx512_kernels()

    def set_winograd_conv(self, train: Optional[bool], test: Optional[bool]) -> None:
        """Keep MODEL.TRAIN_WINOGRAD_CONV and MODEL.MASK_FORMER.TEST.WINOGRAD_CONV (None, True or
        False): a ValueError naming the key for another value, or for True where this PyTorch has
        no NNPACK."""
        for key, value in (("MODEL.TRAIN_WINOGRAD_CONV", train), ("MODEL.MASK_FORMER.TEST.WINOGRAD_CONV", test)):
            if not (value is None or isinstance(value, bool)):
                raise ValueError(
                    f"{key}={value!r}: expected None (Winograd 3x3 convolutions where they pay: CPUs "
                    "with PyTorch's AVX2 kernels), True or False"
                )
            if value and not nnpack_ready():
                raise ValueError(
                    f"{key}=True, but this PyTorch was built without NNPACK "
                    "(torch.backends.nnpack.is_available() is False); set it to False"
                )
        self.train_winograd_conv, self.test_winograd_conv = train, test

    def _winograd_pays_on_this_device(self) -> bool:
        """Where Winograd convolutions were measured to pay: CPUs on which PyTorch runs its AVX2
        kernels (an AMD EPYC, family 25 model 1). AVX-512 CPUs (where oneDNN has twice NNPACK's
        vector width) and Arm CPUs were not measured; GPUs never use them."""
        return self.device.type == "cpu" and cpu_has_avx2_kernels() and nnpack_ready()

    def winograd_inference(self) -> bool:
        """Whether the optimised inference path runs the large float32 3x3 convolutions by
        Winograd (channels-last: F(4x4, 3x3) in PyTorch, ``layers.winograd_conv``):
        ``test_winograd_conv`` (MODEL.MASK_FORMER.TEST.WINOGRAD_CONV) where set, else where it pays
        (on the AVX2 CPU, R50 and Swin-T at 512 x 512 took 0.87x-0.96x the time, alternating)."""
        if self.test_winograd_conv is not None:
            return self.test_winograd_conv
        return self._winograd_pays_on_this_device()

    def winograd_training(self) -> bool:
        """Whether the optimised training path runs the large float32 3x3 convolutions on the CPU by
        NNPACK's Winograd algorithm (``layers.winograd_conv``): ``train_winograd_conv``
        (MODEL.TRAIN_WINOGRAD_CONV) where set, else where it pays (an R50 step at 512 x 512 took
        0.84x-0.85x the time on the AVX2 CPU), unless activations are checkpointed
        (MODEL.ACTIVATION_CHECKPOINTING), which says that memory comes first: NNPACK keeps a
        workspace of about 50 MB per thread, and the checkpointed step's peak grew by 4 %."""
        if self.train_winograd_conv is not None:
            return self.train_winograd_conv
        return self._winograd_pays_on_this_device() and not has_checkpointed_activations(self)

    def winograd_training_context(self, module: nn.Module):
        """The context in which ``module`` runs in training: its large 3x3 convolutions by Winograd
        (``training_optimization.winograd_convolutions``) with ``optimize_training`` where
        :meth:`winograd_training`, else as built. (The pixel decoders' finest 3x3 convolutions are
        the ones large enough: a ResNet's 256-channel ones see at most 1/16 of the image.)"""
        return winograd_convolutions(module, self.training and self.optimize_training and self.winograd_training())

    def store_conv_weights(self, channels_last: bool) -> None:
        """Store every convolution weight channels-last (or planar), in place, unless this model
        already did (``training_optimization.channels_last_conv_weights``): weights in the
        activations' layout are not reordered at every call, and neither are their gradients."""
        if self._conv_weights_channels_last is not channels_last:
            channels_last_conv_weights(self, channels_last)
            self._conv_weights_channels_last = channels_last

    def preprocess_images(self, batched_inputs: List[Dict[str, object]]) -> ImageList:
        """Normalize the inputs' images and pad them into one batch (to ``size_divisibility``)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)
