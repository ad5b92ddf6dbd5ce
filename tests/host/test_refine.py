"""The Refine Cross-Attention node inside a real ComfyUI, on tiny real models."""

import sys

import comfy_host
import pytest
import torch

NODE = "MACERefineCrossAttention"


def host_mod(pack_module):
    return sys.modules[pack_module.__name__ + ".nodes.host"]


def run(pack, model, clip, concepts="Claude Monet", concept_type="style", anchor="", preserve="",
        strength=1.0, lam=0.01):
    out = pack[NODE].execute(model, clip, concepts, concept_type, anchor, preserve, strength, lam)
    return out.result[0]


def snapshot(patcher_or_clip):
    sd = patcher_or_clip.get_sd() if hasattr(patcher_or_clip, "get_sd") else patcher_or_clip.model_state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_same(before, after):
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def kv_weights(host, patcher):
    keys = host.cross_attention_keys(patcher)
    return host.current_weights(patcher, keys), host.original_weights(patcher, keys)


def test_pack_loads_like_comfyui_and_node_has_schema(pack):
    cls = pack[NODE]
    schema = cls.define_schema()
    assert schema.display_name == "MACE Refine Cross-Attention" and schema.description
    assert all(i.tooltip for i in schema.inputs), "every input has a tooltip"


def test_only_attn2_kv_patched_and_inputs_unchanged(pack, pack_module, tiny):
    model, clip = tiny
    mb, cb = snapshot(model), snapshot(clip)
    n_patches_before = len(model.patches)
    out = run(pack, model, clip, "Claude Monet\nVincent van Gogh")
    host = host_mod(pack_module)
    keys = host.cross_attention_keys(model)
    assert len(keys) == 14
    assert sorted(out.patches) == keys, "exactly the attn2 to_k/to_v weights carry a patch"
    assert len(model.patches) == n_patches_before
    assert_same(mb, snapshot(model))
    assert_same(cb, snapshot(clip))


def residuals(host, clip, weights, originals, concept, anchor, templates):
    """|W e_old - W0 e_new| over aligned positions of the concept's prompts, summed over all layers."""
    from mace_core_ref import align_pairs

    enc = host.clip_encoder(clip)
    ids_o, e_o = enc.encode([t.format(concept) for t in templates])
    ids_n, e_n = enc.encode([t.format(anchor) for t in templates])
    total = 0.0
    for k in weights:
        w, w0 = weights[k].double(), originals[k].double()
        for j in range(len(templates)):
            io_, in_ = align_pairs(ids_o[j], ids_n[j], enc.end_id)
            total += float((e_o[j, io_].double() @ w.T - e_n[j, in_].double() @ w0.T).pow(2).sum())
    return total


@pytest.fixture(scope="module")
def mace_core_ref(pack_module):
    sys.modules["mace_core_ref"] = sys.modules[pack_module.__name__ + ".mace_core.align"]
    yield
    sys.modules.pop("mace_core_ref", None)


def _templates(pack_module):
    return sys.modules[pack_module.__name__ + ".mace_core.concepts"].TEMPLATES


def test_residual_falls_by_90_percent_without_preservation(pack, pack_module, mace_core_ref):
    # Width 128: a 64-wide random text encoder has too few directions for one linear map to absorb 30 templates.
    with torch.inference_mode():
        model, clip = comfy_host.tiny_model(context_dim=128), comfy_host.tiny_clip(width=128)
    host = host_mod(pack_module)
    out = run(pack, model, clip, "Claude Monet", "style", strength=0.0, lam=1e-4)
    tpl = _templates(pack_module)["style"]
    w_new, w0 = kv_weights(host, out)
    before = residuals(host, clip, w0, w0, "Claude Monet", "art", tpl)
    after = residuals(host, clip, w_new, w0, "Claude Monet", "art", tpl)
    assert after < 0.1 * before, (before, after)


def unrelated_change(host, clip, patched, prompts):
    enc = host.clip_encoder(clip)
    _, e = enc.encode(prompts)
    w_new, w0 = kv_weights(host, patched)
    num = sum(float((e.double() @ (w_new[k] - w0[k]).double().T).pow(2).sum()) for k in w0)
    den = sum(float((e.double() @ w0[k].double().T).pow(2).sum()) for k in w0)
    return (num / den) ** 0.5


def test_preservation_reduces_change_on_unrelated_prompts(pack, pack_module, tiny):
    model, clip = tiny
    host = host_mod(pack_module)
    prompts = ["a photo of a dog in the park", "a bowl of soup on a wooden table", "a portrait of a sailor",
               "a painting in the style of Rembrandt", "a red car on a mountain road"]
    off = unrelated_change(host, clip, run(pack, model, clip, "Claude Monet", strength=0.0), prompts)
    on = unrelated_change(host, clip, run(pack, model, clip, "Claude Monet", strength=1.0,
                                          preserve="Rembrandt\nPablo Picasso"), prompts)
    assert on < 0.8 * off, (on, off)
    typed = unrelated_change(host, clip, run(pack, model, clip, "Claude Monet", strength=1.0,
                                             preserve="Rembrandt | style\nPablo Picasso | celebrity"), prompts)
    assert typed < 0.8 * off and typed != on, (typed, on, off)  # a type picks that type's templates
    with pytest.raises(ValueError, match="input 'preserve'.*unknown concept type 'painter'"):
        run(pack, model, clip, "Claude Monet", preserve="Rembrandt | painter")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_and_determinism(pack, pack_module, dtype):
    with torch.inference_mode():
        model, clip = comfy_host.tiny_model(dtype=dtype), comfy_host.tiny_clip(dtype=dtype)
    before = snapshot(model)
    a = run(pack, model, clip, "Claude Monet")
    b = run(pack, model, clip, "Claude Monet")
    for k in a.patches:
        da, db = a.patches[k][0][1][1][0], b.patches[k][0][1][1][0]
        assert da.dtype == dtype and torch.isfinite(da.float()).all()
        assert torch.equal(da, db), "same input, same edit"
        assert da.abs().sum() > 0
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("concepts,anchor,fragment", [
    ("", "", "no concepts"),
    ("  \n ", "", "no concepts"),
    ("art", "", "same as its anchor"),
    ("Claude (Monet:1.3)", "", "prompt syntax"),
    (" ".join(["monet"] * 80), "", "exceeds"),
    ("Claude Monet", "(art)", "prompt syntax"),
])
def test_bad_input_gets_clear_error(pack, tiny, concepts, anchor, fragment):
    model, clip = tiny
    with pytest.raises(ValueError, match=fragment) as e:
        run(pack, model, clip, concepts, "style", anchor=anchor)
    assert "MACE: input '" in str(e.value)


def test_concept_that_tokenizes_to_nothing(pack_module, tiny):
    _, clip = tiny
    host = host_mod(pack_module)
    text = sys.modules[pack_module.__name__ + ".mace_core.text"]
    concepts = sys.modules[pack_module.__name__ + ".mace_core.concepts"]
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        text.check_concepts([concepts.Concept(" ", "a person", "celebrity")], host.clip_encoder(clip))


def test_model_without_cross_attention_is_refused(pack, tiny):
    _, clip = tiny
    with torch.inference_mode():
        bare = comfy_host.tiny_model(transformer_depth=0)
    with pytest.raises(ValueError, match="no UNet cross-attention"):
        run(pack, bare, clip)


def test_clip_of_another_width_is_refused(pack, tiny):
    model, _ = tiny
    with torch.inference_mode():
        wide = comfy_host.tiny_clip(width=96)
    with pytest.raises(ValueError, match="input 'clip'"):
        run(pack, model, wide)


def test_encoder_cache_does_not_keep_a_clip_alive(pack_module):
    import gc
    import weakref

    host = host_mod(pack_module)
    with torch.inference_mode():
        clip = comfy_host.tiny_clip()
    assert host.clip_encoder(clip) is host.clip_encoder(clip)
    ref = weakref.ref(clip)
    del clip
    gc.collect()
    assert ref() is None, "ComfyUI must be able to free a CLIP the pack has encoded with"
