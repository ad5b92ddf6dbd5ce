"""The d x d statistics and the one solve that refinement and fusion share.

Every cross-attention key/value matrix reads the same text context, so for an objective of the form
    sum |W x - W0 y|^2 + ...
the minimiser is W = W0 T (or a sum of such terms) with T a d x d matrix that does not depend on the layer:
one factorisation serves all layers. Statistics are accumulated in float64 as prompts stream past, so memory
does not grow with the number of concepts. Refinement and fusion both hand back their result as WeightDeltas.
"""

import math
from collections.abc import Mapping

import torch

ACC = torch.float64

# Device types without float64 arithmetic (Apple's MPS). There the d x d statistics and solves run on the CPU (d is at
# most 2048: a few hundred MB and well under a second) and only the float32 results move to the device.
NO_FLOAT64 = {"mps"}


def has_float64(device) -> bool:
    return torch.device(device if device is not None else "cpu").type not in NO_FLOAT64


def acc_device(device) -> torch.device:
    """Where float64 accumulation and solves for work on `device` run: the device itself, or the CPU without
    float64."""
    device = torch.device(device if device is not None else "cpu")
    return device if has_float64(device) else torch.device("cpu")


def to_acc(t: torch.Tensor, device) -> torch.Tensor:
    """t in float64 on `device`: moved first, then cast, so the cast never runs on a device without float64."""
    return t.to(device).to(ACC)


class Moments:
    """Running sums  cross = sum y x^T  and  gram = sum x x^T  over paired token embeddings."""

    def __init__(self, dim: int, device=None):
        device = acc_device(device)
        self.cross = torch.zeros(dim, dim, dtype=ACC, device=device)
        self.gram = torch.zeros(dim, dim, dtype=ACC, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None):
        x = to_acc(x.reshape(-1, x.shape[-1]), self.gram.device)
        y = x if y is None else to_acc(y.reshape(-1, y.shape[-1]), self.gram.device)
        self.gram += x.T @ x
        self.cross += y.T @ x
        self.count += x.shape[0]
        return self

    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


def spd_solve_right(rhs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """rhs @ m^-1 for symmetric positive definite m, by Cholesky (never an explicit inverse)."""
    m = 0.5 * (m + m.T)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        # Semi-definite statistics (few prompts, no ridge): fall back to a least-squares solve.
        return torch.linalg.lstsq(m, rhs.T).solution.T
    return torch.cholesky_solve(rhs.T, chol).T


def ridge_scale(gram: torch.Tensor) -> float:
    """Ridge and prior weights are given relative to the mean eigenvalue of the data term, so defaults hold for any
    text encoder width and any number of prompts."""
    return float(torch.trace(gram)) / gram.shape[0]


# How the paper's configs weigh the kept concepts as the erased list grows (celebrities, one domain cache:
# preserve_weight 8e3, 5e4, 8e4 and 2e5 at 1, 5, 10 and 100 erased). The concepts' own statistics grow in proportion
# to the number erased, so up to ten the kept list keeps its share of the total; from ten to a hundred its weight grows
# only 2.5x for ten times the erased, and its share falls to a quarter. Refine and Fuse weigh the preserve list by
# preserve_scale(n): 1 up to PRESERVE_FULL_UP_TO concepts, then (n / 10) ** (PRESERVE_GROWTH - 1). Past a hundred the
# paper has no setting; the same power goes on.
PRESERVE_FULL_UP_TO = 10
PRESERVE_GROWTH = math.log10(2e5 / 8e4)  # 0.398: the kept weight's growth per decade of erased concepts


def preserve_scale(n_concepts: int) -> float:
    """The factor on the preserve list's weight for n_concepts erased at once (the paper's rule above)."""
    if n_concepts <= PRESERVE_FULL_UP_TO:
        return 1.0
    return (n_concepts / PRESERVE_FULL_UP_TO) ** (PRESERVE_GROWTH - 1.0)


def refine_transform(edit: Moments, prior: torch.Tensor | None, prior_weight: float, lam: float) -> torch.Tensor:
    """T minimising  sum |W0 T x - W0 y|^2 + |W0 T p - W0 p|^2 (weighted) + lam |W0 T - W0|^2  for every W0 at once.

    In closed form  T = (cross + P + lam I)(gram + P + lam I)^-1  with P the weighted prior second moment.
    `prior` is a mean second moment (d x d); its weight counts in units of the edit's own token count.
    """
    d = edit.gram.shape[0]
    eye = torch.eye(d, dtype=ACC, device=edit.gram.device)
    scale = ridge_scale(edit.gram)
    reg = lam * scale * eye
    if prior is not None and prior_weight > 0:
        reg = reg + prior_weight * edit.count * to_acc(prior, edit.gram.device)
    return spd_solve_right(edit.cross + reg, edit.gram + reg)


def apply_transform(w0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """delta = W0 (T - I), computed in float64 (on the CPU for devices without it) and returned in float32 on W0's
    device (the caller casts to the model dtype)."""
    w = to_acc(w0, acc_device(w0.device))
    return (w @ to_acc(t, w.device) - w).to(w0.device, torch.float32)


class WeightDeltas(Mapping):
    """What refinement and fusion both return: {weight key: the change to add to that weight}, each tensor in the
    dtype and on the device it is applied in; a weight not listed keeps its value. One kind of result, so the host
    applies every stage's the same way (nodes/host.with_deltas). Read-only: the host hands these very tensors to the
    model as its patches, without a copy."""

    def __init__(self, deltas: Mapping[str, torch.Tensor] | None = None):
        self._deltas = dict(deltas or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._deltas[key]

    def __iter__(self):
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __or__(self, other: Mapping[str, torch.Tensor]) -> "WeightDeltas":
        """Both sets of changes in one (refinement's cross-attention and pooled edits). They must touch different
        weights: a weight in both would keep only one of its two changes."""
        both = set(self._deltas) & set(other)
        if both:
            raise ValueError(f"two changes to the same weight: {sorted(both)[0]}")
        return WeightDeltas({**self._deltas, **other})

    def __repr__(self) -> str:
        return f"WeightDeltas({len(self)} weights)"


def transform_deltas(weights: Mapping[str, torch.Tensor], t: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32) -> WeightDeltas:
    """W (T - I) for every weight of `weights`, read one at a time (a lazy mapping never holds them all) and cast to
    out_dtype as soon as made, so no second full-size float32 copy exists."""
    return WeightDeltas({k: apply_transform(weights[k], t).to(out_dtype) for k in weights})
