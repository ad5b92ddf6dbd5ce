"""Pooled-vector editing on plain tensors: the closed form's map, what is held, and which columns change."""

import zlib

import pytest
import torch

from mace_core.closed_form import preserve_scale, refine_transform
from mace_core.concepts import Concept
from mace_core.pooled import mean_moment, pooled_delta, pooled_moments, pooled_transform, preserved_prompts

D = 64


def _encoder(seed=0):
    """A fixed pooled vector per prompt (a table drawn once per text), as a text encoder's would be."""
    table: dict[str, torch.Tensor] = {}

    def encode(prompts):
        for p in prompts:
            if p not in table:
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{p}".encode()))
                table[p] = torch.randn(D, generator=g)
        return torch.stack([table[p] for p in prompts])

    return encode


CONCEPT = Concept("Tom Cruise", "a person", "celebrity")


def test_concept_prompts_map_onto_the_anchors_and_generic_ones_are_held():
    enc = _encoder()
    # the concept's prompts and 4 generic ones in 64 dimensions: room for both, so both must nearly hold
    generic = [f"generic prompt {i}" for i in range(4)]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, D + 5, generator=g)
    t = pooled_transform([CONCEPT], enc, generic, lam=1e-4)
    w1 = w + pooled_delta(w, t)
    old, new = enc(CONCEPT.prompts()), enc(CONCEPT.prompts(anchor=True))
    wp, wp1 = w[:, :D], w1[:, :D]
    gap = (old @ wp.T - new @ wp.T).norm()
    assert (old @ wp1.T - new @ wp.T).norm() < 0.05 * gap
    gen = enc(generic)
    moved = (gen @ wp1.T - gen @ wp.T).norm(dim=1).mean()
    assert moved < 0.05 * (old @ wp1.T - old @ wp.T).norm(dim=1).mean()
    # without any prior the concept's few prompts map exactly
    t0 = pooled_transform([CONCEPT], enc, [], prior_weight=0.0, preserve_weight=0.0, lam=1e-8)
    w2 = w + pooled_delta(w, t0)
    assert torch.allclose(old @ w2[:, :D].T, new @ wp.T, atol=1e-3)


def test_only_the_pooled_columns_change():
    enc = _encoder()
    w = torch.randn(8, D + 5, generator=torch.Generator().manual_seed(2))
    delta = pooled_delta(w, pooled_transform([CONCEPT], enc, ["a"], lam=0.01))
    assert delta.shape == w.shape and delta[:, D:].abs().max() == 0 and delta[:, :D].abs().max() > 1e-3
    with pytest.raises(ValueError, match="pooled columns"):
        pooled_delta(torch.zeros(8, D - 1), torch.eye(D, dtype=torch.float64))


def test_preserved_concepts_are_held_too():
    enc = _encoder()
    w = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    preserve = ["Brad Pitt"]
    preserved_feats = enc(preserved_prompts(preserve, ["celebrity"]))
    loose = pooled_delta(w, pooled_transform([CONCEPT], enc, [], prior_weight=0.0, lam=1e-3))
    held = pooled_delta(w, pooled_transform([CONCEPT], enc, [], preserve, prior_weight=0.0, preserve_weight=1.0,
                                            lam=1e-3))
    assert (preserved_feats @ held.T).norm() < 0.6 * (preserved_feats @ loose.T).norm()
    assert len(preserved_prompts(preserve, ["celebrity"])) == len(CONCEPT.prompts())


def test_a_long_list_weighs_the_preserved_concepts_by_the_papers_rule():
    """The pooled edit weighs the preserve list as refine and fuse do: preserve_scale of the number of concepts."""
    enc = _encoder(3)
    concepts = [Concept(f"Person {chr(65 + i)} Name", "a person", "celebrity") for i in range(12)]
    kept = preserved_prompts(["Ann Lee"], ["celebrity"])
    t = pooled_transform(concepts, enc, [], ["Ann Lee"], prior_weight=0.0, preserve_weight=0.5, lam=0.01)
    edit, held = pooled_moments(concepts, enc), mean_moment(enc, kept)
    assert torch.allclose(t, refine_transform(edit, 0.5 * preserve_scale(12) * held, 1.0, 0.01), atol=1e-10)
    assert (t - refine_transform(edit, 0.5 * held, 1.0, 0.01)).abs().max() > 1e-4
