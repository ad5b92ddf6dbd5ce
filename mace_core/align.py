"""Which token of a concept prompt pairs with which token of the same prompt with the anchor in its place.

Both sequences are full context windows (start token, words, end token, padding). The common prefix and the common
suffix of the words pair one to one; the differing middle (concept vs anchor words) is left out; the end token and the
padding after it pair position by position, because they carry residual concept information the edit must move.
"""

import torch


def _end(ids: list[int], end_id: int) -> int:
    try:
        return ids.index(end_id, 1)
    except ValueError:
        return len(ids)


def align_pairs(ids_old: list[int], ids_new: list[int], end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns index tensors (i_old, i_new) of equal length."""
    n_old, n_new = _end(ids_old, end_id), _end(ids_new, end_id)
    p = 0
    while p < min(n_old, n_new) and ids_old[p] == ids_new[p]:
        p += 1
    s = 0
    while s < min(n_old, n_new) - p and ids_old[n_old - 1 - s] == ids_new[n_new - 1 - s]:
        s += 1
    old = list(range(p)) + list(range(n_old - s, n_old))
    new = list(range(p)) + list(range(n_new - s, n_new))
    tail = min(len(ids_old) - n_old, len(ids_new) - n_new)
    old += range(n_old, n_old + tail)
    new += range(n_new, n_new + tail)
    return torch.tensor(old, dtype=torch.long), torch.tensor(new, dtype=torch.long)


def concept_positions(ids_concept: list[int], ids_anchor: list[int], end_id: int) -> list[int]:
    """Positions of the concept's own words in its prompt (the differing middle)."""
    i_old, _ = align_pairs(ids_concept, ids_anchor, end_id)
    paired = set(i_old.tolist())
    n = _end(ids_concept, end_id)
    return [i for i in range(1, n) if i not in paired]
