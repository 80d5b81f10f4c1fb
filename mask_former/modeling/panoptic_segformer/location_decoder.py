"""Panoptic SegFormer's location decoder: Deformable DETR's decoder with iterative box refinement
over the thing queries. Each layer refines every query's reference box; per layer, a class branch
(sigmoid scores of the thing classes) and a box branch (normalized cx, cy, w, h) predict
detections for the detection loss."""
import copy
import math
from typing import Dict, List

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ...layers import MSDeformAttn, MultiLevelTokens
from ..transformer_decoder.standard_transformer_decoder import MLP


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Deformable DETR's logit: ``log(max(x, eps) / max(1 - x, eps))`` of x clamped to [0, 1].

    Not ``torch.logit(x, eps)``, which clamps x itself to [eps, 1 - eps]: the two differ (values
    and gradients) for x within eps of 0 or 1, and this one is what the published weights saw.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class LocationDecoderLayer(nn.Module):
    """Self-attention among the queries, multi-scale deformable cross-attention to the encoder's
    tokens around each query's reference point / box, feed-forward network; post-norm.

    Module names are Deformable DETR's decoder layer's (``norm2`` after the self-attention,
    ``norm1`` after the cross-attention, ``norm3`` after the FFN), so its weights map one to one."""

    def __init__(self, d_model: int, n_heads: int, d_ffn: int, dropout: float, n_levels: int, n_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor,
                memory: MultiLevelTokens) -> Tensor:
        """
        Args:
            query: B x Q x C; query_pos: B x Q x C.
            reference_points: B x Q x L x 2 (points) or x 4 (boxes), normalized to each level.
            memory: the encoder's tokens.
        Returns:
            B x Q x C.
        """
        q = k = query + query_pos
        attended = self.self_attn(q, k, query, need_weights=False)[0]
        query = self.norm2(query + self.dropout2(attended))
        attended = self.cross_attn(query + query_pos, reference_points, memory.tokens,
                                   memory.spatial_shapes, memory.level_start_index, memory.padding_mask)
        query = self.norm1(query + self.dropout1(attended))
        hidden = self.linear2(self.dropout3(F.relu(self.linear1(query))))
        return self.norm3(query + self.dropout4(hidden))


def sine_box_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalized boxes, as the encoder's sine position encoding of a pixel:
    per coordinate ``num_feats`` features (sin / cos pairs of ``2 pi x / temperature^(2i/num_feats)``).

    Args:
        boxes: ... x 4 (cx, cy, w, h) in [0, 1].
    Returns:
        ... x 4 num_feats.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = boxes.float()[..., None] * (2 * math.pi) / dim_t  # ... x 4 x F
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)
    return embedding.flatten(-2).to(boxes.dtype)


class BoxQueryPosition(nn.Module):
    """The thing queries' positional part for the mask decoder made from their boxes (not in the
    publication, ``MODEL.PANOPTIC_SEGFORMER.THING_QUERY_POS "box"``): a 2-layer MLP on the sine
    embedding of the location decoder's last boxes (detached: the mask losses do not move the
    boxes). It tells each thing query's mask attention where its object is, as the keys carry the
    sine position of their pixels."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        if hidden_dim % 4:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM={hidden_dim} must be divisible by 4 with "
                             "THING_QUERY_POS 'box'")
        self.mlp = MLP(hidden_dim, hidden_dim, hidden_dim, 2)

    def forward(self, boxes: Tensor) -> Tensor:
        """B x N x 4 boxes (cx, cy, w, h) -> B x N x C."""
        return self.mlp(sine_box_embedding(boxes.detach(), self.mlp.layers[0].in_features // 4))


class LocationDecoder(nn.Module):
    """N learned thing queries through L layers with iterative box refinement.

    ``query_embedding`` (N x 2C) holds each query's positional part (first C channels) and content
    (last C); the first reference points are ``sigmoid(reference_points(query_pos))``, and after
    each layer its box branch refines them: ``sigmoid(box_branch(h) + logit(reference))``
    (detached before the next layer, as in Deformable DETR).
    """

    def __init__(self, *, num_queries: int, hidden_dim: int, num_layers: int, num_classes: int,
                 nheads: int, dim_feedforward: int, dropout: float, num_levels: int, n_points: int,
                 query_pos_from_boxes: bool = False):
        """
        Args:
            num_queries: thing queries.
            hidden_dim: C.
            num_layers: decoder layers (>= 1).
            num_classes: thing classes (sigmoid scores, no "no object" class).
            nheads, dim_feedforward, dropout, num_levels, n_points: of each layer.
            query_pos_from_boxes: the "query_pos" output (the mask decoder's) is
                :class:`BoxQueryPosition` of the last boxes instead of the learned positional part.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS must be >= 1, got {num_layers}")
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.query_embedding = nn.Embedding(num_queries, 2 * hidden_dim)
        self.reference_points = nn.Linear(hidden_dim, 2)
        layer = LocationDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, num_levels, n_points)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        class_branch = nn.Linear(hidden_dim, num_classes)
        box_branch = MLP(hidden_dim, hidden_dim, 4, 3)
        self._init_branches(class_branch, box_branch)
        self.class_branches = nn.ModuleList(copy.deepcopy(class_branch) for _ in range(num_layers))
        self.box_branches = nn.ModuleList(copy.deepcopy(box_branch) for _ in range(num_layers))
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.box_query_pos = BoxQueryPosition(hidden_dim) if query_pos_from_boxes else None

    @staticmethod
    def _init_branches(class_branch: nn.Linear, box_branch: MLP) -> None:
        # Deformable DETR: class prior 0.01; the box branch starts as "keep the reference point,
        # small boxes" (zero last layer, w/h logits -2).
        prior_prob = 0.01
        nn.init.constant_(class_branch.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(box_branch.layers[-1].weight)
        nn.init.zeros_(box_branch.layers[-1].bias)
        nn.init.constant_(box_branch.layers[-1].bias[2:], -2.0)

    def forward(self, memory: MultiLevelTokens) -> Dict[str, object]:
        """
        Args:
            memory: the encoder's tokens (B x S x C) and layout.
        Returns:
            dict with
            "hidden": B x N x C, the last layer's queries (the thing queries of the mask decoder);
            "query_pos": B x N x C, their positional part for the mask decoder (the learned one, or
            that of their last boxes with ``query_pos_from_boxes``);
            "pred_logits": list over layers of B x N x num_classes class logits;
            "pred_boxes": list over layers of B x N x 4 boxes (cx, cy, w, h) in [0, 1] of the
            (unpadded) image.
        """
        batch = memory.tokens.shape[0]
        query_pos, query = self.query_embedding.weight.split(self.hidden_dim, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        query = query[None].expand(batch, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # B x N x 2
        valid_ratios = memory.valid_ratios  # B x L x 2

        pred_logits: List[Tensor] = []
        pred_boxes: List[Tensor] = []
        for layer, class_branch, box_branch in zip(self.layers, self.class_branches, self.box_branches):
            if reference.shape[-1] == 4:
                reference_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_input = reference[:, :, None] * valid_ratios[:, None]
            query = layer(query, query_pos, reference_input, memory)
            delta = box_branch(query)
            if reference.shape[-1] == 4:
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            pred_logits.append(class_branch(query))
            pred_boxes.append(boxes)
            reference = boxes.detach()
        if self.box_query_pos is not None:
            query_pos = self.box_query_pos(pred_boxes[-1])
        return {"hidden": query, "query_pos": query_pos, "pred_logits": pred_logits, "pred_boxes": pred_boxes}
