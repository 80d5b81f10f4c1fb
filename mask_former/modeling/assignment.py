"""Exact linear assignment (minimum-cost bipartite matching) in PyTorch, batched over images.

:func:`linear_sum_assignment_torch` solves what ``scipy.optimize.linear_sum_assignment`` solves,
on the cost's device and for a whole batch at once: for each image, a matching of
``min(Q, T)`` (query, target) pairs, no query or target used twice, with the smallest total cost.

Algorithm: successive shortest augmenting paths with potentials (the Hungarian method as Jonker
and Volgenant organise it), with the smaller side of each image as the rows:

1. Bidding rounds (their "augmenting row reduction"), all free rows of all images at once: each
   free row bids for its best column; a few rounds of tensor operations settle most rows of a
   random matrix and leave feasible potentials that are tight on the partial matching.
2. Each row still free is then matched by one augmenting path: shortest distances over reduced
   costs from that row to every column, found by relaxing all edges at once until nothing
   changes (as many relaxations as the shortest-path tree is deep, each a tensor operation over
   B x R x C), the path to the nearest free column is flipped and the potentials updated. The
   images of a batch move in lock step (the k-th free row of every image together; an image with
   fewer free rows waits, masked).

Costs and potentials are float64 (float32 on devices without it), so the total is optimal up to
float64 rounding of the costs (exactly optimal for integer costs). Speed: the work is a few
hundred small tensor operations per image, so on the CPU scipy's compiled solver is much faster
for a single small matrix; this one keeps the costs on the GPU and solves a whole batch per call.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["linear_sum_assignment_torch"]

Assignment = Tuple[torch.Tensor, torch.Tensor]

# Bidding rounds before the augmenting paths (each is a few tensor operations on B x R x C).
_BIDDING_ROUNDS = 16


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _min_and_argmin(values: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``values.min(dim)`` (first index on ties). torch's min-with-indices kernel costs ~20 ms per
    call whatever the size on our 2-thread CPU builds; argmin + gather costs microseconds."""
    index = values.argmin(dim, keepdim=True)
    return values.gather(dim, index).squeeze(dim), index.squeeze(dim)


def _check_cost(cost: torch.Tensor, num_targets: torch.Tensor) -> None:
    """Raise ValueError if a valid entry (target index < the image's count) is NaN or infinite."""
    if cost.is_complex() or cost.dtype == torch.bool:
        raise ValueError(f"cost must be a real-valued tensor, got dtype {cost.dtype}")
    valid = torch.arange(cost.shape[2], device=cost.device)[None, None, :] < num_targets[:, None, None]
    bad = ~torch.isfinite(cost) & valid
    if bad.any():
        image, query, target = bad.nonzero()[0].tolist()
        where = f"[{image}, {query}, {target}]" if cost.shape[0] > 1 else f"[{query}, {target}]"
        raise ValueError(
            f"cost must be finite, got {cost[image, query, target].item()} at {where} "
            f"({int(bad.sum())} non-finite entries in all)"
        )


def _num_targets_tensor(
    num_targets: Optional[Union[torch.Tensor, Sequence[int]]], batch: int, max_targets: int, device
) -> torch.Tensor:
    if num_targets is None:
        return torch.full((batch,), max_targets, dtype=torch.long, device=device)
    counts = torch.as_tensor(num_targets, device=device)
    if counts.shape != (batch,) or counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(
            f"num_targets must hold one integer per image ({batch},), got {counts.dtype} of shape "
            f"{tuple(counts.shape)}"
        )
    counts = counts.long()
    if ((counts < 0) | (counts > max_targets)).any():
        raise ValueError(f"num_targets must be in [0, {max_targets}] (the padded T), got {counts.tolist()}")
    return counts


def _bidding_rounds(cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, max_rounds: int):
    """
    A fast partial matching with feasible potentials (the "augmenting row reduction" of Jonker and
    Volgenant, all free rows at once): every free row bids for the column where ``c_ij - v_j`` is
    smallest; the column goes to the bidder whose best beats its second best by the largest gap
    (ties: the lower row), the column's potential drops by that gap (so the column stays a best
    one for the winner and becomes no better for anyone else), and its previous row becomes free.
    A row whose best and second best are equal takes the second when that one is free.

    Invariant: every matched row is matched to a column minimising ``c_ij - v_j``, which makes
    ``u_i = min_j (c_ij - v_j)`` a feasible dual that is tight on the matching.

    Args:
        cost: B x R x C; row_valid: B x R bool; col_valid: B x C bool (valid rows <= valid columns).
        max_rounds: the number of bidding rounds at most (ties can make rows bid in circles).

    Returns:
        v: B x C column potentials; row4col: B x C int64 (matched row, -1 for none);
        col4row: B x R int64 (matched column, -1 for none).
    """
    batch, num_rows, num_cols = cost.shape
    device = cost.device
    v = torch.zeros(batch, num_cols, dtype=cost.dtype, device=device)
    row4col = torch.full((batch, num_cols), -1, dtype=torch.long, device=device)
    col4row = torch.full((batch, num_rows), -1, dtype=torch.long, device=device)
    if num_rows == 0 or num_cols == 0:
        return v, row4col, col4row
    masked_cost = torch.where(col_valid[:, None, :], cost, torch.inf)
    rows = torch.arange(num_rows, device=device).expand(batch, num_rows)
    for _ in range(max_rounds):
        free = row_valid & (col4row < 0)
        if not free.any():
            break
        reduced = masked_cost - v[:, None, :]
        if num_cols >= 2:
            best, best_col = reduced.topk(2, dim=2, largest=False)
            first, second = best.unbind(2)
            first_col, second_col = best_col.unbind(2)
        else:
            first, first_col = reduced[..., 0], torch.zeros_like(rows)
            second, second_col = torch.full_like(first, torch.inf), first_col
        gap = torch.where(torch.isfinite(second), second - first, 0)  # a single valid column: no gap
        take_second = (
            (gap == 0) & torch.isfinite(second)
            & (row4col.gather(1, first_col) >= 0) & (row4col.gather(1, second_col) < 0)
        )
        target = torch.where(take_second, second_col, first_col)
        bid = torch.where(free, gap, -1)
        best_bid = torch.full_like(v, -1).scatter_reduce(1, target, bid, reduce="amax")
        top_bidder = free & (bid == best_bid.gather(1, target))
        first_top = torch.full_like(row4col, num_rows).scatter_reduce(
            1, target, torch.where(top_bidder, rows, num_rows), reduce="amin"
        )
        wins = top_bidder & (first_top.gather(1, target) == rows)
        image, row = wins.nonzero(as_tuple=True)
        col = target[image, row]
        previous = row4col[image, col]
        kicked = previous >= 0
        col4row[image[kicked], previous[kicked]] = -1
        v[image, col] -= gap[image, row]
        row4col[image, col] = row
        col4row[image, row] = col
    return v, row4col, col4row


def _solve_rows_into_cols(cost: torch.Tensor, num_rows: torch.Tensor, num_cols: torch.Tensor) -> torch.Tensor:
    """
    Minimum-cost matching of every valid row to a distinct valid column, for each image.

    Args:
        cost: B x R x C (work dtype); entries outside the valid block are ignored.
        num_rows, num_cols: B int64 valid sizes, num_rows <= num_cols per image.

    Returns:
        B x R int64: the column matched to each row (-1 for rows outside the valid block).
    """
    batch, max_rows, max_cols = cost.shape
    device = cost.device
    row_valid = torch.arange(max_rows, device=device)[None, :] < num_rows[:, None]
    col_valid = torch.arange(max_cols, device=device)[None, :] < num_cols[:, None]
    v, row4col, col4row = _bidding_rounds(cost, row_valid, col_valid, max_rounds=_BIDDING_ROUNDS)
    masked_cost = torch.where(col_valid[:, None, :], cost, torch.inf)
    u = torch.where(row_valid, (masked_cost - v[:, None, :]).amin(2) if max_cols else 0, 0)

    # The rows still free, per image, in increasing order: image b places its k-th one at round k.
    pending = row_valid & (col4row < 0)
    num_pending = pending.sum(1)
    pending_rows = torch.sort((~pending).to(torch.uint8), dim=1, stable=True).indices
    for k in range(int(num_pending.max()) if batch else 0):
        searching = k < num_pending
        start_row = torch.where(searching, pending_rows[:, k], 0)
        _augment(masked_cost, u, v, row4col, col4row, start_row, searching)
    return col4row


def _augment(cost, u, v, row4col, col4row, start_row, searching) -> None:
    """
    One round of the shortest augmenting path method: for each searching image, the shortest
    paths over reduced costs ``c_ij - u_i - v_j`` (>= 0) from ``start_row`` to every column
    (row -> column edges, then column -> its matched row at no cost), found by relaxing all edges
    at once until nothing improves (as many relaxations as the tree is deep, each one tensor
    operation over B x R x C). The path to the nearest free column is then flipped and the
    potentials updated so that every reduced cost stays >= 0 and the new matching is tight.
    Updates ``u``, ``v``, ``row4col`` and ``col4row`` in place.

    Args:
        cost: B x R x C with invalid columns at +inf; u: B x R; v, row4col: B x C;
        col4row: B x R; start_row: B int64 (any row for images not searching); searching: B bool.
    """
    batch, num_rows, num_cols = cost.shape
    device = cost.device
    images = torch.arange(batch, device=device)
    # B x C x R, so that the minimum over rows is over the contiguous last dimension (a minimum
    # with indices over a middle dimension can be 100x slower on the CPU). Rounding can leave a
    # reduced cost a hair below 0: clamp, so no cycle is negative.
    reduced = (cost - u[:, :, None] - v[:, None, :]).transpose(1, 2).clamp(min=0).contiguous()
    matched = col4row >= 0
    is_start = torch.zeros(batch, num_rows, dtype=torch.bool, device=device)
    is_start[images, start_row] = searching
    row_distance = torch.where(is_start, 0.0, torch.inf).to(cost.dtype)
    col_distance = torch.full((batch, num_cols), torch.inf, dtype=cost.dtype, device=device)
    came_from = torch.full((batch, num_cols), -1, dtype=torch.long, device=device)  # row before column
    for _ in range(num_rows + 1):  # a shortest path visits each row once
        through, through_row = _min_and_argmin((row_distance[:, None, :] + reduced), dim=2)
        closer = through < col_distance
        col_distance = torch.where(closer, through, col_distance)
        came_from = torch.where(closer, through_row, came_from)
        via_match = torch.where(matched, col_distance.gather(1, col4row.clamp(min=0)), torch.inf)
        new_row_distance = torch.where(is_start, 0.0, via_match)
        if torch.equal(new_row_distance, row_distance):
            break
        row_distance = new_row_distance

    free_distance = torch.where(row4col < 0, col_distance, torch.inf)
    sink_distance, sink = _min_and_argmin(free_distance, dim=1)
    sink_distance = torch.where(searching, sink_distance, 0)
    u += (sink_distance[:, None] - row_distance).clamp(min=0)
    v -= (sink_distance[:, None] - col_distance).clamp(min=0)

    # flip the matching along the path, from the sink back to the start row
    col = sink
    flipping = searching.clone()
    while flipping.any():
        row = came_from[images, col]
        previous_col = col4row[images, row.clamp(min=0)]
        row4col[images[flipping], col[flipping]] = row[flipping]
        col4row[images[flipping], row[flipping]] = col[flipping]
        flipping &= ~is_start[images, row.clamp(min=0)]
        col = torch.where(flipping, previous_col, col)


def _pairs(col4row: torch.Tensor, rows_are_queries: bool) -> Assignment:
    """(query indices ascending, target indices) from one image's R row -> column table."""
    rows = (col4row >= 0).nonzero().squeeze(1)
    cols = col4row[rows]
    queries, targets = (rows, cols) if rows_are_queries else (cols, rows)
    order = torch.argsort(queries)
    return queries[order], targets[order]


def linear_sum_assignment_torch(
    cost: torch.Tensor, num_targets: Optional[Union[torch.Tensor, Sequence[int]]] = None
) -> Union[Assignment, List[Assignment]]:
    """
    Minimum-cost assignment of queries to targets, exact, batched, on the cost's device.

    Args:
        cost: Q x T cost matrix of one image, or B x Q x T costs of B images padded to the same
            T (the padded entries are ignored and may hold anything). Any real dtype; finite.
        num_targets: for a batch, the number of valid targets of each image (B ints, each in
            [0, T]); default T for every image. Not allowed for a single Q x T matrix.

    Returns:
        For a Q x T matrix, ``(query_idx, target_idx)``: two int64 tensors of min(Q, T) entries,
        query_idx in increasing order, minimising ``cost[query_idx, target_idx].sum()`` (what
        ``scipy.optimize.linear_sum_assignment`` returns). For a batch, a list of B such pairs
        (image b has min(Q, num_targets[b]) entries).

    Raises:
        ValueError: a valid cost entry is NaN or infinite, or the arguments have the wrong shape.
    """
    single = cost.dim() == 2
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost must be Q x T or B x Q x T, got shape {tuple(cost.shape)}")
    if single and num_targets is not None:
        raise ValueError("num_targets is for a padded batch (B x Q x T cost); a Q x T matrix has T targets")
    batched = cost[None] if single else cost
    batch, num_queries, max_targets = batched.shape
    counts = _num_targets_tensor(num_targets, batch, max_targets, batched.device)
    _check_cost(batched, counts)

    work = batched.to(_work_dtype(batched.device))
    valid_target = torch.arange(max_targets, device=work.device)[None, None, :] < counts[:, None, None]
    work = torch.where(valid_target, work, 0)  # padding may hold NaN or inf
    results: List[Optional[Assignment]] = [None] * batch
    # Match the smaller side into the larger: targets into queries where T_b <= Q, else queries
    # into targets.
    few_targets = (counts <= num_queries).tolist()
    for rows_are_queries in (False, True):
        group = [b for b in range(batch) if few_targets[b] != rows_are_queries]
        if not group:
            continue
        index = torch.tensor(group, device=work.device)
        group_counts = counts[index]
        queries = torch.full_like(group_counts, num_queries)
        if rows_are_queries:
            col4row = _solve_rows_into_cols(work[index], queries, group_counts)
        else:
            col4row = _solve_rows_into_cols(work[index].transpose(1, 2).contiguous(), group_counts, queries)
        for position, b in enumerate(group):
            results[b] = _pairs(col4row[position], rows_are_queries)
    return results[0] if single else results
