"""Padding-free batches: sequences packed end to end into a few rows, each sequence's positions restarting
at 0 and a block mask keeping it from seeing its neighbours, so no compute goes to padding.

A DPO pair packs as one unit: the chosen row, then only the rejected row's tokens after the prompt prefix
the two share; the rejected tokens see that prefix (at the positions they had in their own row) but not
the chosen reply. The shared prompt is run once instead of twice, and every log-prob is the one the
padded batch gives, up to float rounding.

Worked example, one row: a pair (chosen [1, 2, 3, 4], labels [-, -, 3, 4]; rejected [1, 2, 5], labels
[-, -, 5]; - is IGNORE_INDEX) sharing the prompt [1, 2], and a third sequence [7, 8], labels [-, 8]:

    input_ids    [1, 2, 3, 4, 5, 7, 8]       attention (row i sees column j):
    position_ids [0, 1, 2, 3, 2, 0, 1]         1 . . . . . .
    group        [0, 0, 0, 0, 0, 1, 1]         1 1 . . . . .
    branch       [0, 0, 1, 1, 2, 1, 1]         1 1 1 . . . .
                                               1 1 1 1 . . .
    logit_positions [1, 2, 1, 5]               1 1 . . 1 . .   (5 sees the prompt, not 3 and 4)
    targets         [3, 4, 5, 8]               . . . . . 1 .
    target_sequence [0, 0, 1, 2]               . . . . . 1 1

Token 5 is predicted by the logits at position 1 (the prompt's last token), as in the rejected's own row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignment.losses.logprobs import IGNORE_INDEX, selected_logps

Row = dict[str, list[int]]  # {"input_ids", "labels"}, as batching.encode makes them


def shared_prompt(first: Row, second: Row) -> int:
    """How many leading tokens two rows share inside both prompts (labels IGNORE_INDEX in both): a
    shared response token would need two different predictions, so sharing stops at the prompt."""
    n = 0
    for a, b, la, lb in zip(first["input_ids"], second["input_ids"], first["labels"], second["labels"]):
        if a != b or la != IGNORE_INDEX or lb != IGNORE_INDEX:
            break
        n += 1
    return n


def _units(rows: Sequence[Row], pairs: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Rows grouped into units of (row index, shared prefix length): a pair (i, j) is one unit in which
    row j reuses row i's prompt prefix; any other row is a unit of its own."""
    second = {j: i for i, j in pairs}
    units = {i: [(i, 0)] for i in range(len(rows)) if i not in second}
    for j, i in second.items():
        units[i].append((j, shared_prompt(rows[i], rows[j])))
    return list(units.values())


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Unit indices per row, longest first into the first row with room (a unit longer than
    `capacity` gets a row of its own)."""
    bins, room = [], []
    for unit in sorted(range(len(lengths)), key=lambda u: -lengths[u]):
        slot = next((b for b, free in enumerate(room) if lengths[unit] <= free), None)
        if slot is None:
            bins.append([]), room.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(unit)
        room[slot] -= lengths[unit]
    return bins


def pack(rows: Sequence[Row], capacity: int, pairs: Sequence[tuple[int, int]] = ()) -> dict[str, Tensor]:
    """N rows as R padding-free rows of at most `capacity` tokens (one unit may exceed it), W = the
    longest packed row, K = the most response tokens in one packed row.

    Args:
        rows: N sequences {"input_ids", "labels"}, labels IGNORE_INDEX on the prompt.
        capacity: tokens per packed row; rows are filled first-fit, longest unit first.
        pairs: (i, j) row indices whose common prompt prefix is run once (row j continues row i's).
    Returns:
        input_ids, position_ids, group, branch: (R, W); group -1 and branch 0 on padding.
            See `attention_mask` for group and branch.
        attention_mask: (R, W) 1 on packed tokens, 0 on the padding at row ends.
        logit_positions, targets, target_sequence, target_mask: (R, K): for each response token
            counted in a log-prob, the position whose logits predict it, the token, its sequence
            (0..N-1) and 1 (0 on filler slots).
        sequence_lengths: (N,) tokens of each original row (its length in a padded batch).
    """
    units = _units(rows, pairs)
    lengths = [sum(len(rows[i]["input_ids"]) - shared for i, shared in unit) for unit in units]
    layout = _first_fit(lengths, capacity)
    width = max(sum(lengths[u] for u in bin_) for bin_ in layout)
    zeros = ("input_ids", "position_ids", "branch", "attention_mask")
    tokens = {key: torch.zeros(len(layout), width, dtype=torch.long) for key in zeros}
    tokens["group"] = torch.full((len(layout), width), -1)
    targets = [[] for _ in layout]  # (logit position, token, sequence) per packed row
    for r, bin_ in enumerate(layout):
        offset = 0
        for u in bin_:
            offset = _place(rows, units[u], u, tokens, targets[r], r, offset)
    k = max(1, max(len(t) for t in targets))
    slots = torch.zeros(4, len(layout), k, dtype=torch.long)  # position, token, sequence, mask
    for r, row_targets in enumerate(targets):
        if row_targets:
            slots[:3, r, : len(row_targets)] = torch.tensor(row_targets).T
            slots[3, r, : len(row_targets)] = 1
    names = ("logit_positions", "targets", "target_sequence", "target_mask")
    lengths = torch.tensor([len(row["input_ids"]) for row in rows])
    return tokens | dict(zip(names, slots)) | {"sequence_lengths": lengths}


def _place(rows, unit, group: int, tokens: dict, targets: list, r: int, offset: int) -> int:
    """Write one unit into packed row r from `offset`; returns the offset after it."""
    start = offset
    shared = unit[1][1] if len(unit) > 1 else 0
    for branch, (i, skip) in enumerate(unit, start=1):
        ids, labels = rows[i]["input_ids"], rows[i]["labels"]
        # where each of this row's tokens sits: the shared prefix in the first row's span, then its own
        where = [start + t if t < skip else offset + t - skip for t in range(len(ids))]
        n = len(ids) - skip
        span = slice(offset, offset + n)
        tokens["input_ids"][r, span] = torch.tensor(ids[skip:], dtype=torch.long)
        tokens["position_ids"][r, span] = torch.arange(skip, len(ids))
        tokens["group"][r, span] = group
        tokens["branch"][r, span] = branch
        tokens["attention_mask"][r, span] = 1
        targets += [(where[t - 1], labels[t], i) for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
        offset += n
    tokens["branch"][r, start : start + shared] = 0  # the prefix every row of the unit sees
    return offset


def attention_mask(group: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Which packed token each token attends to: an earlier (or the same) token of its unit, on the shared
    prefix (branch 0) or on its own branch. Padding (group -1) sees only padding, never a real token.

    Args:
        group, branch: (R, W) from `pack`.
    Returns:
        (R, 1, W, W) bool, True where query i may attend to key j (sdpa's convention).
    """
    width = group.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=group.device).tril()
    same_unit = group[:, :, None] == group[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return (causal & same_unit & visible_branch).unsqueeze(1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each packed target token.

    Args:
        logits: (R, K, V) the logits at `logit_positions` (the model's `logits_to_keep`).
        targets, target_mask: (R, K) from `pack`.
    Returns:
        (R, K) log p(target | its prefix), 0 on filler slots.
    """
    return selected_logps(logits, targets) * target_mask


def per_sequence(
    token_logps: torch.Tensor, target_sequence: torch.Tensor, target_mask: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed token log-probs back as one row per sequence, the layout `losses.token_logps` gives a padded
    batch: `.sum(-1)` is then each sequence's summed response log-prob (losses.sequence_logps).

    Args:
        token_logps, target_sequence, target_mask: (R, K).
        num_sequences: N, the rows that were packed.
    Returns:
        logps: (N, R * K) each sequence's token log-probs, 0 elsewhere.
        mask: (N, R * K) float, 1 on the sequence's response tokens.
    """
    sequences = torch.arange(num_sequences, device=token_logps.device).unsqueeze(-1)
    mask = (target_sequence.flatten() == sequences) & target_mask.flatten().bool()
    return token_logps.flatten() * mask, mask.float()
