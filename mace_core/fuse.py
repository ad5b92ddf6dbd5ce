"""Stage 3, closed-form fusion: many per-concept LoRAs become one update per cross-attention key/value matrix.

Per matrix, with W' the current (refined) weight and W0 the original one,

    min_W  sum_i sum_{e in prompts of concept i} |W e - (W' + dW_i) e|^2  +  |W p - W0 p|^2 (prior, preserved concepts)
           + lam |W - W'|^2

    W* = [ sum_i (W' + dW_i) G_i + W0 P + lam W' ] (G + P + lam I)^-1,   G = sum_i G_i

Subtracting W' (M - M) gives the delta directly, without cancellation:

    W* - W' = [ sum_i up_i (down_i G_i) + (W0 - W') P ] M^-1,   M = G + P + lam I

M is d x d and shared by every layer, so it is factorised once. Each concept's G_i is computed from its prompts and
dropped once its r x d products down_i G_i are stored. A matrix's LoRA term is U V M^-1 with U = [up_i] (out x R) and
V = [down_i G_i] (R x d), R the LoRAs' total rank on it: while R < out, V is kept and solved as U (V M^-1); from
R >= out on, the (out, d) accumulator U V is the smaller one and is kept instead. Memory per matrix is therefore
min(R, out) x d and never grows past one accumulator (SDXL's 140 float64 accumulators are 2.6 GB; V for 100 rank-1
LoRAs is 0.23 GB). Both are allocated once, before any concept is encoded, so the per-concept temporaries do not
fragment the heap. No full-size dW_i is ever formed; each matrix's delta is made and cast to out_dtype in turn.
"""

import logging
from typing import Callable, Iterable

import torch

from .closed_form import ACC, WeightDeltas, acc_device, preserve_scale, ridge_scale, to_acc
from .concepts import Concept, check_concept_type
from .errors import MaceInputError
from .lora_bundle import ConceptLoRA
from .refine import preserve_moment
from .text import TextEncoder, check_concepts

log = logging.getLogger("MACE")
PRESERVATION_TARGETS = ("original", "input")


class SpdSolver:
    """x -> x @ m^-1 for a symmetric positive (semi-)definite m, factorised once and applied to many right-hand sides.

    (closed_form.spd_solve_right factorises on every call; fusion solves for every layer with the same m.)
    """

    def __init__(self, m: torch.Tensor):
        m = 0.5 * (m + m.T)
        chol, info = torch.linalg.cholesky_ex(m)
        self.chol = chol if int(info) == 0 else None
        if self.chol is None:
            # Semi-definite statistics (few prompts, no ridge, no prior): minimum-norm solution via one eigensystem.
            vals, vecs = torch.linalg.eigh(m)
            keep = vals > vals.abs().max() * m.shape[0] * torch.finfo(m.dtype).eps
            self.pinv = (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T
            log.warning("MACE fuse: statistics are rank %d of %d; using a pseudo-inverse (raise lambda for a ridge).",
                        int(keep.sum()), m.shape[0])

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.chol is not None:
            return torch.cholesky_solve(rhs.T, self.chol).T
        return rhs @ self.pinv


def concept_of(lora: ConceptLoRA, known: dict[str, Concept] | None = None) -> Concept:
    """The LoRA's concept; from `known` (name -> Concept, e.g. a concept list) when it lists the same concept with the
    same anchor and type, so the user's own prompts and nicknames weigh in fusion too."""
    c = (known or {}).get(lora.concept.lower())
    if c is not None and (c.anchor, c.concept_type) == (lora.anchor, lora.concept_type):
        return c
    return Concept(lora.concept, lora.anchor, lora.concept_type)


def check_loras(loras: list[ConceptLoRA], shapes: dict[str, tuple], input_name: str = "loras"):
    """Every LoRA must name a concept and fit the model's cross-attention matrices exactly."""
    if not loras:
        raise MaceInputError(input_name, "the LoRA bundle is empty.",
                             "Connect the output of MACE Train or MACE Load LoRAs with at least one concept.")
    for lora in loras:
        who = f"LoRA for '{lora.concept}'"
        if not lora.concept.strip():
            raise MaceInputError(input_name, "a LoRA has no concept name.",
                                 "Load foreign LoRA files with 'file => concept' lines.")
        check_concept_type(lora.concept_type, input_name)
        if not lora.up:
            raise MaceInputError(input_name, f"{who} has no weights.")
        for k in lora.keys:
            if k not in shapes:
                raise MaceInputError(input_name, f"{who} changes '{k}', which is not a cross-attention key/value "
                                                 "weight of this model.",
                                     "Use LoRAs made for this model (same architecture).")
            if k not in lora.down:
                raise MaceInputError(input_name, f"{who} has an up matrix but no down matrix for '{k}'.")
            out, d = shapes[k]
            up, down = lora.up[k], lora.down[k]
            fits = up.ndim == down.ndim == 2 and up.shape[0] == out and down.shape[1] == d
            if not fits or up.shape[1] != down.shape[0]:
                raise MaceInputError(input_name, f"{who} has shapes up {tuple(up.shape)}, down {tuple(down.shape)} "
                                                 f"for '{k}', but the model's weight is {out} x {d}.",
                                     "These LoRAs were made for another model; use the model they were trained on.")


def fuse(
    loras: Iterable[ConceptLoRA],
    enc: TextEncoder,
    current: dict[str, torch.Tensor],
    original: dict[str, torch.Tensor],
    prior: torch.Tensor | None = None,
    preserve: list = (),
    prior_weight: float = 1.0,
    preserve_weight: float = 1.0,
    lam: float = 0.01,
    device=None,
    progress: Callable[[], None] | None = None,
    preservation_target: str = "input",
    out_dtype: torch.dtype = torch.float32,
    concepts: dict[str, Concept] | None = None,
) -> WeightDeltas:
    """Delta W* - W' (in out_dtype, on `device`) for every key of `current` that changes, as WeightDeltas (the kind
    of result refinement gives too).

    current / original: W' and W0 per cross-attention key (any mapping; W' is read only for preservation_target
    "original", one matrix at a time, and a mapping with a `shapes` attribute is not read for its shapes).
    prior: mean second moment of generic prompts (prior.py).
    Prior and preserved concepts weigh relative to the concepts' own token count, as in refinement (the preserved ones
    by closed_form.preserve_scale of the number of LoRAs too); lam is relative to
    the mean eigenvalue of the concept statistics.
    preservation_target: what generic prompts and preserved concepts are held to, "original" (W0, the paper's choice)
    or "input" (W', so what refinement did beyond the fused concepts' own prompts, e.g. to their synonyms, stays).
    concepts: name (lower case) -> Concept whose own prompts and nicknames join the LoRA's templates (concept_of).
    """
    if preservation_target not in PRESERVATION_TARGETS:
        raise MaceInputError("preservation_target", f"must be one of {', '.join(PRESERVATION_TARGETS)}, got "
                                                    f"'{preservation_target}'.")
    loras = list(loras)
    shapes = getattr(current, "shapes", None) or {k: tuple(w.shape) for k, w in current.items()}
    check_loras(loras, shapes)
    check_concepts([concept_of(lora, concepts) for lora in loras], enc, "loras")
    if device is None:
        device = next(iter(current.values())).device
    out_device, device = torch.device(device), acc_device(device)  # float64 work where float64 exists
    d = enc.dim
    if {s[1] for s in shapes.values()} != {d}:
        raise MaceInputError("clip", f"the text encoder gives {d}-wide features but the cross-attention reads "
                                     f"{sorted({s[1] for s in shapes.values()})}.", "Connect this model's CLIP.")

    gram = torch.zeros(d, d, dtype=ACC, device=device)
    count = 0
    ranks: dict[str, int] = {}
    for lora in loras:
        for k in lora.keys:
            ranks[k] = ranks.get(k, 0) + int(lora.up[k].shape[1])
    factored = {k: r < shapes[k][0] for k, r in ranks.items()}
    # per matrix: V (R, d) when factored, else the (out, d) accumulator; float64, allocated up front
    store = {k: torch.zeros(r if factored[k] else shapes[k][0], d, dtype=ACC, device=device) for k, r in ranks.items()}
    ups: dict[str, list[tuple[torch.Tensor, float]]] = {k: [] for k in ranks}  # the LoRAs' own up tensors
    filled = dict.fromkeys(ranks, 0)
    for lora in loras:
        _, feats = enc.encode(concept_of(lora, concepts).prompts())
        x = to_acc(feats.reshape(-1, d), device)
        g = x.T @ x
        gram += g
        count += x.shape[0]
        for k in lora.keys:
            # dW_i G_i = up (down G_i): an (r, d) product; no (out, d) delta per LoRA
            v = to_acc(lora.down[k], device) @ g
            if factored[k]:
                r = v.shape[0]
                store[k][filled[k]:filled[k] + r] = v
                filled[k] += r
                ups[k].append((lora.up[k], lora.scale))
            else:
                store[k] += (to_acc(lora.up[k], device) * lora.scale) @ v
            del v
        del x, g
        if progress:
            progress()

    eye = torch.eye(d, dtype=ACC, device=device)
    m = gram + lam * ridge_scale(gram) * eye
    p = None
    if prior is not None and prior_weight > 0:
        p = prior_weight * count * to_acc(prior, device)
    concept_types = [lora.concept_type for lora in loras]
    held = preserve_moment(list(preserve), concept_types, enc, progress) if preserve and preserve_weight > 0 else None
    if held is not None:
        kp = preserve_weight * preserve_scale(len(loras)) * count * to_acc(held, device)
        p = kp if p is None else p + kp
    if p is not None:
        m = m + p
    solve = SpdSolver(m)

    deltas = {}
    for k in shapes:
        delta = None
        if k in store:
            if factored[k]:  # (U V) M^-1 = U (V M^-1): an (R, d) solve, then one (out, R) @ (R, d) product
                u = torch.cat([to_acc(up, device) * scale for up, scale in ups.pop(k)], dim=1)
                delta = u @ solve(store.pop(k))
                del u
            else:
                delta = solve(store.pop(k))
        if p is not None and preservation_target == "original":
            back = solve((to_acc(original[k], device) - to_acc(current[k], device)) @ p)
            delta = back if delta is None else delta + back
        if delta is not None:  # a matrix no LoRA touches and no prior pulls back keeps W' (no patch)
            deltas[k] = delta.to(out_device, out_dtype)
        del delta
    log.info("MACE fuse: %d LoRAs, %d concept tokens, %d matrices", len(loras), count, len(deltas))
    return WeightDeltas(deltas)


def naive_sum(loras: Iterable[ConceptLoRA], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The plain sum of every LoRA's update (what the paper shows interferes); for comparisons."""
    loras, out = list(loras), {}
    for k in keys:
        for lora in loras:
            if k in lora.up:
                out[k] = out[k] + lora.delta(k) if k in out else lora.delta(k)
    return out
