"""Pooled-vector editing: SDXL's second road for the text into the UNet.

SDXL adds a pooled text vector to the timestep embedding through its label embedding: y = [pooled | size embeddings]
goes into a first linear layer, W y = W_p pooled + W_s sizes. Cross-attention refinement leaves that road open, so an
erased concept still steers every block through its pooled vector. The same closed form closes it: with the concept
prompts' pooled vectors x, the anchor prompts' y, and generic / preserved prompts' pooled vectors p held,

    min_{W_p'}  sum |W_p' x - W_p y|^2 + s sum |W_p' p - W_p p|^2 + lam |W_p' - W_p|^2   ->   W_p' = W_p T

with T from closed_form.refine_transform: one solve (pooled width squared), applied to the pooled columns only.
"""

from typing import Callable

import torch

from .closed_form import Moments, apply_transform, preserve_scale, refine_transform
from .concepts import TEMPLATES, Concept

# list of prompts -> (n, pooled width) pooled vectors, exactly as the UNet receives them
PooledEncoder = Callable[[list[str]], torch.Tensor]


def pooled_moments(concepts: list[Concept], encode: PooledEncoder) -> Moments:
    """Sums over (concept prompt, the same prompt with the anchor) pooled-vector pairs; one pair per template."""
    m = None
    anchors: dict[tuple[str, str], torch.Tensor] = {}
    for c in concepts:
        key = (c.anchor, c.concept_type)
        if key not in anchors:  # an anchor's prompts are shared by every concept mapped onto it
            anchors[key] = encode(c.prompts(anchor=True))
        old = encode(c.prompts())
        if m is None:
            m = Moments(old.shape[-1], device=old.device)
        m.add(old, anchors[key])
    return m


def mean_moment(encode: PooledEncoder, prompts: list[str]) -> torch.Tensor | None:
    """Mean p p^T over the prompts' pooled vectors (float64), None for no prompts."""
    if not prompts:
        return None
    p = encode(prompts)
    return Moments(p.shape[-1], device=p.device).add(p).mean_gram()


def preserved_prompts(preserved, concept_types) -> list[str]:
    """The templated prompts of the concepts to preserve, as refinement's preserve_moment builds them (the changed
    types' templates, and a typed preserved concept's own)."""
    out = []
    for k in preserved:
        name, concept_type = (k, None) if isinstance(k, str) else k
        for ctype in dict.fromkeys(list(concept_types) + ([concept_type] if concept_type else [])):
            out += [t.format(name) for t in TEMPLATES[ctype]]
    return out


def pooled_transform(concepts: list[Concept], encode: PooledEncoder, generic: list[str], preserve: list = (),
                     prior_weight: float = 1.0, preserve_weight: float = 1.0, lam: float = 0.01) -> torch.Tensor:
    """T (pooled width squared, float64) with W_p' = W_p T. Weights as in refine: the generic prompts' and the
    preserved concepts' mean moments count relative to the number of concept prompts, lam relative to their mean
    eigenvalue."""
    edit = pooled_moments(concepts, encode)
    total = None
    if prior_weight > 0:
        g = mean_moment(encode, list(generic))
        total = None if g is None else prior_weight * g
    if preserve_weight > 0:
        k = mean_moment(encode, preserved_prompts(list(preserve), [c.concept_type for c in concepts]))
        if k is not None:
            k = preserve_weight * preserve_scale(len(concepts)) * k
            total = k if total is None else total + k
    return refine_transform(edit, total, 1.0, lam)


def pooled_delta(w0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The change to the whole first label-embedding weight (out, pooled + sizes): W_p (T - I) in the pooled columns,
    zero in the size columns (float32, on W's device)."""
    n = t.shape[0]
    if w0.ndim != 2 or w0.shape[1] < n:
        raise ValueError(f"a {tuple(w0.shape)} weight has no {n} pooled columns")
    delta = torch.zeros(w0.shape, dtype=torch.float32, device=w0.device)
    delta[:, :n] = apply_transform(w0[:, :n], t)
    return delta
