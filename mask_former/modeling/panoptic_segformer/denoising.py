"""Denoising training of the thing queries (not in the Panoptic SegFormer publication;
``MODEL.PANOPTIC_SEGFORMER.DN_GROUPS`` > 0): DN-DETR's extra queries, carried to the masks as
Mask DINO does.

In training, every ground-truth thing enters the location decoder G more times as a query whose
content is an embedding of its (possibly flipped) class and whose reference is its box with noise;
these queries pass the same layers and heads as the matched ones and are trained to give back
the thing's class and box (no matching: each knows its target), and then, through the thing mask
decoder, its mask. Each group attends only to itself, and the matched queries never see them, so
inference (which has no denoising queries) is unchanged. The direct targets speed up training,
which on a small budget is what the bipartite matching lacks.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["DenoisingQueries", "DenoisingBatch"]


@dataclass
class DenoisingBatch:
    """G groups of the padded ground-truth things of each image: L = G x T queries per image, with T
    the largest number of things in an image of the batch; query g T + j is thing j of group g."""

    content: Tensor
    """B x L x C: embeddings of the noised classes."""
    reference: Tensor
    """B x L x 4: the noised boxes (cx, cy, w, h), the first references."""
    labels: Tensor
    """B x L int64: the true thing classes (``num_classes`` on padding)."""
    boxes: Tensor
    """B x L x 4: the true boxes."""
    valid: Tensor
    """B x L bool: False on padding."""
    self_attn_mask: Tensor
    """(B x heads) x L x L bool, True where a query must not attend: other groups, and padding
    (except itself, so that no row is empty)."""
    groups: int


class DenoisingQueries(nn.Module):
    """Builds the denoising queries of a batch (see the module docstring)."""

    def __init__(self, hidden_dim: int, num_classes: int, nheads: int, groups: int, box_noise: float,
                 label_noise: float):
        """
        Args:
            hidden_dim: C; num_classes: thing classes; nheads: of the location decoder's self-attention.
            groups: G (>= 1).
            box_noise: each box's centre moves by up to ``box_noise`` x half its size, its width and
                height scale by a factor in [1 - box_noise, 1 + box_noise] (DN-DETR's noise).
            label_noise: probability that a thing's class is replaced by a random one.
        """
        super().__init__()
        for key, value, low, high in (("DN_GROUPS", groups, 1, float("inf")), ("DN_BOX_NOISE", box_noise, 0, 1),
                                      ("DN_LABEL_NOISE", label_noise, 0, 1)):
            if not low <= value <= high:
                raise ValueError(f"MODEL.PANOPTIC_SEGFORMER.{key}={value!r}: expected a value in [{low}, {high}]")
        self.num_classes, self.nheads = num_classes, nheads
        self.groups, self.box_noise, self.label_noise = groups, box_noise, label_noise
        # the extra row is the content of padding queries
        self.label_embedding = nn.Embedding(num_classes + 1, hidden_dim)

    def forward(self, targets: Sequence[Dict[str, Tensor]]) -> Optional[DenoisingBatch]:
        """
        Args:
            targets: per image "labels" (T_i,) thing classes and "boxes" T_i x 4 (cx, cy, w, h).
        Returns:
            the batch's denoising queries, or None when no image has a thing.
        """
        device = self.label_embedding.weight.device
        counts = [len(t["labels"]) for t in targets]
        most = max(counts, default=0)
        if most == 0:
            return None
        batch = len(targets)
        labels = torch.full((batch, most), self.num_classes, dtype=torch.int64, device=device)
        boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device).repeat(batch, most, 1)
        valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
        for i, (target, count) in enumerate(zip(targets, counts)):
            labels[i, :count] = target["labels"]
            boxes[i, :count] = target["boxes"].float()
            valid[i, :count] = True
        groups = self.groups
        labels, boxes, valid = labels.repeat(1, groups), boxes.repeat(1, groups, 1), valid.repeat(1, groups)

        noised_labels = labels.clone()
        flip = (torch.rand(labels.shape, device=device) < self.label_noise) & valid
        noised_labels[flip] = torch.randint(0, self.num_classes, (int(flip.sum()),), device=device)
        scale = torch.cat([boxes[..., 2:] / 2, boxes[..., 2:]], dim=-1)
        noised = boxes + (torch.rand_like(boxes) * 2 - 1) * scale * self.box_noise
        reference = torch.cat([noised[..., :2].clamp(0, 1), noised[..., 2:].clamp(1e-3, 1)], dim=-1)

        length = labels.shape[1]
        group = torch.arange(length, device=device) // most
        itself = torch.eye(length, dtype=torch.bool, device=device)
        blocked = (group[:, None] != group[None, :])[None] | (~valid[:, None, :] & ~itself[None])
        return DenoisingBatch(
            content=self.label_embedding(noised_labels), reference=reference, labels=labels, boxes=boxes,
            valid=valid, self_attn_mask=blocked.repeat_interleave(self.nheads, dim=0), groups=groups,
        )
