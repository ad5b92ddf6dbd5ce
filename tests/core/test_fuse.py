"""Closed-form fusion against the stacked least-squares problem it claims to solve, on host-free tensors."""

import zlib

import pytest
import torch

from mace_core.closed_form import preserve_scale, refine_transform, ridge_scale
from mace_core.concepts import TEMPLATES, Concept
from mace_core.errors import MaceInputError
from mace_core.fuse import fuse, naive_sum
from mace_core.lora_bundle import ConceptLoRA
from mace_core.refine import edit_moments, preserve_moment, refinement_transform


class HashEncoder:
    """TextEncoder stand-in: each prompt gets fixed random features seeded by its text (plus a shared component, as
    real prompts share start and padding tokens)."""

    end_id = 0

    def __init__(self, dim=16, context_length=12):
        self.dim, self.context_length = dim, context_length
        self.shared = torch.randn(context_length, dim, generator=torch.Generator().manual_seed(7))

    def token_count(self, text):
        return len(text.split())

    def encode(self, prompts):
        feats = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            feats.append(0.5 * self.shared + torch.randn(self.context_length, self.dim, generator=g))
        return [[1] * self.context_length for _ in prompts], torch.stack(feats)


def make_loras(keys_shapes, names, rank=1, seed=0, concept_type="celebrity"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(names):
        up = {k: torch.randn(o, rank, generator=g) * 0.3 for k, (o, d) in keys_shapes.items()}
        down = {k: torch.randn(rank, d, generator=g) / d**0.5 for k, (o, d) in keys_shapes.items()}
        out.append(ConceptLoRA(n, "a person", concept_type, rank, 10, up, down, alpha=0.5 * rank if i % 2 else None))
    return out


def setup(dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"diffusion_model.b{i}.attn2.to_{kv}.weight": (o, dim) for i, o in enumerate((8, 24, 16))
              for kv in "kv"}
    w0 = {k: torch.randn(s, generator=g) / dim**0.5 for k, s in shapes.items()}
    wp = {k: w + 0.05 * torch.randn(w.shape, generator=g) for k, w in w0.items()}  # "refined" W'
    return shapes, w0, wp


def stacked_solution(loras, enc, wp, w0, prior_rows, preserve_rows, prior_weight, preserve_weight, lam,
                     preserve_to=None):
    """The objective written out row by row and solved per matrix by least squares (float64); prior and preserved
    concepts are held to preserve_to (default W0)."""
    preserve_to = w0 if preserve_to is None else preserve_to
    xs = [features(enc, lora).double() for lora in loras]
    n = sum(x.shape[0] for x in xs)
    gram = sum(x.T @ x for x in xs)
    r = (lam * ridge_scale(gram)) ** 0.5
    out = {}
    for k in wp:
        rows, targets = [], []
        for lora, x in zip(loras, xs):
            w_i = wp[k].double() + (lora.delta(k, torch.float64) if k in lora.up else 0)
            rows.append(x)
            targets.append(x @ w_i.T)
        for p, wt in ((prior_rows, prior_weight), (preserve_rows, preserve_weight)):
            if p is not None and wt > 0:
                c = (wt * n / p.shape[0]) ** 0.5
                rows.append(c * p)
                targets.append(c * p @ preserve_to[k].double().T)
        rows.append(r * torch.eye(enc.dim, dtype=torch.float64))
        targets.append(r * wp[k].double().T)
        sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets), driver="gelsd").solution.T
        out[k] = sol - wp[k].double()
    return out


def features(enc, lora):
    """Every token of the concept's templated prompts, as the fusion sees them."""
    return enc.encode([t.format(lora.concept) for t in TEMPLATES[lora.concept_type]])[1].reshape(-1, enc.dim)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# Total ranks 3 and 6 stay below every matrix's out (8, 24, 16): the LoRA term is kept as factors. Rank 4 gives 12
# (8 on b0.to_k): b0's matrices take the (out, d) accumulator, the others the factors, in one run.
@pytest.mark.parametrize("rank,preservation_target", [(1, "original"), (2, "original"), (1, "input"), (4, "original"),
                                              (4, "input")])
def test_fusion_equals_stacked_least_squares(rank, preservation_target):
    shapes, w0, wp = setup()
    enc = HashEncoder()
    loras = make_loras(shapes, ["Alice Smith", "Bob Jones", "Carol White"], rank=rank)
    del loras[1].up["diffusion_model.b0.attn2.to_k.weight"], loras[1].down["diffusion_model.b0.attn2.to_k.weight"]
    prior_rows = torch.randn(50, enc.dim, generator=torch.Generator().manual_seed(3)).double()
    prior = prior_rows.T @ prior_rows / prior_rows.shape[0]
    preserve = ["Dave Brown"]
    preserve_rows = enc.encode([t.format(preserve[0]) for t in TEMPLATES["celebrity"]])[1].reshape(-1, enc.dim).double()
    deltas = fuse(loras, enc, wp, w0, prior, preserve, prior_weight=0.7, preserve_weight=0.4, lam=0.02,
                  preservation_target=preservation_target)
    ref = stacked_solution(loras, enc, wp, w0, prior_rows, preserve_rows, 0.7, 0.4, 0.02,
                           preserve_to=wp if preservation_target == "input" else w0)
    assert set(deltas) == set(wp)
    for k in wp:
        assert deltas[k].dtype == torch.float32
        assert rel(deltas[k], ref[k]) < 1e-5, k
    half = fuse(loras, enc, wp, w0, prior, preserve, prior_weight=0.7, preserve_weight=0.4, lam=0.02,
                preservation_target=preservation_target, out_dtype=torch.float16)
    assert all(half[k].dtype == torch.float16 and torch.allclose(half[k].float(), deltas[k], rtol=1e-3, atol=1e-6)
               for k in wp)


def test_fusion_without_prior_or_ridge_matches_and_beats_naive_sum():
    shapes, w0, wp = setup(seed=1)
    enc = HashEncoder()
    loras = make_loras(shapes, ["Alice Smith", "Bob Jones", "Carol White", "Erin Black"], seed=2)
    deltas = fuse(loras, enc, wp, w0, None, (), lam=0.0)
    ref = stacked_solution(loras, enc, wp, w0, None, None, 0, 0, 0.0)
    naive = naive_sum(loras, wp)
    err_fused = err_naive = 0.0
    for k in wp:
        assert rel(deltas[k], ref[k]) < 1e-5
        for lora in loras:
            x = features(enc, lora)
            want = x @ lora.delta(k).T
            err_fused += float((x @ deltas[k].T - want).norm() ** 2)
            err_naive += float((x @ naive[k].T - want).norm() ** 2)
    assert err_fused < 0.5 * err_naive


def test_unchanged_weights_without_loras_on_a_key_are_left_out():
    shapes, w0, _ = setup()
    enc = HashEncoder()
    loras = make_loras({k: s for k, s in shapes.items() if "b1" in k}, ["Alice Smith"])
    deltas = fuse(loras, enc, w0, w0, None, ())  # W' = W0: only the LoRA's keys change
    assert set(deltas) == {k for k in shapes if "b1" in k}


def test_preserving_to_the_input_leaves_what_refinement_did_elsewhere():
    """preservation_target="input": with LoRAs that change nothing, fusion changes nothing (the paper's W0 target
    would pull every generic direction back toward the original, undoing refinement beyond the fused concepts'
    prompts)."""
    shapes, w0, wp = setup(seed=3)
    enc = HashEncoder()
    loras = make_loras(shapes, ["Alice Smith", "Bob Jones"], seed=4)
    for lora in loras:
        lora.up = {k: torch.zeros_like(v) for k, v in lora.up.items()}
    prior = torch.eye(enc.dim, dtype=torch.float64)
    held = fuse(loras, enc, wp, w0, prior, (), preservation_target="input")
    assert all(float(v.abs().max()) < 1e-6 for v in held.values())
    back = fuse(loras, enc, wp, w0, prior, (), preservation_target="original")
    assert all(rel(back[k], w0[k] - wp[k]) < 0.9 for k in wp)  # pulled toward W0
    with pytest.raises(MaceInputError) as e:
        fuse(loras, enc, wp, w0, prior, (), preservation_target="W0")
    assert e.value.input_name == "preservation_target"


def test_bad_bundles_are_refused():
    shapes, w0, wp = setup()
    enc = HashEncoder()
    with pytest.raises(MaceInputError, match="empty"):
        fuse([], enc, wp, w0)
    other = make_loras({k: (o, 32) for k, (o, _) in shapes.items()}, ["Alice Smith"])
    with pytest.raises(MaceInputError, match="another model"):
        fuse(other, enc, wp, w0)
    alien = make_loras({"diffusion_model.x.attn1.to_q.weight": (8, 16)}, ["Alice Smith"])
    with pytest.raises(MaceInputError, match="not a cross-attention"):
        fuse(alien, enc, wp, w0)


def test_preserved_names_are_protected_in_every_erased_type_and_their_own():
    from mace_core.concepts import Preserved

    enc = HashEncoder()
    both = preserve_moment(["Ann Lee"], ["celebrity", "style", "celebrity"], enc)
    assert torch.allclose(both, preserve_moment([Preserved("Ann Lee", "style")], ["celebrity", "style"], enc))
    assert not torch.allclose(both, preserve_moment(["Ann Lee"], ["celebrity"], enc))
    assert torch.allclose(preserve_moment([Preserved("Ann Lee", "style")], ["celebrity"], enc), both)


def test_fusion_for_a_device_without_float64_solves_on_the_cpu(monkeypatch):
    """A device declared without float64 (here the meta device, which holds no data: any float64 work routed to it
    would leave no numbers to return) gets float32 results while every float64 tensor lives on the CPU."""
    from torch.overrides import TorchFunctionMode

    import mace_core.closed_form as cf

    shapes, w0, wp = setup()
    enc = HashEncoder()
    loras = make_loras(shapes, ["Alice Smith", "Bob Jones"], rank=4)
    prior = torch.eye(enc.dim, dtype=torch.float64)
    expected = fuse(loras, enc, wp, w0, prior, (), lam=0.02, preservation_target="original")
    monkeypatch.setattr(cf, "NO_FLOAT64", {"mps", "meta"})
    assert cf.acc_device("meta") == torch.device("cpu") and cf.Moments(4, device="meta").gram.device.type == "cpu"
    places = set()

    class Float64Places(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                places.add(out.device.type)
            return out

    with Float64Places():
        got = fuse(loras, enc, wp, w0, prior, (), lam=0.02, preservation_target="original", device="meta")
    assert places == {"cpu"}
    assert all(got[k].device.type == "meta" and got[k].dtype == torch.float32 for k in got)
    assert got.keys() == expected.keys()


def test_refine_and_fuse_return_the_same_kind_of_result():
    """Both stages hand back WeightDeltas: {weight key: delta} in the dtype asked for, one matrix per key; refine's
    delta is W' (T - I) with the transform solved once for every matrix."""
    from mace_core.closed_form import WeightDeltas, apply_transform
    from mace_core.concepts import Concept
    from mace_core.refine import refine, refinement_transform

    shapes, w0, wp = setup(seed=5)
    enc = HashEncoder()
    concepts = [Concept("Alice Smith", "a person", "celebrity")]
    prior = torch.eye(enc.dim, dtype=torch.float64)
    refined = refine(concepts, enc, wp, prior, ["Bob Jones"], out_dtype=torch.float16)
    fused = fuse(make_loras(shapes, ["Alice Smith"], seed=6), enc, wp, w0, prior, ["Bob Jones"],
                 out_dtype=torch.float16)
    for deltas in (refined, fused):
        assert isinstance(deltas, WeightDeltas) and set(deltas) == set(wp)
        assert all(d.dtype == torch.float16 and d.shape == wp[k].shape for k, d in deltas.items())
    t = refinement_transform(concepts, enc, prior, ["Bob Jones"])
    for k, w in wp.items():
        assert torch.equal(refined[k], apply_transform(w, t).to(torch.float16))


def test_weight_deltas_join_only_where_they_touch_different_weights():
    from mace_core.closed_form import WeightDeltas

    a, b = WeightDeltas({"x": torch.ones(2)}), WeightDeltas({"y": torch.zeros(2)})
    both = a | b
    assert set(both) == {"x", "y"} and both["x"] is a["x"] and set(a) == {"x"}  # the tensors themselves, not copies
    with pytest.raises(ValueError, match="same weight"):
        both | {"x": torch.ones(2)}
    with pytest.raises(TypeError):
        a["z"] = torch.ones(2)  # read-only: these tensors become the model's patches


def test_a_long_list_weighs_the_preserved_concepts_by_the_papers_rule():
    """Past ten LoRAs the preserve list weighs preserve_scale(n) of its strength (closed_form.preserve_scale); up to
    ten, its strength as given."""
    shapes, w0, wp = setup(seed=4)
    enc = HashEncoder()
    names = [f"Person {chr(65 + i)} Name" for i in range(12)]
    loras = make_loras(shapes, names, seed=5)
    preserve = ["Dave Brown"]
    preserve_rows = enc.encode([t.format(preserve[0]) for t in TEMPLATES["celebrity"]])[1].reshape(-1, enc.dim).double()
    deltas = fuse(loras, enc, wp, w0, None, preserve, prior_weight=0.0, preserve_weight=0.4, lam=0.02,
                  preservation_target="original")
    k = next(iter(wp))
    ruled = stacked_solution(loras, enc, wp, w0, None, preserve_rows, 0, 0.4 * preserve_scale(12), 0.02)
    flat = stacked_solution(loras, enc, wp, w0, None, preserve_rows, 0, 0.4, 0.02)
    assert rel(deltas[k], ruled[k]) < 1e-5
    assert rel(deltas[k], flat[k]) > 1e-3  # the rule changed the result: the flat weight is not what was solved
    ten = fuse(loras[:10], enc, wp, w0, None, preserve, prior_weight=0.0, preserve_weight=0.4, lam=0.02,
               preservation_target="original")
    assert rel(ten[k], stacked_solution(loras[:10], enc, wp, w0, None, preserve_rows, 0, 0.4, 0.02)[k]) < 1e-5


def test_refinement_applies_the_rule_to_the_preserve_list_only():
    enc = HashEncoder()
    concepts = [Concept(f"Person {chr(65 + i)} Name", "a person", "celebrity") for i in range(12)]
    prior = torch.eye(enc.dim, dtype=torch.float64) / enc.dim
    t = refinement_transform(concepts, enc, prior, ["Dave Brown"], prior_weight=0.3, preserve_weight=0.8, lam=0.01)
    held = preserve_moment(["Dave Brown"], ["celebrity"], enc)
    edit = edit_moments(concepts, enc)
    want = refine_transform(edit, 0.3 * prior + 0.8 * preserve_scale(12) * held, 1.0, 0.01)
    flat = refine_transform(edit, 0.3 * prior + 0.8 * held, 1.0, 0.01)
    assert torch.allclose(t, want, atol=1e-10)
    assert (t - flat).abs().max() > 1e-4
