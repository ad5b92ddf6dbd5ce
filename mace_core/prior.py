"""Generic prompts whose per-token features define what the edit must leave alone (the preservation prior).

The paper used hundreds of thousands of image captions; 160 varied prompts (12k token features), written for this
project, span the everyday directions of the text space well enough for a ridge-like prior. The mean second moment
depends only on the text encoder, so hosts cache it per encoder.
"""

import hashlib
import itertools

import torch

from .closed_form import Moments
from .text import TextEncoder

_SUBJECTS = [
    "a dog", "a cat", "a child", "an old man", "a young woman", "a house", "a car", "a bicycle", "a tree",
    "a mountain", "a city skyline", "a bowl of fruit", "a cup of coffee", "a bird", "a horse", "a ship",
    "a bridge", "a garden", "a kitchen", "a forest path", "a street market", "a lighthouse", "a chair", "a book",
]
_SETTINGS = [
    "in the morning light", "at sunset", "in the rain", "on a sunny day", "covered in snow", "in a quiet room",
    "next to a river", "in a busy street", "under a blue sky", "at night with lamps", "",
]
_MEDIA = ["a photo of", "a painting of", "a drawing of", "a close-up of", "a wide shot of", "an illustration of"]


def generic_prompts(limit: int = 160) -> list[str]:
    combos = itertools.product(_MEDIA, _SUBJECTS, _SETTINGS)
    prompts = [" ".join(f"{m} {s} {w}".split()) for m, s, w in combos]
    # Deterministic spread over the combinations rather than the first `limit` (which would share one medium).
    step = max(1, len(prompts) // limit)
    return prompts[::step][:limit]


def prompt_set_version(prompts: list[str] | None = None) -> str:
    """A digest of the generic prompt set: caches of its statistics must not outlive a change to it."""
    prompts = prompts if prompts is not None else generic_prompts()
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:12]


def prior_moment(enc: TextEncoder, prompts: list[str] | None = None, batch: int = 64, progress=None) -> torch.Tensor:
    """Mean of p p^T over every token position of the prompts (d x d, float64)."""
    prompts = prompts if prompts is not None else generic_prompts()
    m = Moments(enc.dim)
    for i in range(0, len(prompts), batch):
        _, feats = enc.encode(prompts[i:i + batch])
        m.add(feats)
        if progress:
            progress()
    return m.mean_gram()
