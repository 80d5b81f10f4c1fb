"""Panoptic SegFormer's mask decoder: queries cross-attend to the encoder's tokens of the levels
of strides 8, 16 and 32, and each layer's attention logits, read as maps, give every query's mask.

Per layer: the per-head attention logits (before the softmax) are split by level; each level's
heads go through a Linear(heads, heads) + ReLU, the coarser maps are bilinearly upsampled to the
finest level (stride 8), the three are concatenated (3 x heads channels) and a Linear(3 x heads, 1)
gives the mask logit of every pixel at stride 8. Thing queries pass ``THING_MASK_DEC_LAYERS``
layers of cross-attention; stuff queries pass ``STUFF_MASK_DEC_LAYERS`` layers of self-attention
among them + cross-attention. Every layer has a light class head: Linear(C, thing classes) for
things, Linear(C, 1) for stuff (the stuff query's own class). All layers are supervised.

One difference from the published description, deliberate: the last Linear(3 x heads, 1) has no
ReLU, since a ReLU on a logit would keep every pixel's probability at 0.5 or above.

An option not in the publication (``mask_embed_dim`` > 0, ``MODEL.PANOPTIC_SEGFORMER.MASK_EMBED_DIM``):
MaskFormer's mask product added to every layer's mask logits, ``MLP(query) . Linear(token)`` over
the tokens of the finest mask level, a richer per-pixel term than the few heads' attention logits.
"""
import copy
from typing import Dict, List, Optional, Tuple

from detectron2.config import configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers import MultiLevelTokens
from ..transformer_decoder.standard_transformer_decoder import MLP
from .build import PSF_MASK_DECODER_REGISTRY

NUM_MASK_LEVELS = 3  # strides 8, 16, 32


class AttentionMaskHead(nn.Module):
    """Attention logits of the mask levels -> one mask logit map per query at the finest level.

    Computed as written in the module docstring, but with the fusing Linear(levels x heads, 1)
    applied to each level before its upsampling: both are linear, so ``fuse(cat(up(a_l)))`` equals
    ``sum_l up(w_l . a_l) + bias``, and only one channel per level is upsampled instead of heads.
    """

    def __init__(self, nheads: int, num_levels: int = NUM_MASK_LEVELS):
        super().__init__()
        self.level_linears = nn.ModuleList(nn.Linear(nheads, nheads) for _ in range(num_levels))
        self.fuse = nn.Linear(num_levels * nheads, 1)

    def forward(self, attn_logits: Tensor, shapes: List[Tuple[int, int]]) -> Tensor:
        """
        Args:
            attn_logits: B x heads x Q x S3, logits over the tokens of the mask levels.
            shapes: (H_l, W_l) of those levels, fine to coarse.
        Returns:
            B x Q x H_0 x W_0 mask logits.
        """
        batch, heads, queries, _ = attn_logits.shape
        height, width = shapes[0]
        logits = attn_logits.permute(0, 2, 3, 1)  # B x Q x S3 x heads
        fuse_weights = self.fuse.weight.view(len(shapes), heads)
        fused = None
        for level_logits, (h, w), linear, fuse_weight in zip(
            logits.split([h * w for h, w in shapes], dim=2), shapes, self.level_linears, fuse_weights
        ):
            level = F.relu(linear(level_logits)) @ fuse_weight  # B x Q x h w
            level = level.view(batch * queries, 1, h, w)
            if (h, w) != (height, width):
                level = F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)
            fused = level if fused is None else fused + level
        return (fused + self.fuse.bias).view(batch, queries, height, width)


class MaskDecoderLayer(nn.Module):
    """(Optional self-attention among the queries,) cross-attention to the tokens whose per-head
    logits are returned, feed-forward network; post-norm."""

    def __init__(self, d_model: int, nheads: int, d_ffn: int, dropout: float, self_attention: bool):
        super().__init__()
        if d_model % nheads:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM={d_model} must be divisible by NHEADS={nheads}")
        self.nheads = nheads
        if self_attention:
            self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
            self.norm_self = nn.LayerNorm(d_model)
        else:
            self.self_attn = None
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Optional[Tensor],
                padding_mask: Optional[Tensor], keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """
        Args:
            query, query_pos: B x Q x C.
            memory, memory_pos: B x S x C tokens and their positional encodings.
            padding_mask: B x S bool, True on padding, or None.
            keys: ``memory + memory_pos`` when the caller has it (the same for every layer of a
                decoder), or None to compute it here.
        Returns:
            the updated queries B x Q x C and the attention logits B x heads x Q x S.
        """
        if self.self_attn is not None:
            q = k = query + query_pos
            query = self.norm_self(query + self.self_attn(q, k, query, need_weights=False)[0])
        batch, num_queries, channels = query.shape
        head_dim = channels // self.nheads
        if keys is None:
            keys = memory if memory_pos is None else memory + memory_pos
        # the scale applied to the few queries, not to the Q x S logits
        q = self.q_proj(query + query_pos) * head_dim ** -0.5
        q = q.view(batch, num_queries, self.nheads, head_dim).transpose(1, 2)
        # the keys head-major in memory: a bfloat16 product with them as the strided view copied
        # them transposed (R50 COCO at 512 x 512, 5376 tokens: 3.5 ms, against 1.1 ms with this copy)
        k = self.k_proj(keys).view(batch, -1, self.nheads, head_dim).transpose(1, 2).contiguous()
        v = self.v_proj(memory).view(batch, -1, self.nheads, head_dim).transpose(1, 2)
        logits = q @ k.transpose(-2, -1)  # B x heads x Q x S
        weights = logits if padding_mask is None else logits.masked_fill(padding_mask[:, None, None], float("-inf"))
        attended = (weights.softmax(-1) @ v).transpose(1, 2).reshape(batch, num_queries, channels)
        query = self.norm1(query + self.dropout1(self.out_proj(attended)))
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(query))))
        return self.norm2(query + self.dropout3(hidden)), logits


class QueryMaskDecoder(nn.Module):
    """A stack of MaskDecoderLayer, with a mask head and a class head per layer (and, with
    ``mask_embed_dim`` > 0, one query MLP shared by the layers for the mask product)."""

    def __init__(self, num_layers: int, num_classes: int, d_model: int, nheads: int, d_ffn: int,
                 dropout: float, self_attention: bool, mask_embed_dim: int = 0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mask decoder layers must be >= 1, got {num_layers}")
        layer = MaskDecoderLayer(d_model, nheads, d_ffn, dropout, self_attention)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.mask_heads = nn.ModuleList(AttentionMaskHead(nheads) for _ in range(num_layers))
        self.class_branches = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.mask_embed = MLP(d_model, d_model, mask_embed_dim, 3) if mask_embed_dim > 0 else None

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Optional[Tensor],
                padding_mask: Optional[Tensor], shapes: List[Tuple[int, int]],
                pixel_embed: Optional[Tensor] = None, all_layers: bool = True) -> List[Dict[str, Tensor]]:
        """
        Args:
            pixel_embed: B x (H_0 W_0) x mask_embed_dim, the finest level's tokens' embeddings
                (with ``mask_embed_dim`` > 0).
            all_layers: False to make the masks and class logits of the last layer only (what
                inference reads); the earlier layers still update the queries.
        Returns:
            per layer (the last one only, without ``all_layers``) {"pred_logits": B x Q x classes,
            "pred_masks": B x Q x H_0 x W_0}.
        """
        keys = memory if memory_pos is None else memory + memory_pos
        outputs = []
        last = len(self.layers) - 1
        for i, (layer, mask_head, class_branch) in enumerate(zip(self.layers, self.mask_heads, self.class_branches)):
            query, logits = layer(query, query_pos, memory, memory_pos, padding_mask, keys=keys)
            if not all_layers and i < last:
                continue
            masks = mask_head(logits, shapes)
            if self.mask_embed is not None:
                product = self.mask_embed(query) @ pixel_embed.transpose(1, 2)  # B x Q x H_0 W_0
                masks = masks + product.view(masks.shape)
            outputs.append({"pred_logits": class_branch(query), "pred_masks": masks})
        return outputs


@PSF_MASK_DECODER_REGISTRY.register()
class AttentionMaskDecoder(nn.Module):
    """``thing_decoder`` for the thing queries, ``stuff_decoder`` (with self-attention) for the
    stuff queries; masks from attention maps (see the module docstring)."""

    @configurable
    def __init__(self, *, num_thing_classes: int, hidden_dim: int, nheads: int, dim_feedforward: int,
                 dropout: float, thing_layers: int, stuff_layers: int, mask_embed_dim: int = 0):
        super().__init__()
        if mask_embed_dim < 0:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.MASK_EMBED_DIM={mask_embed_dim!r}: expected >= 0 "
                             "(0: masks from the attention maps only, as published)")
        self.thing_decoder = QueryMaskDecoder(thing_layers, num_thing_classes, hidden_dim, nheads,
                                              dim_feedforward, dropout, self_attention=False,
                                              mask_embed_dim=mask_embed_dim)
        self.stuff_decoder = QueryMaskDecoder(stuff_layers, 1, hidden_dim, nheads, dim_feedforward,
                                              dropout, self_attention=True, mask_embed_dim=mask_embed_dim)
        self.pixel_embed = nn.Linear(hidden_dim, mask_embed_dim) if mask_embed_dim > 0 else None

    @classmethod
    def from_config(cls, cfg, num_thing_classes: int):
        psf = cfg.MODEL.PANOPTIC_SEGFORMER
        return {
            "num_thing_classes": num_thing_classes,
            "hidden_dim": psf.HIDDEN_DIM,
            "nheads": psf.NHEADS,
            "dim_feedforward": psf.DIM_FEEDFORWARD,
            "dropout": psf.DROPOUT,
            "thing_layers": psf.THING_MASK_DEC_LAYERS,
            "stuff_layers": psf.STUFF_MASK_DEC_LAYERS,
            "mask_embed_dim": psf.MASK_EMBED_DIM,
        }

    def forward(self, thing_query: Tensor, thing_pos: Tensor, stuff_query: Tensor, stuff_pos: Tensor,
                memory: MultiLevelTokens, all_layers: bool = True) -> Dict[str, List[Dict[str, Tensor]]]:
        """
        Args:
            thing_query, thing_pos: B x Nt x C (Nt may be 0).
            stuff_query, stuff_pos: B x Ns x C, one query per stuff class (Ns may be 0).
            memory: the encoder's tokens; the first three levels (strides 8, 16, 32) are attended.
            all_layers: False for the outputs of the last layers only (inference reads no other).
        Returns:
            {"things": per layer {"pred_logits": B x Nt x thing classes, "pred_masks": B x Nt x H_8 x W_8},
             "stuff": per layer {"pred_logits": B x Ns x 1, "pred_masks": B x Ns x H_8 x W_8}}
            with H_8 x W_8 the size of the stride-8 level; one layer each without ``all_layers``.
        """
        shapes = memory.shapes[:NUM_MASK_LEVELS]
        num_tokens = sum(h * w for h, w in shapes)
        tokens = memory.tokens[:, :num_tokens]
        pos = None if memory.pos is None else memory.pos[:, :num_tokens]
        padding = None if memory.padding_mask is None else memory.padding_mask[:, :num_tokens]
        if padding is not None and not padding.any():
            padding = None  # nothing to mask: no masked copy of every layer's logits
        pixel_embed = None
        if self.pixel_embed is not None:
            pixel_embed = self.pixel_embed(tokens[:, : shapes[0][0] * shapes[0][1]])
        return {
            "things": self.thing_decoder(thing_query, thing_pos, tokens, pos, padding, shapes, pixel_embed,
                                         all_layers),
            "stuff": self.stuff_decoder(stuff_query, stuff_pos, tokens, pos, padding, shapes, pixel_embed,
                                        all_layers),
        }
