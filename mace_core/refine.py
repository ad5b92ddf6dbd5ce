"""Stage 1, closed-form cross-attention refinement: move what the concept's prompts put into keys and values onto
what the anchor's prompts put there, for every cross-attention layer at once.

The solve gives one d x d transform T (refinement_transform); each key/value matrix W becomes W T, so refine hands
back W (T - I) per matrix as WeightDeltas, the kind of result fusion gives too (see closed_form.py).
"""

from collections.abc import Mapping
from typing import Callable

import torch

from .align import align_pairs
from .closed_form import Moments, WeightDeltas, preserve_scale, refine_transform, transform_deltas
from .concepts import TEMPLATES, Concept
from .text import TextEncoder, check_concepts


def edit_moments(concepts: list[Concept], enc: TextEncoder, progress: Callable[[], None] | None = None) -> Moments:
    """Stream each concept's prompt pairs into the d x d sums; nothing per concept is kept.

    Concepts are visited grouped by (anchor, type), so each anchor's prompts are encoded once and only one anchor's
    features are held at a time, however many distinct anchors a long list has (the sums do not depend on order)."""
    m = None
    groups: dict[tuple, list[Concept]] = {}
    for c in concepts:
        # concepts with own prompts or nicknames have their own anchor prompt list (prompts pair by position)
        groups.setdefault((c.anchor, c.concept_type, c.extra, len(c.aliases)), []).append(c)
    for members in groups.values():
        ids_new, e_new = enc.encode(members[0].prompts(anchor=True))
        if m is None:  # accumulate where the encoder computes (a GPU's float64 products, not a copy to the CPU)
            m = Moments(enc.dim, device=e_new.device)
        for c in members:
            _add_concept(m, c, ids_new, e_new, enc, progress)
        del ids_new, e_new
    return m if m is not None else Moments(enc.dim)


def _add_concept(m: Moments, c: Concept, ids_new, e_new, enc: TextEncoder, progress):
    old_prompts = c.prompts()
    ids_old, e_old = enc.encode(old_prompts)
    # all of the concept's aligned pairs in one product (one launch per concept on a GPU, not one per prompt)
    rows_old, rows_new = [], []
    for k in range(len(old_prompts)):
        i_old, i_new = align_pairs(ids_old[k], ids_new[k], enc.end_id)
        rows_old.append(i_old + k * e_old.shape[1])
        rows_new.append(i_new + k * e_new.shape[1])
    m.add(e_old.reshape(-1, e_old.shape[-1])[torch.cat(rows_old).to(e_old.device)],
          e_new.reshape(-1, e_new.shape[-1])[torch.cat(rows_new).to(e_new.device)])
    if progress:
        progress()


def preserve_moment(preserved, concept_types, enc: TextEncoder,
                    progress: Callable[[], None] | None = None) -> torch.Tensor | None:
    """Mean second moment over every token of the templated prompts of the concepts to preserve, in the
    templates of every type in `concept_types` (the types being changed: where the edit acts) and, for a typed one
    (Preserved(name, concept_type)), also in its own type's.

    Refine and Fuse both ask for it, with the same list, and encoding it is most of their time with a long preserve
    list (116 preserved concepts: 11k prompts, 4 s of refine's 4.2 on the mass world). An encoder with a `memo` dict
    (TextEncoder.memo) keeps the result, so the second stage reuses the first's.

    progress, when given, is called once per preserved concept (all at once when the memo has the result): with a long
    list this is most of the stage, so the bar moves and a cancel is seen while it runs."""
    if not preserved:
        return None
    items = [(k, None) if isinstance(k, str) else tuple(k) for k in preserved]
    key = ("preserve_moment", tuple(items), tuple(concept_types))
    memo = getattr(enc, "memo", None)
    if memo is not None and key in memo:
        if progress:
            for _ in items:
                progress()
        return memo[key].clone()
    m = Moments(enc.dim)
    for name, concept_type in items:
        for ctype in dict.fromkeys(list(concept_types) + ([concept_type] if concept_type else [])):
            _, feats = enc.encode([t.format(name) for t in TEMPLATES[ctype]])
            m.add(feats)
        if progress:
            progress()
    out = m.mean_gram()
    if memo is not None:
        while len(memo) >= MEMO_ENTRIES:  # oldest first: a dict keeps insertion order
            memo.pop(next(iter(memo)))
        memo[key] = out.clone()
    return out


# d x d matrices an encoder's memo keeps (2.4 MB each at SD1.5's 768, 8.4 MB at SDXL's 1280 + 768)
MEMO_ENTRIES = 4


def refine(
    concepts: list[Concept],
    enc: TextEncoder,
    current: Mapping[str, torch.Tensor],
    prior: torch.Tensor | None,
    preserve: list = (),
    prior_weight: float = 1.0,
    preserve_weight: float = 1.0,
    lam: float = 0.01,
    progress: Callable[[], None] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> WeightDeltas:
    """Stage 1's change to every key/value matrix of `current` (W' per key, the weights the model computes with; any
    mapping, read one matrix at a time): W' (T - I) in out_dtype, on each weight's device. The transform and its
    weights as in refinement_transform; T is solved once, before any weight is read."""
    t = refinement_transform(concepts, enc, prior, preserve, prior_weight, preserve_weight, lam, progress)
    # T stays float64 where it was solved; apply_transform brings it to W's device only where float64 exists there
    return transform_deltas(current, t, out_dtype)


def refinement_transform(
    concepts: list[Concept],
    enc: TextEncoder,
    prior: torch.Tensor | None,
    preserve: list = (),
    prior_weight: float = 1.0,
    preserve_weight: float = 1.0,
    lam: float = 0.01,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The refinement transform T (d x d, float64), the same for every key/value matrix.

    prior: mean second moment of generic prompts (prior.py); its weight is relative to the concept prompts' own token
    count, as is the weight of the preserved concepts together (names or concepts.Preserved; see preserve_moment),
    which also follows the paper's rule for long lists (closed_form.preserve_scale).
    """
    check_concepts(concepts, enc)
    edit = edit_moments(concepts, enc, progress)
    held = preserve_moment(list(preserve), [c.concept_type for c in concepts], enc, progress)
    total = None
    if prior is not None and prior_weight > 0:
        total = prior_weight * prior.to(torch.float64)
    if held is not None and preserve_weight > 0:
        held = preserve_weight * preserve_scale(len(concepts)) * held
        total = held if total is None else total + held
    return refine_transform(edit, total, 1.0, lam)
