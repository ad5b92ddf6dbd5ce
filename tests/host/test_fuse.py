"""MACE Fuse LoRAs and MACE Save Erasure inside a real ComfyUI, on tiny real models.

Measured figures are printed (pytest -s) and asserted with margin.
"""

import json
import sys

import comfy_host
import pytest
import torch
from safetensors import safe_open

FUSE, ERASURE, REFINE = "MACEFuseLoRAs", "MACESaveErasure", "MACERefineCrossAttention"
NAMES = ["Tom Cruise", "Emma Watson", "Brad Pitt", "Angelina Jolie"]
PRESERVE = ["Tom Hanks", "Meryl Streep"]
WIDE = 256


def mod(pack_module, name):
    return sys.modules[f"{pack_module.__name__}.{name}"]


def features(host, clip, name, concept_type="celebrity", pack_module=None):
    templates = mod(pack_module, "mace_core.concepts").TEMPLATES[concept_type]
    _, e = host.clip_encoder(clip).encode([t.format(name) for t in templates])
    return e.reshape(-1, e.shape[-1]).double().cpu()  # CLIP may run on a GPU (MACE_TEST_GPU=1)


def random_bundle(pack_module, model, names, rank=1, seed=0, base=None):
    """Random low-rank LoRAs keyed by the model's cross-attention keys (as MACE Train would produce)."""
    host, lb = mod(pack_module, "nodes.host"), mod(pack_module, "mace_core.lora_bundle")
    keys = host.cross_attention_keys(model)
    w0 = host.original_weights(model, keys)
    g = torch.Generator().manual_seed(seed)
    loras = []
    for n in names:
        up = {k: torch.randn(w.shape[0], rank, generator=g) * float(w.norm()) / w.shape[0] ** 0.5
              for k, w in w0.items()}
        down = {k: torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5 for k, w in w0.items()}
        loras.append(lb.ConceptLoRA(n, "a person", "celebrity", rank, 50, up, down))
    return lb.LoRABundle(loras, host.model_fingerprint(model) if base is None else base)


def snapshot(patcher):
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}


def fuse(pack, model, clip, bundle, preserve="", strength=1.0, lam=0.01, preservation_target="input model"):
    return pack[FUSE].execute(model, clip, bundle, preserve, strength, lam, preservation_target).result[0]


# ---------------------------------------------------------------- schema


def test_nodes_registered_with_schema(pack):
    for node_id, name in [(FUSE, "MACE Fuse LoRAs"), (ERASURE, "MACE Save Erasure"),
                          ("MACESaveLoRAs", "MACE Save LoRAs"), ("MACELoadLoRAs", "MACE Load LoRAs")]:
        schema = pack[node_id].define_schema()
        assert schema.node_id == node_id and schema.display_name == name and schema.category == "MACE"
        assert schema.description and all(i.tooltip for i in schema.inputs), node_id
    assert pack[ERASURE].define_schema().is_output_node and pack["MACESaveLoRAs"].define_schema().is_output_node
    inputs = pack[FUSE].define_schema().inputs
    assert [i.id for i in inputs] == ["model", "clip", "loras", "preserve", "preservation_strength", "lambda_",
                                      "keep_target", "concept_list"]
    assert inputs[-1].optional, "added last and optional: saved API workflows without it still run"


# ---------------------------------------------------------------- fusion quality


@pytest.fixture(scope="module")
def wide(pack, pack_module):
    """A wider text encoder: four names give clearly separable features at 256 (barely at 64, partly at 128)."""
    host, lb = mod(pack_module, "nodes.host"), mod(pack_module, "mace_core.lora_bundle")
    with torch.inference_mode():
        model, clip = comfy_host.tiny_model(context_dim=WIDE), comfy_host.tiny_clip(width=WIDE)
    keys = host.cross_attention_keys(model)
    w0 = host.original_weights(model, keys)
    e = {n: features(host, clip, n, pack_module=pack_module) for n in NAMES + PRESERVE}
    grams = {n: e[n].T @ e[n] for n in NAMES}
    g = torch.Generator().manual_seed(1)
    loras = []
    for n in NAMES:
        # Like a trained MACE LoRA: reads mostly what is specific to its concept (top generalised eigenvector of its
        # prompts against the other concepts'), plus a random part that leaks onto shared tokens and interferes.
        rest = sum(grams[m] for m in NAMES if m != n)
        rest = rest + 1e-3 * torch.trace(rest) / WIDE * torch.eye(WIDE, dtype=torch.float64)
        li = torch.linalg.inv(torch.linalg.cholesky(rest))
        v = li.T @ torch.linalg.eigh(li @ grams[n] @ li.T)[1][:, -1]
        v = (v / v.norm()).float()
        up, down = {}, {}
        for k, w in w0.items():
            r = torch.randn(WIDE, generator=g)
            x = v + 0.5 * r / r.norm()
            down[k] = (x / x.norm())[None]
            up[k] = torch.randn(w.shape[0], 1, generator=g) * float(w.norm()) / w.shape[0] ** 0.5
        loras.append(lb.ConceptLoRA(n, "a person", "celebrity", 1, 50, up, down))
    bundle = lb.LoRABundle(loras, host.model_fingerprint(model))
    refined = pack[REFINE].execute(model, clip, "\n".join(NAMES), "celebrity", "", "", 1.0, 0.01).result[0]
    return model, clip, refined, bundle, e


def _rel(host_e, diff_of, base_of, keys):
    num = sum(float((host_e @ diff_of(k).T).pow(2).sum()) for k in keys)
    den = sum(float((host_e @ base_of(k).T).pow(2).sum()) for k in keys)
    return (num / den) ** 0.5


def test_fusion_reproduces_each_lora_and_beats_naive_sum(pack, pack_module, wide):
    model, clip, refined, bundle, e = wide
    host = mod(pack_module, "nodes.host")
    before = snapshot(refined)
    fused = fuse(pack, refined, clip, bundle, "\n".join(PRESERVE))
    keys = host.cross_attention_keys(model)
    w0, wp, wf = (host.current_weights(m, keys, "cpu") for m in (model, refined, fused))
    summed = {k: sum(lora.delta(k) for lora in bundle.loras) for k in keys}
    for lora in bundle.loras:
        x = e[lora.concept]
        d = {k: lora.delta(k).double() for k in keys}
        err_fused = _rel(x, lambda k: (wf[k] - wp[k]).double() - d[k], d.get, keys)
        err_naive = _rel(x, lambda k: summed[k].double() - d[k], d.get, keys)
        print(f"{lora.concept}: fused {err_fused:.3f}, naive sum {err_naive:.3f} (relative error of the LoRA's effect)")
        assert err_fused < 0.45, (lora.concept, err_fused)
        assert err_fused < 0.6 * err_naive, (lora.concept, err_fused, err_naive)
    for name in PRESERVE:
        x = e[name]
        ch_fused = _rel(x, lambda k: (wf[k] - w0[k]).double(), lambda k: w0[k].double(), keys)
        ch_naive = _rel(x, lambda k: (wp[k] + summed[k] - w0[k]).double(), lambda k: w0[k].double(), keys)
        ch_refined = _rel(x, lambda k: (wp[k] - w0[k]).double(), lambda k: w0[k].double(), keys)
        print(f"{name} (preserved): change vs original: fused {ch_fused:.3f}, naive {ch_naive:.3f}, refine alone "
              f"{ch_refined:.3f}")
        assert ch_fused < 0.3 and ch_fused < 0.5 * ch_naive, (name, ch_fused, ch_naive)
    after = snapshot(refined)
    assert all(torch.equal(before[k], after[k]) for k in before), "input model unchanged"


def test_preservation_target_chooses_what_generic_prompts_are_held_to(pack, pack_module, wide):
    model, clip, refined, bundle, _ = wide
    host = mod(pack_module, "nodes.host")
    keys = host.cross_attention_keys(model)
    _, x = host.clip_encoder(clip).encode(["a dog in the park", "a bowl of soup", "a red car on a road"])
    x = x.reshape(-1, WIDE).double()
    w0, wp = (host.current_weights(m, keys, "cpu") for m in (model, refined))
    wi, wo = (host.current_weights(fuse(pack, refined, clip, bundle, preservation_target=t), keys, "cpu")
              for t in ("input model", "original model"))
    off_input = {t: _rel(x, lambda k: (w[k] - wp[k]).double(), lambda k: wp[k].double(), keys)
                 for t, w in (("input", wi), ("original", wo))}
    off_original = {t: _rel(x, lambda k: (w[k] - w0[k]).double(), lambda k: w0[k].double(), keys)
                    for t, w in (("input", wi), ("original", wo))}
    assert off_input["input"] < off_input["original"], off_input  # refinement's effect on them stays
    assert off_original["original"] < off_original["input"], off_original  # the paper's pull back to W0


@pytest.fixture(scope="module")
def edited(pack, pack_module, tiny):
    """Refined, then fused with three rank-2 LoRAs (preservation 0.5, lambda 0.05): what the erasure tests save."""
    model, clip = tiny
    bundle = random_bundle(pack_module, model, NAMES[:3], rank=2, seed=3)
    refined = pack[REFINE].execute(model, clip, "\n".join(NAMES[:3]), "celebrity", "", "", 1.0, 0.01).result[0]
    return refined, bundle, fuse(pack, refined, clip, bundle, "", 0.5, 0.05)


def test_fused_weights_are_the_least_squares_optimum(pack, pack_module, tiny, edited):
    """The node's W* equals a direct least-squares solve of the stacked objective on the real CLIP features."""
    model, clip = tiny
    refined, bundle, fused = edited
    s, lam = 0.5, 0.05
    host = mod(pack_module, "nodes.host")
    closed_form = mod(pack_module, "mace_core.closed_form")
    keys = host.cross_attention_keys(model)
    w0, wp, wf = (host.current_weights(m, keys, "cpu") for m in (model, refined, fused))
    xs = [features(host, clip, n, pack_module=pack_module) for n in NAMES[:3]]
    n_tok = sum(x.shape[0] for x in xs)
    gram = sum(x.T @ x for x in xs)
    prior = mod(pack_module, "nodes.refine").prior_for(clip, host.clip_encoder(clip)).double()
    prior_rows = torch.linalg.cholesky(s * n_tok * prior + 1e-12 * torch.eye(prior.shape[0], dtype=torch.float64)).T
    ridge = (lam * closed_form.ridge_scale(gram)) ** 0.5 * torch.eye(gram.shape[0], dtype=torch.float64)
    worst = 0.0
    for k in keys:
        rows = torch.cat(xs + [prior_rows, ridge])
        targets = torch.cat([x @ (wp[k].double() + lora.delta(k, torch.float64)).T for x, lora in zip(xs, bundle.loras)]
                            + [prior_rows @ wp[k].double().T, ridge @ wp[k].double().T])  # held to the input (W')
        direct = torch.linalg.lstsq(rows, targets).solution.T
        worst = max(worst, float((wf[k].double() - direct).norm() / (direct - wp[k].double()).norm()))
    print(f"fused vs stacked least squares: worst relative error of the update {worst:.2e}")
    assert worst < 1e-4


def test_only_kv_patched_concepts_recorded_and_cancel_leaves_nothing(pack, pack_module, tiny):
    import comfy.model_management as mm

    model, clip = tiny
    host = mod(pack_module, "nodes.host")
    bundle = random_bundle(pack_module, model, NAMES[:2])
    before, n_patches = snapshot(model), len(model.patches)
    out = fuse(pack, model, clip, bundle)
    assert sorted(out.patches) == host.cross_attention_keys(model)
    assert [r["concept"] for r in out.model_options["mace_erased"]] == NAMES[:2]
    assert "mace_erased" not in model.model_options and len(model.patches) == n_patches
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            fuse(pack, model, clip, bundle)
    finally:
        mm.interrupt_current_processing(False)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and len(model.patches) == n_patches


def test_bad_bundles_get_clear_errors(pack, pack_module, tiny):
    model, clip = tiny
    lb = mod(pack_module, "mace_core.lora_bundle")
    with pytest.raises(ValueError, match="input 'loras': the LoRA bundle is empty"):
        fuse(pack, model, clip, lb.LoRABundle([], ""))
    with torch.inference_mode():
        other = comfy_host.tiny_model(context_dim=128)
    with pytest.raises(ValueError, match="input 'loras'.*another model"):
        fuse(pack, model, clip, random_bundle(pack_module, other, NAMES[:1], base=""))
    with pytest.raises(ValueError, match="another base model"):
        fuse(pack, model, clip, random_bundle(pack_module, model, NAMES[:1], base="0123456789abcdef"))


# ---------------------------------------------------------------- erasure file


def stock_load(model, clip, name):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS["LoraLoader"]().load_lora(model, clip, name, 1.0, 1.0)[0]


def test_full_erasure_loads_with_stock_loader_to_the_same_weights(pack, pack_module, tiny, edited, loras_dir):
    model, clip = tiny
    host = mod(pack_module, "nodes.host")
    erased = edited[2]
    before = snapshot(erased)
    out = pack[ERASURE].execute(erased, "mace/erasure", "full", 64, None, "Vincent van Gogh => art")
    path = loras_dir / "mace" / "erasure.safetensors"
    assert path.is_file() and "erasure.safetensors" in out.ui.as_dict()["text"][0]
    loaded = stock_load(model, clip, "mace/erasure.safetensors")
    keys = host.cross_attention_keys(model)
    assert sorted(loaded.patches) == keys, "the stock loader patches exactly the cross-attention keys"
    a, b = host.current_weights(erased, keys, "cpu"), host.current_weights(loaded, keys, "cpu")
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in keys)
    print(f"stock LoraLoader vs in-graph model, full mode: worst relative weight difference {worst:.1e}")
    assert worst < 1e-6
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["mace_kind"] == "erasure" and meta["mace_base_model"] == host.model_fingerprint(model)
    recorded = json.loads(meta["mace_concepts"])
    assert [c["concept"] for c in recorded] == NAMES[:3] + ["Vincent van Gogh"]
    assert recorded[0]["anchor"] == "a person" and recorded[3]["anchor"] == "art"
    after = snapshot(erased)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_low_rank_erasure_error_is_measured_and_exact_at_full_rank(pack, pack_module, tiny, edited, loras_dir):
    model, clip = tiny
    host = mod(pack_module, "nodes.host")
    erased = edited[2]
    keys = host.cross_attention_keys(model)
    w0, target = host.current_weights(model, keys, "cpu"), host.current_weights(erased, keys, "cpu")
    errors = {}
    for rank in (4, 64):
        pack[ERASURE].execute(erased, f"erasure_r{rank}", "low rank", rank)
        with safe_open(str(loras_dir / f"erasure_r{rank}.safetensors"), "pt") as f:
            recorded = float(f.metadata()["mace_relative_error"])
        got = host.current_weights(stock_load(model, clip, f"erasure_r{rank}.safetensors"), keys, "cpu")
        num = sum(float((got[k] - target[k]).pow(2).sum()) for k in keys)
        den = sum(float((target[k] - w0[k]).pow(2).sum()) for k in keys)
        measured = (num / den) ** 0.5
        print(f"low rank {rank}: relative error of the erasure {measured:.4f} (recorded {recorded:.4f})")
        assert measured == pytest.approx(recorded, rel=1e-3, abs=1e-5)
        errors[rank] = measured
    assert errors[4] > 0.01 and errors[64] < 1e-5  # rank 64 >= every matrix's rank: exact


def test_unedited_model_and_bad_prefix_are_refused(pack, tiny, loras_dir):
    model, _ = tiny
    with pytest.raises(ValueError, match="no erasure to save"):
        pack[ERASURE].execute(model, "x", "full", 8)
    with pytest.raises(ValueError, match="outside models/loras"):
        pack[ERASURE].execute(model, "../../escape", "full", 8)


def test_refine_and_fuse_encode_a_preserve_list_once(pack, pack_module, tiny, monkeypatch):
    """Encoding the concepts to preserve is most of Refine's and Fuse's time with a long list (mass erasure); Fuse,
    given the list Refine had on the same CLIP, reuses its moment (TextEncoder.memo) and fuses to the same weights,
    bit for bit, as when it encodes the list itself."""
    host = mod(pack_module, "nodes.host")
    model, clip = tiny
    preserve = "\n".join(PRESERVE + ["Julia Roberts", "Denzel Washington"])
    enc = host.clip_encoder(clip)
    enc.memo.clear()
    encoded = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda prompts: encoded.extend(prompts) or real(prompts))
    with torch.inference_mode():
        refined = pack[REFINE].execute(model, clip, "\n".join(NAMES[:2]), "celebrity", "", preserve, 1.0,
                                       0.01).result[0]
        bundle = random_bundle(pack_module, refined, NAMES[:2], base=host.model_fingerprint(model))
        in_refine = set(encoded)
        encoded.clear()
        reused = snapshot(fuse(pack, refined, clip, bundle, preserve))
        assert not any("Julia Roberts" in p for p in encoded), "Fuse encoded the preserve list again"
        assert any("Julia Roberts" in p for p in in_refine)
        enc.memo.clear()
        encoded.clear()
        own = snapshot(fuse(pack, refined, clip, bundle, preserve))
        assert any("Julia Roberts" in p for p in encoded)
    assert reused.keys() == own.keys() and all(torch.equal(reused[k], own[k]) for k in own)


def test_a_long_preserve_list_moves_the_bar_and_a_cancel_inside_it_stops_refine(pack, pack_module, tiny, monkeypatch):
    """Encoding the concepts to preserve is most of Refine with a long list: the bar counts each preserved concept and
    ends full; a cancel pressed while they are encoded stops the node there (not after), with the model unchanged."""
    import comfy.model_management as mm
    import comfy.utils

    host = mod(pack_module, "nodes.host")
    model, clip = tiny
    preserve = PRESERVE + ["Julia Roberts", "Denzel Washington", "Cate Blanchett", "Keanu Reeves"]
    shown = []
    real_bar = comfy.utils.ProgressBar

    class Bar(real_bar):
        def update_absolute(self, value, total=None, preview=None):
            shown.append((value, self.total))
            super().update_absolute(value, total, preview)

    monkeypatch.setattr(comfy.utils, "ProgressBar", Bar)
    enc = host.clip_encoder(clip)
    with torch.inference_mode():
        enc.memo.clear()
        pack[REFINE].execute(model, clip, "\n".join(NAMES[:2]), "celebrity", "", "\n".join(preserve), 1.0, 0.01)
        assert shown[-1] == (1 + 2 + len(preserve),) * 2, shown
        enc.memo.clear()
        before, n_patches = snapshot(model), len(model.patches)
        encoded = []
        real = enc.encode
        monkeypatch.setattr(enc, "encode", lambda prompts: encoded.extend(prompts) or real(prompts))
        calls = comfy_host.interrupt_at_check(monkeypatch, 1 + 2 + 2)  # the prior, 2 concepts, 2 preserved
        try:
            with pytest.raises(mm.InterruptProcessingException):
                pack[REFINE].execute(model, clip, "\n".join(NAMES[:2]), "celebrity", "", "\n".join(preserve), 1.0,
                                     0.01)
        finally:
            mm.interrupt_current_processing(False)
    assert len(calls) == 5
    assert not any(preserve[-1] in p for p in encoded), "the cancel was only seen after the whole list"
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and len(model.patches) == n_patches
