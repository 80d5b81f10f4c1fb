"""Thing queries placed by the encoder (not in the Panoptic SegFormer publication;
``MODEL.PANOPTIC_SEGFORMER.THING_QUERY_INIT "encoder"``): Deformable DETR's two-stage proposals.

Every encoder token proposes a box, relative to an anchor of side ``0.05 * 2^level`` at its centre,
and scores the thing classes. The N best proposals, made distinct by class-agnostic non-maximum
suppression (as DDQ-DETR does, so that the queries do not start as duplicates of one salient
object), become the first reference boxes of the N thing queries; the queries' content stays
learned (DINO's "mixed query selection"). The selected proposals get the location decoder's
losses (``loss_enc_*``).
"""
from typing import Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, nms

from ...layers import MultiLevelTokens
from ..transformer_decoder.standard_transformer_decoder import MLP
from .location_decoder import LocationDecoder, inverse_sigmoid

__all__ = ["proposal_anchors", "distinct_top_k", "EncoderProposals"]

ANCHOR_SIDE = 0.05  # of the finest level; doubled per level, as in Deformable DETR


def proposal_anchors(memory: MultiLevelTokens) -> Tuple[Tensor, Tensor]:
    """One anchor box per token: its centre, side ``ANCHOR_SIDE * 2^level``, in coordinates
    normalized to the unpadded image.

    Returns:
        anchors: B x S x 4 (cx, cy, w, h);
        valid: B x S bool, False for padding tokens and anchors not inside (0.01, 0.99).
    """
    device = memory.tokens.device
    anchors = []
    for level, (height, width) in enumerate(memory.shapes):
        ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
        ratio = memory.valid_ratios[:, level].float()  # B x 2 (w, h)
        cx = (xs.flatten()[None] + 0.5) / (width * ratio[:, :1])
        cy = (ys.flatten()[None] + 0.5) / (height * ratio[:, 1:])
        side = torch.full_like(cx, ANCHOR_SIDE * 2.0 ** level)
        anchors.append(torch.stack([cx, cy, side, side], dim=-1))
    anchors = torch.cat(anchors, dim=1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(dim=-1)
    if memory.padding_mask is not None:
        valid &= ~memory.padding_mask
    return anchors, valid


def distinct_top_k(scores: Tensor, boxes: Tensor, k: int, iou_threshold: float) -> Tensor:
    """Per image, the indices of the k best-scoring boxes that survive class-agnostic NMS at
    ``iou_threshold``, in descending score order (ties by index); when fewer than k survive, the
    best suppressed ones follow. Boxes with a score of -inf are never taken.

    Greedy NMS keeps a box or not by the boxes before it only, so NMS of the best ``m`` boxes keeps
    exactly the first boxes that NMS of all keeps: it runs on the best ``4k``, then twice as many
    until k survive (or all were visited), not on every token.

    Args:
        scores: B x S; boxes: B x S x 4 (cx, cy, w, h).
    Returns:
        B x k int64.
    """
    indices = []
    for image_scores, image_boxes in zip(scores, boxes):
        image_scores, order = image_scores.sort(descending=True, stable=True)
        order = order[torch.isfinite(image_scores)]
        if len(order) < k:
            raise ValueError(f"{len(order)} valid encoder tokens for {k} thing queries: "
                             "MODEL.PANOPTIC_SEGFORMER.NUM_THING_QUERIES is larger than the image allows")
        candidates = min(len(order), 4 * k)
        while True:
            visited = order[:candidates]
            # descending ranks as NMS scores: NMS visits the boxes in ``order``, ties included
            ranks = torch.arange(candidates, 0, -1, device=order.device, dtype=torch.float32)
            kept = visited[nms(box_convert(image_boxes[visited].float(), "cxcywh", "xyxy"), ranks, iou_threshold)]
            if len(kept) >= k or candidates == len(order):
                break
            candidates = min(len(order), 2 * candidates)
        if len(kept) < k:
            suppressed = order[~torch.isin(order, kept)]
            kept = torch.cat([kept, suppressed[: k - len(kept)]])
        indices.append(kept[:k])
    return torch.stack(indices)


class EncoderProposals(nn.Module):
    """Box and class proposals of every encoder token, and the selection of the best N."""

    def __init__(self, hidden_dim: int, num_classes: int, num_queries: int, nms_threshold: float):
        super().__init__()
        if not 0 < nms_threshold <= 1:
            raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.THING_QUERY_NMS_THRESHOLD={nms_threshold!r}: expected a "
                             "box IoU in (0, 1] (1: no suppression)")
        self.num_queries = num_queries
        self.nms_threshold = nms_threshold
        self.output = nn.Linear(hidden_dim, hidden_dim)
        self.output_norm = nn.LayerNorm(hidden_dim)
        self.class_branch = nn.Linear(hidden_dim, num_classes)
        self.box_branch = MLP(hidden_dim, hidden_dim, 4, 3)
        LocationDecoder.init_branches(self.class_branch, self.box_branch)

    def forward(self, memory: MultiLevelTokens) -> Tuple[Tensor, Tensor]:
        """
        Returns:
            logits: B x N x num_classes, the selected proposals' class logits;
            boxes: B x N x 4 (cx, cy, w, h) in [0, 1], their boxes (not detached: they get the
            ``loss_enc_*`` losses; detach them to use them as references).
        """
        anchors, valid = proposal_anchors(memory)
        output = self.output_norm(self.output(memory.tokens.masked_fill(~valid[..., None], 0.0)))
        logits = self.class_branch(output).masked_fill(~valid[..., None], float("-inf"))
        boxes = (self.box_branch(output) + inverse_sigmoid(anchors).to(output.dtype)).sigmoid()
        selected = distinct_top_k(logits.detach().max(dim=-1).values, boxes.detach(), self.num_queries,
                                  self.nms_threshold)
        logits = torch.gather(logits, 1, selected[..., None].expand(-1, -1, logits.shape[-1]))
        boxes = torch.gather(boxes, 1, selected[..., None].expand(-1, -1, 4))
        return logits, boxes
