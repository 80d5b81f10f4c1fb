"""DETR's transformer (Carion et al. 2020): encoder and decoder layers in post-norm or pre-norm form.

Sequences are laid out (length, batch, channels), as ``nn.MultiheadAttention`` expects by default;
the parameter names match the published DETR and MaskFormer checkpoints.
"""
import copy
from typing import ContextManager, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layers.context_switch import ContextSwitch


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


# Whether attention layers in eval mode skip the attention weights (see fused_attention).
_FUSED_ATTENTION = ContextSwitch("mask_former_fused_attention")


def fused_attention(enabled: bool = True) -> ContextManager[None]:
    """
    Within this context the attention layers of this module that are in eval mode do not ask
    ``nn.MultiheadAttention`` for the attention weights, so PyTorch computes the attention with
    the fused ``scaled_dot_product_attention`` kernel (the same result up to float rounding).
    Outside it, and always in training, the explicit computation (with its dropout random
    stream) is kept. MaskFormer's optimised inference path enters it.
    """
    return _FUSED_ATTENTION(enabled)


def _attend(attn: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
            key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """``attn(query, key, value)[0]``, fused inside :func:`fused_attention` in eval mode."""
    need_weights = attn.training or not _FUSED_ATTENTION.enabled()
    return attn(query, key, value=value, key_padding_mask=key_padding_mask,
                need_weights=need_weights)[0]


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"Unknown transformer activation {name!r}; expected 'relu' or 'gelu'")


class TransformerEncoderLayer(nn.Module):
    """Self-attention + feed-forward block over a flattened feature map."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        """src, pos: (HW, B, C); src_key_padding_mask: (B, HW) True on padding. Returns (HW, B, C)."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = _with_pos(x, pos)
            src = src + self.dropout1(_attend(self.self_attn, q, k, x, src_key_padding_mask))
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        q = k = _with_pos(src, pos)
        src = self.norm1(src + self.dropout1(_attend(self.self_attn, q, k, src, src_key_padding_mask)))
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the image features, feed-forward."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt, query_pos: (Q, B, C); memory, pos: (HW, B, C); memory_key_padding_mask: (B, HW).
        Returns the updated queries (Q, B, C)."""
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = _with_pos(x, query_pos)
            tgt = tgt + self.dropout1(_attend(self.self_attn, q, k, x))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(_attend(self.multihead_attn, _with_pos(x, query_pos),
                                              _with_pos(memory, pos), memory, memory_key_padding_mask))
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        q = k = _with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(_attend(self.self_attn, q, k, tgt)))
        tgt = self.norm2(tgt + self.dropout2(_attend(self.multihead_attn, _with_pos(tgt, query_pos),
                                                     _with_pos(memory, pos), memory,
                                                     memory_key_padding_mask)))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


def _clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with an optional final LayerNorm (pre-norm only)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.norm = norm

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """A stack of decoder layers followed by a LayerNorm.

    With ``return_intermediate`` the normalized output of every layer is returned,
    stacked as (num_layers, Q, B, C), for deep supervision; otherwise (1, Q, B, C).
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None) -> Tensor:
        intermediate: List[Tensor] = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos,
                        query_pos=query_pos)
            if self.return_intermediate:
                intermediate.append(self.norm(tgt))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(tgt).unsqueeze(0)


class Transformer(nn.Module):
    """DETR's encoder-decoder transformer over a single feature map.

    ``num_encoder_layers`` may be 0 (MaskFormer's default: the pixel decoder does the encoding) and
    ``num_decoder_layers`` may be 0 (a pixel decoder that only needs the encoder).
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 return_intermediate_dec=False):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(
                f"Transformer: hidden dim {d_model} must be divisible by the number of heads {nhead} "
                "(MODEL.MASK_FORMER.HIDDEN_DIM / NHEADS or MODEL.SEM_SEG_HEAD.CONVS_DIM)"
            )
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        if num_decoder_layers > 0:
            decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout,
                                                    activation, normalize_before)
            self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                              return_intermediate=return_intermediate_dec)
        else:
            self.decoder = None
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Optional[Tensor], pos_embed: Tensor) -> Tensor:
        """src, pos_embed: B x C x H x W; mask: B x H x W (True = padding) or None.
        Returns the encoded features as B x C x H x W."""
        bs, c, h, w = src.shape
        memory = self.encoder(
            src.flatten(2).permute(2, 0, 1),
            src_key_padding_mask=None if mask is None else mask.flatten(1),
            pos=pos_embed.flatten(2).permute(2, 0, 1),
        )
        return memory.permute(1, 2, 0).view(bs, c, h, w)

    def forward(self, src: Tensor, mask: Optional[Tensor], query_embed: Tensor, pos_embed: Tensor):
        """
        Args:
            src: B x C x H x W image features; pos_embed: their positional encoding (same shape).
            mask: B x H x W, True on padded pixels, or None.
            query_embed: Q x C learned query positional embeddings.
        Returns:
            hs: L x B x Q x C decoder outputs (L = number of decoder layers with return_intermediate,
                else 1).
            memory: B x C x H x W encoder output.
        """
        if self.decoder is None:
            raise RuntimeError("Transformer built with num_decoder_layers=0 has no decoder; use encode()")
        bs, c, h, w = src.shape
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
        key_padding_mask = None if mask is None else mask.flatten(1)
        memory = self.encoder(src.flatten(2).permute(2, 0, 1), src_key_padding_mask=key_padding_mask,
                              pos=pos)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=key_padding_mask, pos=pos,
                          query_pos=query_pos)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)
