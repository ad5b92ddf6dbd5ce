"""The UCE-style baseline (concept_world/uce.py) on a smoke world's real ComfyUI MODEL and CLIP: it returns a patched
clone and leaves the world's model as it was, it is the identity with nothing erased, and its closed form does what
UCE's objective says: the erased concept's end-token vector is mapped onto its anchor's in every K/V matrix, while the
preserved concepts' vectors keep their outputs."""

import pytest
import torch
from world_support import comfy_host, pack_import

PERSON = "Tomas Lindqvist"
ANCHOR = "a person"  # the celebrity type's anchor (mace_core.concepts.DEFAULT_ANCHORS)
KEPT = ["red lantern", "Priya Raman", "dotwork style"]


@pytest.fixture(scope="module")
def uce():
    return pack_import("concept_world.uce")


@pytest.fixture(scope="module")
def host_mod():
    return pack_import("nodes.host")


def _weights(host_mod, model):
    keys = host_mod.cross_attention_keys(model)
    with torch.inference_mode():
        return host_mod.current_weights(model, keys)


def _vec(uce, world, words):
    host_mod = pack_import("nodes.host")
    with torch.inference_mode():
        return uce.end_features(host_mod.clip_encoder(world.clip), words).float()


def test_clone_patched_and_input_model_unchanged(uce, host_mod, smoke_world):
    comfy_host.unload_all()
    raw = {k: v.clone() for k, v in smoke_world.model.model.diffusion_model.state_dict().items()}
    with torch.inference_mode():
        out = uce.uce_model(smoke_world.model, smoke_world.clip, f"{PERSON} | celebrity", "\n".join(KEPT))
    keys = host_mod.cross_attention_keys(smoke_world.model)
    assert out is not smoke_world.model
    assert set(host_mod.mace_deltas(out, keys)) == set(keys), "every to_k/to_v weight must carry the edit"
    comfy_host.unload_all()
    after = smoke_world.model.model.diffusion_model.state_dict()
    assert all(torch.equal(raw[k], after[k]) for k in raw), "the input model's weights changed"
    assert not smoke_world.model.patches, "the input model gained patches"


@pytest.mark.parametrize("preserve", [[], KEPT])
def test_nothing_erased_is_the_identity(uce, host_mod, smoke_world, preserve):
    with torch.inference_mode():
        deltas = uce.uce_deltas(smoke_world.model, smoke_world.clip, [], preserve)
    w = _weights(host_mod, smoke_world.model)
    worst = max(float(d.abs().max() / w[k].abs().max()) for k, d in deltas.items())
    assert worst < 1e-6, worst


def test_transform_is_the_stated_closed_form(uce):
    """On plain tensors: T = (C* + P + lam I)(C + P + lam I)^-1 solves UCE's objective (its gradient vanishes)."""
    g = torch.Generator().manual_seed(0)
    d = 16
    c, c_star, p = (torch.randn(n, d, generator=g, dtype=torch.float64) for n in (3, 3, 5))
    w = torch.randn(8, d, generator=g, dtype=torch.float64)
    t = uce.uce_transform(c, c_star, p, lam=0.1)
    w1 = w @ t
    # d/dW' of sum |W'c - W c*|^2 + sum |W'p - W p|^2 + lam |W' - W|^2, halved
    grad = (w1 @ c.T - w @ c_star.T) @ c + (w1 @ p.T - w @ p.T) @ p + 0.1 * (w1 - w)
    assert grad.abs().max() < 1e-9


def test_concept_goes_to_its_anchor_and_preserved_stay(uce, host_mod, smoke_world):
    """One concept and three preserved in the world's 64-wide text space: the system is well-determined, so each edited
    K/V matrix sends the concept's end-token vector to W0's output for the anchor's, up to lam's pull, and moves the
    preserved concepts' outputs far less than the concept's."""
    with torch.inference_mode():
        out = uce.uce_model(smoke_world.model, smoke_world.clip, f"{PERSON} | celebrity", KEPT)
    w0, w1 = _weights(host_mod, smoke_world.model), _weights(host_mod, out)
    c, a, p = _vec(uce, smoke_world, [PERSON])[0], _vec(uce, smoke_world, [ANCHOR])[0], _vec(uce, smoke_world, KEPT)
    for k in w0:
        target, before, after = w0[k] @ a, w0[k] @ c, w1[k] @ c
        gap = float((before - target).norm())
        assert gap > 0, k
        assert float((after - target).norm()) < 0.05 * gap, (k, float((after - target).norm()), gap)
        moved = float((after - before).norm())
        kept_moved = (w1[k] @ p.T - w0[k] @ p.T).norm(dim=0)
        assert float(kept_moved.max()) < 0.05 * moved, (k, kept_moved.tolist(), moved)


def test_many_concepts_keep_the_preserved_far_closer_than_the_erased(uce, host_mod, smoke_world):
    """Eight erased (each onto its type's anchor) and the other twelve preserved: the erased outputs move, the
    preserved ones by much less."""
    ee = pack_import("concept_world.erasure_eval")
    spec = pack_import("concept_world.spec")
    erased = ee.ORDER[:8]
    kept = [c.name for c in spec.CONCEPTS if c.name not in erased]
    with torch.inference_mode():
        out = ee.erase(smoke_world, erased, pipelines=(ee.UCE,))[ee.UCE]
    w0, w1 = _weights(host_mod, smoke_world.model), _weights(host_mod, out)
    c, p = _vec(uce, smoke_world, erased), _vec(uce, smoke_world, kept)
    for k in w0:
        d = w1[k] - w0[k]
        erased_moved = ((d @ c.T).norm(dim=0) / (w0[k] @ c.T).norm(dim=0)).mean()
        kept_moved = ((d @ p.T).norm(dim=0) / (w0[k] @ p.T).norm(dim=0)).mean()
        assert kept_moved < 0.1 * erased_moved, (k, float(kept_moved), float(erased_moved))
