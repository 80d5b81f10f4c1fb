"""Panoptic SegFormer's location decoder: Deformable DETR's decoder with iterative box refinement
over the thing queries. Each layer refines every query's reference box; per layer, a class branch
(sigmoid scores of the thing classes) and a box branch (normalized cx, cy, w, h) predict
detections for the detection loss."""
import copy
import math
from typing import Dict, List, Optional, Sequence

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
                memory: MultiLevelTokens, self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: B x Q x C; query_pos: B x Q x C.
            reference_points: B x Q x L x 2 (points) or x 4 (boxes), normalized to each level.
            memory: the encoder's tokens.
            self_attn_mask: optional (B x heads) x Q x Q bool, True where a query must not attend.
        Returns:
            B x Q x C.
        """
        q = k = query + query_pos
        attended = self.self_attn(q, k, query, attn_mask=self_attn_mask, need_weights=False)[0]
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
    (detached before the next layer, as in Deformable DETR). With ``proposals``,
    ``query_embedding`` (N x C) holds the contents only (see ``proposals`` below).
    """

    def __init__(self, *, num_queries: int, hidden_dim: int, num_layers: int, num_classes: int,
                 nheads: int, dim_feedforward: int, dropout: float, num_levels: int, n_points: int,
                 query_pos_from_boxes: bool = False, proposals: Optional[nn.Module] = None,
                 denoising: Optional[nn.Module] = None):
        """
        Args:
            num_queries: thing queries.
            hidden_dim: C.
            num_layers: decoder layers (>= 1).
            num_classes: thing classes (sigmoid scores, no "no object" class).
            nheads, dim_feedforward, dropout, num_levels, n_points: of each layer.
            query_pos_from_boxes: the "query_pos" output (the mask decoder's) is
                :class:`BoxQueryPosition` of the last boxes instead of the learned positional part.
            proposals: None (published): the first references are points predicted from the
                learned positional parts. Or an :class:`~.query_selection.EncoderProposals`: the
                first references are the boxes it selects among the encoder's tokens, and each
                layer's positional part is an embedding of its reference boxes
                (``reference_query_pos``); the content parts stay learned.
            denoising: None (published), or a :class:`~.denoising.DenoisingQueries` whose queries
                pass the layers in training too (their positional parts from their reference boxes).
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS must be >= 1, got {num_layers}")
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        # with proposals, the positional parts come from the reference boxes: content only
        self.query_embedding = nn.Embedding(num_queries, (1 if proposals is not None else 2) * hidden_dim)
        self.reference_points = nn.Linear(hidden_dim, 2) if proposals is None else None
        layer = LocationDecoderLayer(hidden_dim, nheads, dim_feedforward, dropout, num_levels, n_points)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        class_branch = nn.Linear(hidden_dim, num_classes)
        box_branch = MLP(hidden_dim, hidden_dim, 4, 3)
        self.init_branches(class_branch, box_branch)
        self.class_branches = nn.ModuleList(copy.deepcopy(class_branch) for _ in range(num_layers))
        self.box_branches = nn.ModuleList(copy.deepcopy(box_branch) for _ in range(num_layers))
        if proposals is None:
            # Deformable DETR (with box refinement): only the first layer, which turns points into
            # boxes, starts with small boxes (w/h logits -2); the later ones start by keeping their
            # reference boxes, and so do all layers when the references are proposals' boxes.
            nn.init.constant_(self.box_branches[0].layers[-1].bias[2:], -2.0)
        if self.reference_points is not None:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        self.box_query_pos = BoxQueryPosition(hidden_dim) if query_pos_from_boxes else None
        self.proposals = proposals
        self.denoising = denoising
        uses_reference_pos = proposals is not None or denoising is not None
        self.reference_query_pos = BoxQueryPosition(hidden_dim) if uses_reference_pos else None

    @staticmethod
    def init_branches(class_branch: nn.Linear, box_branch: MLP) -> None:
        # Deformable DETR: class prior 0.01; the box branch starts as "keep the reference" (zero
        # last layer)
        prior_prob = 0.01
        nn.init.constant_(class_branch.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(box_branch.layers[-1].weight)
        nn.init.zeros_(box_branch.layers[-1].bias)

    def forward(self, memory: MultiLevelTokens,
                targets: Optional[Sequence[Dict[str, Tensor]]] = None) -> Dict[str, object]:
        """
        Args:
            memory: the encoder's tokens (B x S x C) and layout.
            targets: in training with ``denoising``, the ground-truth things ("labels", "boxes")
                of each image, from which the denoising queries are made.
        Returns:
            dict with
            "hidden": B x N x C, the last layer's queries (the thing queries of the mask decoder);
            "query_pos": B x N x C, their positional part for the mask decoder (the learned one, or
            that of their last boxes with ``query_pos_from_boxes``);
            "pred_logits": list over layers of B x N x num_classes class logits;
            "pred_boxes": list over layers of B x N x 4 boxes (cx, cy, w, h) in [0, 1] of the
            (unpadded) image;
            "encoder" (with ``proposals`` only): {"pred_logits", "pred_boxes"} of the selected
            proposals, B x N x num_classes and B x N x 4;
            "denoising" (in training with ``denoising`` and at least one thing): the same five
            entries for the B x L denoising queries and "batch", their :class:`DenoisingBatch`.
        """
        batch = memory.tokens.shape[0]
        outputs: Dict[str, object] = {}
        if self.proposals is None:
            query_pos, query = self.query_embedding.weight.split(self.hidden_dim, dim=1)
            query_pos = query_pos[None].expand(batch, -1, -1)
            query = query[None].expand(batch, -1, -1)
            reference = self.reference_points(query_pos).sigmoid()  # B x N x 2
        else:
            query_pos = None  # from each layer's reference boxes
            query = self.query_embedding.weight[None].expand(batch, -1, -1)
            enc_logits, enc_boxes = self.proposals(memory)
            outputs["encoder"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
            reference = enc_boxes.detach()  # B x N x 4
        outputs.update(self._decode(query, query_pos, reference, memory))
        if self.training and self.denoising is not None and targets is not None:
            dn = self.denoising(targets)
            if dn is not None:
                outputs["denoising"] = self._decode(dn.content, None, dn.reference, memory, dn.self_attn_mask)
                outputs["denoising"]["batch"] = dn
        return outputs

    def _decode(self, query: Tensor, query_pos: Optional[Tensor], reference: Tensor, memory: MultiLevelTokens,
                self_attn_mask: Optional[Tensor] = None) -> Dict[str, object]:
        """The layers with iterative box refinement.

        Args:
            query: B x Q x C contents; query_pos: B x Q x C positional parts, or None for
                ``reference_query_pos`` of each layer's reference boxes.
            reference: B x Q x 2 points or B x Q x 4 boxes, normalized to the unpadded image.
            self_attn_mask: optional (B x heads) x Q x Q bool, True where a query must not attend.
        Returns:
            "hidden", "query_pos", "pred_logits", "pred_boxes" (see ``forward``).
        """
        valid_ratios = memory.valid_ratios  # B x L x 2
        pred_logits: List[Tensor] = []
        pred_boxes: List[Tensor] = []
        for layer, class_branch, box_branch in zip(self.layers, self.class_branches, self.box_branches):
            if reference.shape[-1] == 4:
                reference_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
                layer_pos = self.reference_query_pos(reference) if query_pos is None else query_pos
            else:
                reference_input = reference[:, :, None] * valid_ratios[:, None]
                layer_pos = query_pos
            query = layer(query, layer_pos, reference_input, memory, self_attn_mask)
            delta = box_branch(query)
            if reference.shape[-1] == 4:
                boxes = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                boxes = torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
            pred_logits.append(class_branch(query))
            pred_boxes.append(boxes)
            reference = boxes.detach()
        if self.box_query_pos is not None:
            layer_pos = self.box_query_pos(pred_boxes[-1])
        return {"hidden": query, "query_pos": layer_pos, "pred_logits": pred_logits, "pred_boxes": pred_boxes}
