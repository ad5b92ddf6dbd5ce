"""The text-encoder interface mace_core needs, and validation of concepts against it.

The host adapter implements it with the model's own CLIP, so the per-token features are exactly the context the
UNet's cross-attention reads.
"""

from typing import Protocol

import torch

from .concepts import TEMPLATES, Concept
from .errors import MaceInputError


class TextEncoder(Protocol):
    end_id: int  # token id that ends a prompt (and pads it, for CLIP-L)
    context_length: int  # positions per prompt, start and end tokens included
    dim: int  # width of each token feature
    # optional: a dict in which mace_core keeps results that depend only on this encoder and their arguments (e.g.
    # refine.preserve_moment), so Refine and Fuse on one CLIP encode a long preserve list once; absent: nothing kept
    memo: dict

    def token_count(self, text: str) -> int:
        """Content tokens of `text`, start/end tokens excluded, without truncation."""

    def encode(self, prompts: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids (each context_length long) and features (n, context_length, dim) for each prompt."""


def check_concepts(concepts: list[Concept], enc: TextEncoder, input_name: str = "concepts"):
    """Every concept, nickname and anchor must tokenize to something and every templated prompt (the type's and the
    user's own) must fit one window."""
    room = enc.context_length - 2
    longest_template = {f: max(enc.token_count(t.format("")) for t in ts) for f, ts in TEMPLATES.items()}
    checked = set()
    for c in concepts:
        longest = longest_template[c.concept_type]
        if c.extra:
            longest = max([longest] + [enc.token_count(t.format("")) for t in c.extra])
        for word, what in [(w, "concept") for w in c.words()] + [(c.anchor, "anchor")]:
            if (word, c.concept_type, c.extra) in checked:
                continue
            checked.add((word, c.concept_type, c.extra))
            n = enc.token_count(word)
            if n == 0:
                raise MaceInputError(input_name if what == "concept" else "anchor",
                                     f"{what} '{word}' tokenizes to nothing.", "Use a name made of words.")
            if n + longest > room:
                raise MaceInputError(input_name if what == "concept" else "anchor",
                                     f"{what} '{word[:40]}' is {n} tokens; with its prompt templates it exceeds the "
                                     f"{room}-token context.",
                                     f"Shorten it (or its own prompts) to at most {room - longest} tokens.")
