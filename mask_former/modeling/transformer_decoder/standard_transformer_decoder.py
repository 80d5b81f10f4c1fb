"""MaskFormer's standard transformer decoder: DETR's transformer decoder over one backbone feature."""
from typing import ContextManager, Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers.context_switch import ContextSwitch
from .build import TRANSFORMER_DECODER_REGISTRY
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


_PIXEL_MAJOR = ContextSwitch("pixel_major_mask_logits")


def pixel_major_mask_logits(enabled: bool = True) -> ContextManager[None]:
    """
    Within this context :func:`mask_logits` lays its result out pixel-major (each pixel's
    logits of all layers and queries together) whatever the features' layout. The matcher's point
    sampling reads such logits where they lie; planar ones it copies, transposed, layer by layer
    (R50 at 512 x 512 on the AVX2 CPU, whose training features are planar: 6 copies of 13 MB,
    about 60 ms per step), and the product itself takes the same time (124 against 130 ms). Training
    with ``optimize_training`` (``MaskFormer.forward``) enters it; the modules as built do not.
    """
    return _PIXEL_MAJOR(enabled)


def pixel_major_mask_logits_enabled() -> bool:
    """Whether the calling code runs inside :func:`pixel_major_mask_logits`."""
    return _PIXEL_MAJOR.enabled()


def mask_logits(mask_embed: Tensor, mask_features: Tensor) -> Tensor:
    """
    ``einsum("lbqc,bchw->lbqhw", mask_embed, mask_features)``: each query's mask embedding dotted
    with every pixel's embedding, for the L decoder layers at once.

    Computed as one matrix product per image with the queries of all layers stacked
    (``b x (l q) x c``), so the features are neither copied per layer (as a broadcasting product
    does, L x B x HW x C) nor to another layout, and the result's backward has no such copies
    either. Channels-last features (the optimised paths) are used as they lie, a (pixels x
    channels) matrix per image, and the result comes out with the queries innermost (for one layer, as in
    inference, a channels-last ``b x q x h x w`` view of ``b x h x w x q`` memory, which is what
    the band-wise upsampling of the masks reads), and so do planar features within
    :func:`pixel_major_mask_logits`. The result is a view; ``unbind(0)`` gives the layers.
    """
    num_layers, batch, num_queries, channels = mask_embed.shape
    height, width = mask_features.shape[-2:]
    queries = mask_embed.permute(1, 0, 2, 3).reshape(batch, num_layers * num_queries, channels)
    channels_last = not mask_features.is_contiguous() and mask_features.is_contiguous(memory_format=torch.channels_last)
    if not (channels_last or (pixel_major_mask_logits_enabled() and mask_features.is_contiguous())):
        masks = torch.bmm(queries, mask_features.flatten(2))  # b x lq x hw
        return masks.view(batch, num_layers, num_queries, height, width).transpose(0, 1)
    pixels = mask_features.permute(0, 2, 3, 1).flatten(1, 2)  # b x hw x c, a view of either layout
    masks = torch.bmm(pixels, queries.transpose(1, 2))  # b x hw x lq
    return masks.view(batch, height, width, num_layers, num_queries).permute(3, 0, 4, 1, 2)


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(nn.Module):
    """N learned queries attend to an image feature through a DETR decoder; each decoder output
    gives K+1 class logits (with ``mask_classification``) and a mask embedding whose dot product
    with the per-pixel embeddings is that query's mask.

    The image feature gets a sine positional encoding; the queries have learned positional
    embeddings (``query_embed``). With deep supervision the outputs of every decoder layer are
    returned (``aux_outputs``) so the loss can be applied to each.
    """

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dropout: float,
        dim_feedforward: int,
        enc_layers: int,
        dec_layers: int,
        pre_norm: bool,
        deep_supervision: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels: channels of the image feature the decoder attends to.
            mask_classification: predict K+1 class logits per query (False for PerPixelBaselinePlus,
                where each of the K queries is one class).
            num_classes: K, not counting "no object".
            hidden_dim, nheads, dropout, dim_feedforward, enc_layers, dec_layers, pre_norm:
                transformer settings.
            num_queries: N, the number of queries.
            deep_supervision: return the predictions of every decoder layer.
            mask_dim: dimension of the mask embeddings (= channels of the per-pixel embeddings).
            enforce_input_project: add the 1x1 input projection even if in_channels == hidden_dim.
        """
        super().__init__()
        self.mask_classification = mask_classification
        self.aux_loss = deep_supervision
        self.mask_dim = mask_dim
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(
            d_model=hidden_dim,
            nhead=nheads,
            num_encoder_layers=enc_layers,
            num_decoder_layers=dec_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            normalize_before=pre_norm,
            return_intermediate_dec=deep_supervision,
        )
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.constant_(self.input_proj.bias, 0)
        else:
            self.input_proj = nn.Sequential()
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        for key in ("HIDDEN_DIM", "NUM_OBJECT_QUERIES", "NHEADS", "DEC_LAYERS"):
            if getattr(mf, key) < 1:
                raise ValueError(f"MODEL.MASK_FORMER.{key} must be >= 1, got {getattr(mf, key)}")
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dropout": mf.DROPOUT,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "enc_layers": mf.ENC_LAYERS,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        }

    def forward(self, x: Tensor, mask_features: Tensor) -> Dict[str, object]:
        """
        Args:
            x: B x C_in x H' x W' image feature (e.g. res5, stride 32).
            mask_features: B x mask_dim x H x W per-pixel embeddings (stride 4).
        Returns:
            dict with
              "pred_logits": B x N x (K+1) (only with mask_classification),
              "pred_masks": B x N x H x W mask logits,
              "aux_outputs": list (one per earlier decoder layer) of dicts with the same keys
                             (only in training with deep supervision),
              and in training the factors of "pred_masks" (``einsum("bnc,bchw->bnhw")``), in
              every layer's dict: "mask_embed" B x N x mask_dim and "mask_features" (the
              argument). The criterion takes the matched queries' logits from them, so that its
              backward runs through those M queries instead of all N (see ``SetCriterion``).
        """
        if mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"The pixel decoder gives {mask_features.shape[1]}-channel mask features but the "
                f"decoder's mask embeddings have MODEL.SEM_SEG_HEAD.MASK_DIM={self.mask_dim} channels"
            )
        pos = self.pe_layer(x)
        hs, _ = self.transformer(self.input_proj(x), None, self.query_embed.weight, pos)
        # hs: L x B x N x hidden_dim
        with_aux = self.aux_loss and self.training
        if not with_aux:
            hs = hs[-1:]
        mask_embed = self.mask_embed(hs)
        logits = self.class_embed(hs).unbind(0) if self.mask_classification else None
        # one view per layer; unbind's backward writes the layers' gradients into one tensor,
        # where indexing would give every layer a zero-filled gradient of the whole stack. The
        # product comes last: when activations are checkpointed, the recomputation stops as soon
        # as it has what the backward keeps (the product's inputs), so it never runs the product
        # itself (in training 6 x 100 queries at every pixel, which the backward does not need)
        masks = mask_logits(mask_embed, mask_features).unbind(0)

        embeds = mask_embed.unbind(0) if self.training else None

        out: Dict[str, object] = {"pred_masks": masks[-1]}
        if logits is not None:
            out["pred_logits"] = logits[-1]
        if embeds is not None:
            out.update(mask_embed=embeds[-1], mask_features=mask_features)
        if with_aux:
            out["aux_outputs"] = self._aux_outputs(logits, masks, embeds, mask_features)
        return out

    @torch.jit.unused
    def _aux_outputs(self, logits, masks, embeds, mask_features) -> List[Dict[str, Tensor]]:
        aux = []
        for i in range(len(masks) - 1):
            layer_out = {"pred_masks": masks[i]}
            if logits is not None:
                layer_out["pred_logits"] = logits[i]
            if embeds is not None:
                layer_out.update(mask_embed=embeds[i], mask_features=mask_features)
            aux.append(layer_out)
        return aux
