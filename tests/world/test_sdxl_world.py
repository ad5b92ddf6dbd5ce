"""The SDXL-architecture concept world (smoke preset): ComfyUI's own SDXL objects, its own file, and the nodes on it."""

import pytest
import torch
from world_support import pack_import


def test_objects_are_comfyui_s_sdxl(host, sdxl_smoke_world, smoke_world):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip

    w = sdxl_smoke_world
    assert w.family == "sdxl" and smoke_world.family == "sd15"
    assert isinstance(w.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(w.model.model, comfy.model_base.SDXL)
    assert isinstance(w.clip, comfy.sd.CLIP) and isinstance(w.clip.cond_stage_model, comfy.sdxl_clip.SDXLClipModel)
    assert isinstance(w.vae, comfy.sd.VAE)
    sd = w.model.model_state_dict()
    to_k = [k for k in sd if k.endswith("attn2.to_k.weight")]
    assert len(to_k) == 7 and all(sd[k].shape[1] == 96 for k in to_k)  # context = clip_l 32 + clip_g 64
    assert sd["diffusion_model.label_emb.0.0.weight"].shape == (128, 64 + 1536)  # [pooled | six size embeddings]
    # its own file: the SD1.5 world's name (and version) are untouched
    assert "concept_world_sdxl_v2_smoke_seed3" in w.path and w.path != smoke_world.path
    store = pack_import("concept_world.store")
    assert store.load(w.path)[1]["family"] == "sdxl"
    assert store.VERSION == 6 and "_sdxl" not in smoke_world.path


def test_training_context_and_pooled_are_what_comfyui_encodes(sdxl_smoke_world):
    nets = pack_import("concept_world.nets")
    clip = sdxl_smoke_world.clip
    prompts = ["a photo of red lantern", "Alba Moreno", "art in dotwork style", ""]
    ids = {k: torch.tensor([nets.all_token_ids(clip, p)[k] for p in prompts]) for k in ("l", "g")}
    assert (ids["g"][:, -1] == 0).all() and (ids["l"][:, -1] == 49407).all()  # clip_g pads with 0, clip_l with end
    with torch.no_grad():
        ctx, pooled = nets.encode_sdxl(clip, ids)
        comfy = [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in prompts]
    assert ctx.shape == (4, 77, 96) and pooled.shape == (4, 64)
    assert torch.allclose(ctx, torch.cat([c for c, _ in comfy]), atol=1e-5)
    assert torch.allclose(pooled, torch.cat([p for _, p in comfy]), atol=1e-5)


def test_pooled_vector_reaches_the_unet(sdxl_smoke_world):
    """Sampling passes y = [pooled | size embeddings at 64 px]: the same context with another pooled vector draws
    something else (the road pooled editing closes)."""
    w = sdxl_smoke_world
    (c1, p1), (_, p2) = w.encode(["a photo of red lantern", "dotwork style"])
    y1 = w.model.model.encode_adm(pooled_output=p1, width=64, height=64)
    y2 = w.model.model.encode_adm(pooled_output=p2, width=64, height=64)
    assert y1.shape == (1, 64 + 1536) and torch.equal(y1[:, 64:], y2[:, 64:]) and not torch.equal(y1, y2)
    unet = w.model.model.diffusion_model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    with torch.no_grad():
        a, b = unet(x, t, context=c1, y=y1), unet(x, t, context=c1, y=y2)
    # the same computation but for y: any difference is the pooled vector's (a smoke world's is small, ~1e-4)
    assert (a - b).abs().max() > 1e-6


def test_samples_and_decodes_through_comfyui_nodes(host, sdxl_smoke_world):
    import nodes

    w = sdxl_smoke_world
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(w.clip, "a photo of red lantern")[0]
        neg = nodes.CLIPTextEncode().encode(w.clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
        out = nodes.common_ksampler(w.model, 7, 3, 3.0, "euler", "normal", pos, neg, latent)[0]
        images = nodes.VAEDecode().decode(w.vae, out)[0]
    assert out["samples"].shape == (2, 4, 8, 8)
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(images).all()
    # the same latents through the world's helper decode the same (its VAE scale matches SDXL's latent format)
    assert torch.allclose(w.decode(out["samples"]), images, atol=1e-5)


def test_world_reloads_identically(cw, sdxl_smoke_world):
    again = cw.load(sdxl_smoke_world.path)
    assert again.family == "sdxl"
    a = sdxl_smoke_world.generate(["red lantern"], [0], steps=2)
    assert torch.equal(a, again.generate(["red lantern"], [0], steps=2))
    with pytest.raises(ValueError, match="text_width"):
        cw.load_or_train(seed=3, preset="smoke", cache_dir="/nonexistent", family="sdxl", text_width=96)
    with pytest.raises(ValueError, match="family"):
        cw.load_or_train(seed=3, preset="smoke", cache_dir="/nonexistent", family="sd3")


def test_refine_train_fuse_nodes_run_on_it(sdxl_smoke_world):
    """The pack's three stages on the SDXL world: each returns a patched clone; the world's model is untouched."""
    ee = pack_import("concept_world.erasure_eval")
    w = sdxl_smoke_world
    before = {k: v.clone() for k, v in w.model.model_state_dict().items() if "attn2.to_" in k}
    settings = ee.Settings(steps=2, images=1)
    models = ee.erase(w, ["red lantern"], settings, pipelines=(ee.REFINE, ee.MACE))
    for name in (ee.REFINE, ee.MACE):
        m = models[name]
        assert m is not w.model and m.model is w.model.model
        assert any(k.endswith("attn2.to_k.weight") for k in m.patches)
    after = w.model.model_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not w.model.patches
    ids = w.predict(["a photo of red lantern"], [0], model=models[ee.MACE], steps=2)
    assert ids.shape == (1, 1)
