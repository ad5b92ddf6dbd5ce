"""Stage 2's objective on plain tensors: which tokens it suppresses, where (masks per layer resolution), how much
(the masked attention energy), and at which timesteps (importance sampling).

The host captures cross-attention probabilities softmax(q k^T / sqrt(d)) of every layer; this module only ever sees
those tensors, shaped (batch, heads, pixels, tokens), and masks shaped (batch, height, width).
"""

import math

import torch
import torch.nn.functional as F

from .align import concept_positions
from .errors import MaceInputError

TIMESTEP_KINDS = ("importance", "uniform")
NUM_TIMESTEPS = 1000


# ---------------------------------------------------------------- timesteps

def timestep_probs(kind: str = "importance", n: int = NUM_TIMESTEPS) -> torch.Tensor:
    """p(t) over t = 0..n-1 (float64, sums to 1).

    'importance': p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)), a soft window over the middle-noise
    steps where the layout, and hence where the concept sits, is decided; 'uniform': every step alike.
    """
    if kind == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if kind != "importance":
        raise MaceInputError("timestep_sampling", f"unknown sampling '{kind}'.",
                             f"Use one of: {', '.join(TIMESTEP_KINDS)}.")
    t = torch.arange(n, dtype=torch.float64)
    p = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return p / p.sum()


def sample_timesteps(kind: str, count: int, generator: torch.Generator, n: int = NUM_TIMESTEPS) -> torch.Tensor:
    """`count` integer timesteps drawn from timestep_probs(kind) with the given generator (long, on CPU)."""
    return torch.multinomial(timestep_probs(kind, n), count, replacement=True, generator=generator)


# ---------------------------------------------------------------- tokens

def suppressed_positions(ids_concept: list[int], ids_anchor: list[int], end_id: int,
                         with_end: bool = True) -> list[int]:
    """Token positions whose attention the loss removes: the concept's own words and (with_end) the end token and
    every padding position after it, which carry what the text encoder summarised of the whole prompt."""
    pos = concept_positions(ids_concept, ids_anchor, end_id)
    if with_end:
        end = ids_concept.index(end_id, 1) if end_id in ids_concept[1:] else len(ids_concept)
        pos += list(range(end, len(ids_concept)))
    return pos


# ---------------------------------------------------------------- masks

def layer_hw(height: int, width: int, pixels: int) -> tuple[int, int]:
    """Spatial size of a layer that sees `pixels` query positions of a (height, width) latent.

    UNet levels halve with rounding up (stride-2 convs with padding 1), so walk down the levels until the count fits.
    """
    h, w = height, width
    while h * w > pixels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != pixels:
        raise ValueError(f"no UNet level of a {height}x{width} latent has {pixels} positions")
    return h, w


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(b, H, W) mask in [0, 1] -> (b, h*w) at a layer's resolution: area average when shrinking (a pixel half
    covered counts half), bilinear when growing."""
    m = mask.float().unsqueeze(1)
    if hw[0] <= m.shape[-2] and hw[1] <= m.shape[-1]:
        m = F.adaptive_avg_pool2d(m, hw)
    else:
        m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
    return m.flatten(1).clamp(0, 1)


class MaskPyramid:
    """One mask batch resized once per layer resolution (layers of one UNet level share it)."""

    def __init__(self, mask: torch.Tensor, latent_hw: tuple[int, int]):
        self.mask = mask
        self.latent_hw = latent_hw
        self._cache: dict[int, torch.Tensor] = {}

    def at(self, pixels: int) -> torch.Tensor:
        m = self._cache.get(pixels)
        if m is None:
            m = self._cache[pixels] = resize_mask(self.mask, layer_hw(*self.latent_hw, pixels))
        return m


def mask_from_maps(maps: list[torch.Tensor], out_hw: tuple[int, int]) -> torch.Tensor:
    """Binary concept masks (b, H, W) from attention maps of several layers/timesteps, each (b, h_l, w_l).

    Each map is normalised per image (so coarse and fine layers weigh alike), brought to (H, W), averaged, and
    thresholded at its own mean: pixels attending to the concept more than average belong to it.
    """
    acc = None
    for a in maps:
        a = a.float()
        a = a / a.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        a = F.interpolate(a.unsqueeze(1), size=out_hw, mode="bilinear", align_corners=False).squeeze(1)
        acc = a if acc is None else acc + a
    mean = acc.flatten(1).mean(1)[:, None, None]
    return (acc > mean).float()


def check_mask(mask: torch.Tensor, count: int, latent_hw: tuple[int, int], input_name: str = "mask") -> torch.Tensor:
    """A MASK aligned with the latents: (N, H, W) or (H, W) with N equal to the latent count (or 1, shared), and the
    latents' aspect ratio (any resolution, e.g. pixel space). Returns (count, H, W) float in [0, 1]."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim != 3:
        raise MaceInputError(input_name, f"expected a (batch, height, width) mask, got shape {tuple(mask.shape)}.")
    if mask.shape[0] not in (1, count):
        raise MaceInputError(input_name, f"has {mask.shape[0]} masks for {count} latents.",
                             "Give one mask per latent image, in the same order, or a single mask for all.")
    lh, lw = latent_hw
    mh, mw = mask.shape[-2:]
    if abs((mh / mw) / (lh / lw) - 1.0) > 1.0 / min(lh, lw) + 1e-6:  # one latent pixel of rounding
        raise MaceInputError(input_name, f"is {mh}x{mw}, which does not match the {lh}x{lw} latents' shape.",
                             "Use masks made from the same images as the latents.")
    if mask.shape[0] == 1:
        mask = mask.expand(count, -1, -1)
    return mask.float().clamp(0, 1)


# ---------------------------------------------------------------- loss and measurements

def attention_energy(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of the probabilities inside the mask, per masked pixel and head.

    probs: (b, heads, pixels, tokens) restricted to the suppressed tokens; mask: (b, pixels) in [0, 1].
    """
    heads = probs.shape[1]
    weighted = probs.float().square().sum(-1) * mask[:, None, :]
    return weighted.sum() / (heads * mask.sum()).clamp_min(1e-6)


def attention_energy_per_sample(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """attention_energy of each sample of the batch on its own: (b,). A batch of concepts trains on this, so each
    concept's loss is normalised by its own mask, as when it trains alone."""
    heads = probs.shape[1]
    weighted = probs.float().square().sum(-1) * mask[:, None, :]
    return weighted.sum((1, 2)) / (heads * mask.sum(1)).clamp_min(1e-6)


def attention_mass(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean attention probability mass on the selected tokens over the masked pixels and heads (a measurement)."""
    heads = probs.shape[1]
    return (probs.float().sum(-1) * mask[:, None, :]).sum() / (heads * mask.sum()).clamp_min(1e-6)


def mean_over_layers(terms: list[torch.Tensor]) -> torch.Tensor:
    if not terms:
        raise RuntimeError("no cross-attention layer was captured; the model has no usable attn2 layers")
    return torch.stack(terms).mean()
