"""A UCE-style baseline for the concept-world erasure evaluation: a measurement yardstick, not a node.

Unified Concept Editing (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024) edits every
cross-attention key and value matrix W in one closed form, written here from the paper's description. Each erased
concept is one text vector c_i, whose output is sent to its anchor's, v*_i = W c*_i; each preserved concept is one
vector p_j, whose output is held at W p_j:

    min_W'  sum_i |W' c_i - W c*_i|^2 + sum_j |W' p_j - W p_j|^2 + lam |W' - W|^2_F

    W' = (sum_i W c*_i c_i^T + sum_j W p_j p_j^T + lam W)(sum_i c_i c_i^T + sum_j p_j p_j^T + lam I)^-1  =  W T,

    T = (sum_i c*_i c_i^T + P + lam I)(sum_i c_i c_i^T + P + lam I)^-1,   P = sum_j p_j p_j^T.

Like MACE's refinement, T does not depend on the layer, so one d x d solve serves all K/V matrices, and with nothing
erased T = I exactly. Unlike MACE, each concept is a single vector (the text encoder's end-token output for the bare
name), with no prompt templates, no per-token pairing, no generic prior and no trained LoRAs: that difference is what
the comparison measures.
"""

import logging
import time
from collections.abc import Sequence

import torch

from ..mace_core.closed_form import ACC, Moments, WeightDeltas, spd_solve_right, transform_deltas
from ..mace_core.concepts import Concept, parse_concepts, parse_preserve
from ..mace_core.text import check_concepts

log = logging.getLogger(__name__)

# UCE's ridge lam. The paper's closed form is written without one (its sums are assumed invertible, which takes at
# least d independent vectors); with a handful of concepts in a 64-wide (or 768-wide) text space they are not, and the
# ridge both makes the system solvable and keeps W' = W wherever the edit says nothing. 0.1 is the default of UCE's
# public release (its edit function's ridge; the paper states the form, not a number); it was fixed before any
# measurement here and is not tuned against the world. It is absolute, as in UCE: SD's CLIP and the world's text
# encoder both end in a LayerNorm, so a feature's per-dimension second moment is of order one in both (|c|^2 ~ d,
# the eigenvalue of c c^T; 0.999 d measured on the world), and 0.1 weighs the same against the data in either. Every
# erased and preserved vector has weight 1, as in the paper.
LAM = 0.1


def end_features(enc, words: Sequence[str]) -> torch.Tensor:
    """(n, d) float64 on the CPU: each bare word's text feature at its prompt's end token (the first end id after the
    start token), UCE's one vector per concept."""
    if not words:
        return torch.zeros(0, enc.dim, dtype=ACC)
    ids, feats = enc.encode(list(words))
    pos = [row.index(enc.end_id, 1) for row in ids]
    rows = feats[torch.arange(len(words)), torch.tensor(pos)]
    return rows.detach().to("cpu").to(ACC)


def uce_transform(c: torch.Tensor, c_star: torch.Tensor, p: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    """T (d x d, float64, CPU) with W' = W T for every K/V matrix W, from erased vectors c (n, d), their anchors'
    vectors c_star (n, d) and preserved vectors p (m, d) (see the module docstring)."""
    d = c.shape[-1]
    edit = Moments(d, "cpu")  # cross = sum c*_i c_i^T, gram = sum c_i c_i^T
    if c.numel():
        edit.add(c, c_star)
    preserved = Moments(d, "cpu")  # gram = P
    if p.numel():
        preserved.add(p)
    reg = preserved.gram + lam * torch.eye(d, dtype=ACC)
    # the shared Cholesky solve (least squares if lam = 0 leaves it singular); never an explicit inverse
    return spd_solve_right(edit.cross + reg, edit.gram + reg)


def _concepts(concepts, concept_type: str) -> list[Concept]:
    if isinstance(concepts, str):
        # blank erases nothing (the world has no explicit type, whose blank list means the paper's four words)
        return parse_concepts(concepts, concept_type) if concepts.strip() else []
    return list(concepts)


def _preserved_names(preserve) -> list[str]:
    items = parse_preserve(preserve) if isinstance(preserve, str) else list(preserve)
    return [k if isinstance(k, str) else k.name for k in items]  # names, or Preserved(name, type)


def uce_vectors(clip, concepts, preserve=(), concept_type: str = "object"):
    """(c, c_star, p): the erased words' end-token features (name and nicknames, each its own vector), their anchors'
    at the same place of the anchor's prompt, and the preserved names'. concepts: the nodes' concept box text
    (`name | type`, `name => anchor`) or mace_core Concepts; preserve: the nodes' preserve text or names."""
    from ..nodes import host

    enc = host.clip_encoder(clip)
    items = _concepts(concepts, concept_type)
    check_concepts(items, enc)
    words = [(w, c.anchor) for c in items for w in c.words()]
    c = end_features(enc, [w for w, _ in words])
    anchors = list(dict.fromkeys(a for _, a in words))
    a_feats = end_features(enc, anchors)
    c_star = a_feats[[anchors.index(a) for _, a in words]] if words else c
    p = end_features(enc, _preserved_names(preserve))
    return c, c_star, p


def uce_deltas(model, clip, concepts, preserve=(), lam: float = LAM, concept_type: str = "object") -> WeightDeltas:
    """W T - W in float32 on the CPU for every cross-attention to_k/to_v weight the pack's refine edits, W being the
    weights this MODEL computes with (its patches included): the same kind of result refine gives."""
    from ..nodes import host

    keys = host.cross_attention_keys(model, clip)
    c, c_star, p = uce_vectors(clip, concepts, preserve, concept_type)
    t = uce_transform(c, c_star, p, lam)
    # one matrix at a time, as refinement applies its transform
    return transform_deltas(host.CurrentWeights(model, keys, "cpu"), t)


def uce_model(model, clip, concepts, preserve=(), lam: float = LAM, concept_type: str = "object"):
    """A patched clone of MODEL carrying UCE's closed-form K/V edit; the model that comes in is not changed."""
    from ..nodes import host

    t0 = time.perf_counter()
    deltas = uce_deltas(model, clip, concepts, preserve, lam, concept_type)
    out = host.with_deltas(model, deltas)
    log.info("UCE baseline: %d matrices edited (lam %g) in %.2fs", len(deltas), lam, time.perf_counter() - t0)
    return out
