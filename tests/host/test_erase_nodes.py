"""MACE Erase, MACE Erasure Check and MACE Attention Map inside a real ComfyUI, on tiny real models (CPU)."""

import copy
import sys

import comfy_host
import pytest
import torch

pytestmark = pytest.mark.usefixtures("unloaded")

IDS = ("MACEErase", "MACEErasureCheck", "MACEAttentionMap")


@pytest.fixture(scope="module")
def m(pack_module):
    """The new node modules as ComfyUI imported them."""
    import types

    name = pack_module.__name__
    return types.SimpleNamespace(**{k: sys.modules[f"{name}.nodes.{k}"] for k in
                                    ("erase", "check", "attention_map", "picture", "sampling", "refine", "host",
                                     "fuse")})


@pytest.fixture(scope="module")
def small(tiny, m):
    """The tiny model with the sampling hint a model gives for its usual picture size (64 px: 8x8 latents), so the
    full mode's training images stay small, as on the concept world."""
    model, clip = tiny
    with torch.inference_mode():
        hinted = model.clone()
        hinted.model_options[m.host.SAMPLING_HINT] = {"image_size": 64}
        vae = finite_vae()
    return hinted, clip, vae


def finite_vae(seed=0):
    """A TAESD VAE with every weight set (comfy_host.tiny_vae leaves ComfyUI's uninitialised ones, which decode to
    NaN): pictures a test can compare."""
    import comfy.sd
    import comfy.taesd.taesd

    net = comfy.taesd.taesd.TAESD(latent_channels=4)
    comfy_host._init_(net, seed)
    with torch.no_grad():
        net.vae_scale.fill_(1.0)
    return comfy.sd.VAE(sd=net.state_dict())


def state(patcher):
    comfy_host.unload_all()  # a loaded patched clone holds its patches in the shared weights until unloaded
    sd = {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    return sd, copy.deepcopy(patcher.model_options), {k: len(v) for k, v in patcher.patches.items()}


def assert_unchanged(patcher, before):
    sd, options, patches = state(patcher)
    assert sd.keys() == before[0].keys()
    assert all(torch.equal(sd[k], before[0][k]) for k in sd), "the input model's weights changed"
    assert options == before[1] and patches == before[2]
    assert not patcher.weight_wrapper_patches


def test_schemas(pack, m):
    for node_id in IDS:
        cls = pack[node_id]
        cls.VALIDATE_CLASS()
        s = cls.GET_SCHEMA()
        assert s.node_id == node_id and s.category == "MACE" and s.description
        assert all(i.tooltip for i in s.inputs), node_id
        assert all(o.tooltip for o in s.outputs), node_id
    refine_inputs = {i.id: i for i in pack["MACERefineCrossAttention"].GET_SCHEMA().inputs}
    erase = {i.id: i for i in pack["MACEErase"].GET_SCHEMA().inputs}
    for name in ("concepts", "concept_type", "anchor", "preserve", "preservation_strength", "lambda_",
                 "concept_file"):
        assert erase[name].tooltip == refine_inputs[name].tooltip, name
        assert getattr(erase[name], "default", None) == getattr(refine_inputs[name], "default", None), name
    assert erase["mode"].options == ["quick", "full"] and erase["mode"].default == "full"
    train = {i.id: i for i in pack["MACETrainConceptLoRA"].GET_SCHEMA().inputs}
    ids = [i.id for i in pack["MACEErase"].GET_SCHEMA().inputs]
    assert ids[-4:] == ["image_steps", "image_cfg", "image_sampler", "image_scheduler"], "new inputs go last"
    for name in ids[-4:]:  # the same settings as Train's, as Erase's full mode makes its images
        assert erase[name].default == train[name].default and erase[name].optional, name
        assert "quick" in erase[name].tooltip, name
    check = {i.id: i for i in pack["MACEErasureCheck"].GET_SCHEMA().inputs}
    assert check["cfg"].default == 7.0 and "3" in check["cfg"].tooltip
    assert check["image_size"].default == 0 and check["images_per_prompt"].default == 2
    assert [o.io_type for o in pack["MACEAttentionMap"].GET_SCHEMA().outputs] == ["IMAGE", "MASK"]


def test_quick_is_refinement_and_records_the_concepts(pack, m, small):
    model, clip, _ = small
    before = state(model)
    with torch.inference_mode():
        out = pack["MACEErase"].execute(model, clip, "Claude Monet", "style", "", "quick", "", 1.0, 0.01, 0).result[0]
        ref = m.refine.refine_model(model, clip, "Claude Monet", "style")
    keys = m.host.cross_attention_keys(model)
    w, w_ref, w0 = (m.host.current_weights(x, keys) for x in (out, ref, model))
    assert all(torch.equal(w[k], w_ref[k]) for k in keys), "quick mode is the Refine node at its defaults"
    assert any(not torch.equal(w[k], w0[k]) for k in keys)
    assert [e["concept"] for e in m.fuse.erased_concepts(out)] == ["Claude Monet"]
    assert m.fuse.erased_concepts(model) == []
    assert_unchanged(model, before)


def test_full_runs_three_stages_on_one_bar_and_leaves_the_model_alone(m, small):
    import comfy.utils

    model, clip, _ = small
    before = state(model)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        with torch.inference_mode():
            out = m.erase.erase_model(model, clip, "Claude Monet", "celebrity", mode="full", seed=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    with torch.inference_mode():
        quick = m.erase.erase_model(model, clip, "Claude Monet", "celebrity", mode="quick")
    keys = m.host.cross_attention_keys(model)
    w, wq = m.host.current_weights(out, keys), m.host.current_weights(quick, keys)
    assert any(not torch.allclose(w[k], wq[k]) for k in keys), "full mode must add the trained, fused LoRA"
    assert [e["concept"] for e in m.fuse.erased_concepts(out)] == ["Claude Monet"]
    totals = {t for _, t in seen}
    # paper settings for a celebrity: 50 steps; the paper's 30 sampler steps of images + masks; refine 2, fuse 3 units
    assert totals == {2 + (50 + 30 + 1) + 3}, totals
    values = [v for v, _ in seen]
    assert values == sorted(values), "one bar that never goes back"
    assert values[-1] == max(totals) and len(set(values)) > 30, "filled once, step by step"
    assert comfy.utils.PROGRESS_BAR_HOOK is None, "the caller's hook is back"
    assert_unchanged(model, before)


def test_cancel_in_training_changes_nothing(m, small, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, _ = small
    before = state(model)
    calls = comfy_host.interrupt_at_check(monkeypatch, 40)  # past refinement and the training images, inside training
    hook = comfy.utils.PROGRESS_BAR_HOOK
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            m.erase.erase_model(model, clip, "Claude Monet", "celebrity", mode="full")
    finally:
        mm.interrupt_current_processing(False)
    assert 40 <= len(calls) < 60
    assert comfy.utils.PROGRESS_BAR_HOOK is hook
    assert not any(lm.model.weight_wrapper_patches for lm in mm.current_loaded_models), "training clone unloaded"
    assert_unchanged(model, before)


@pytest.mark.parametrize("call,input_name", [
    (lambda m, a: m.erase.erase_model(*a[:2], "Claude Monet", mode="fast"), "mode"),
    (lambda m, a: m.erase.erase_model(*a[:2], "", "celebrity", mode="quick"), "concepts"),
    (lambda m, a: m.erase.erase_model(*a[:2], "Claude Monet", image_sampler="nope"), "image_sampler"),
    (lambda m, a: m.erase.erase_model(*a[:2], "Claude Monet", image_cfg=-2.0), "image_cfg"),
    (lambda m, a: m.check.erasure_check(a[0], a[0], a[1], a[2], "", "celebrity"), "concepts"),
    (lambda m, a: m.check.erasure_check(a[0], a[0], a[1], a[2], "x", images_per_prompt=0), "images_per_prompt"),
    (lambda m, a: m.check.erasure_check(a[0], a[0], a[1], a[2], "x", image_size=60), "image_size"),
    (lambda m, a: m.check.erasure_check(a[0], a[0], a[1], a[2], "x", sampler_name="nope"), "sampler_name"),
    (lambda m, a: m.attention_map.attention_map(a[0], a[0], a[1], a[2], "x", tokens="all"), "tokens"),
    (lambda m, a: m.attention_map.attention_map(a[0], a[0], a[1], a[2], "x\ny",
                                                latents={"samples": torch.zeros(3, 4, 8, 8)}), "latents"),
])
def test_bad_input_names_the_input(m, small, mods, call, input_name):
    with torch.inference_mode(), pytest.raises(mods.errors.MaceInputError, match=f"input '{input_name}'"):
        call(m, small)


def test_check_grid_same_seeds_on_both_models(pack, m, small):
    model, clip, vae = small
    with torch.inference_mode():
        erased = m.erase.erase_model(model, clip, "Claude Monet", "style", mode="quick")
        r = m.check.erasure_check(model, erased, clip, vae, "", "style", other_prompts="a painting by Monet",
                                  preserve="Rembrandt\nPablo Picasso | celebrity", seed=5, images_per_prompt=3,
                                  steps=4, cfg=3.0)
        node = pack["MACEErasureCheck"].execute(model, erased, clip, vae, "", "style", "", "a painting by Monet",
                                                "Rembrandt\nPablo Picasso | celebrity", 5, 3, 4, 3.0, "euler",
                                                "normal", 0, "").result[0]
        # the erased concept came from the erased model's record: the box was blank
        assert [row.label for row in r.rows] == [
            "erased: a painting in the style of Claude Monet", "other: a painting by Monet",
            "preserved: a painting in the style of Rembrandt", "preserved: a photo of Pablo Picasso"]
        assert r.seeds == [5, 6, 7]
        assert r.col_labels == [f"{w}, seed {s}" for w in ("before", "after") for s in (5, 6, 7)]
        assert r.cells.shape == (4, 6, 64, 64, 3)
        assert torch.equal(node, r.image), "the node gives the function's grid; same seeds, same pictures"
        # the column 'before, seed 6' is what seed 6 alone gives on the original model
        alone = m.sampling.decode(vae, m.sampling.Sampler(clip, 4, 3.0, size=64).latents(
            model, "a photo of Pablo Picasso", [6]))[0]
    assert torch.allclose(r.cells[3, 1], alone, atol=1e-4)
    assert torch.isfinite(r.cells).all()
    assert not torch.allclose(r.cells[0, 0], r.cells[0, 3], atol=1e-3), "the erased row changed"
    assert r.image.shape == (1,) + r.layout.size + (3,)


def test_attention_map_mechanics(pack, m, small):
    model, clip, vae = small
    with torch.inference_mode():
        erased = m.erase.erase_model(model, clip, "Claude Monet\nred lantern | object", "celebrity", mode="quick")
        same = m.attention_map.attention_map(model, model, clip, vae, "Claude Monet", steps=3, cfg=3.0)
        r = m.attention_map.attention_map(model, erased, clip, vae, "Claude Monet\nred lantern | object", steps=3,
                                          cfg=3.0, seed=2)
        image, mask = pack["MACEAttentionMap"].execute(model, erased, clip, vae, "Claude Monet\nred lantern | object",
                                                       "celebrity", "", "concept words", True, 2, 3, 3.0, "euler",
                                                       "normal", 0).result
    assert torch.equal(same.heat[:, 0], same.heat[:, 1]) and same.mass[0, 0] == same.mass[0, 1]
    assert r.image.shape == (1,) + r.layout.size + (3,) and (r.layout.rows, r.layout.cols) == (2, 4)
    assert torch.equal(image, r.image) and torch.equal(mask, r.masks)
    assert mask.shape == (2, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < float(mask.mean()) < 1
    assert not torch.equal(r.heat[:, 0], r.heat[:, 1]), "refinement changes where the words are attended"
    assert (r.mass > 0).all()


def test_heat_colours_brighten_with_attention_and_labels_fit(m):
    pic = m.picture
    lum = pic.luminance(pic.heat_colors(torch.linspace(0, 1, 101)))
    assert (lum[1:] > lum[:-1]).all(), "brighter always means more attention (the world test reads it so)"
    lines = pic.wrap("erased: a photo of a very long concept name that goes on and on", 100, 2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert all(pic.font().getlength(s) <= 100 for s in lines)
    with pytest.raises(ValueError, match="1 row and 2 column labels"):
        pic.grid(torch.zeros(2, 2, 8, 8, 3), ["a"], ["b", "c"])
