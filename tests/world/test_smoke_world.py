"""A smoke-size world (seconds of training) must already be a working set of ComfyUI MODEL / CLIP / VAE."""

import time
from pathlib import Path

import pytest
import torch
from world_support import pack_import


def test_objects_are_comfyui_s_own(host, smoke_world):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.sd

    assert isinstance(smoke_world.model, comfy.model_patcher.ModelPatcher)
    assert isinstance(smoke_world.model.model, comfy.model_base.BaseModel)
    assert isinstance(smoke_world.clip, comfy.sd.CLIP)
    assert isinstance(smoke_world.vae, comfy.sd.VAE)
    keys = smoke_world.model.model_state_dict().keys()
    k = [x for x in keys if x.endswith("attn2.to_k.weight")]
    assert len(k) == 7 and all(x.startswith("diffusion_model.") for x in k)  # 2 down, 1 middle, 4 up


def test_build_is_deterministic(cw, smoke_world, tmp_path):
    store = pack_import("concept_world.store")
    again = cw.load_or_train(seed=3, preset="smoke", cache_dir=tmp_path)
    a, meta_a = store.load(smoke_world.path)
    b, meta_b = store.load(again.path)
    assert meta_a["spec"] == meta_b["spec"]
    for group in store.GROUPS:
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    other = store.load(cw.load_or_train(seed=4, preset="smoke", cache_dir=tmp_path).path)[0]
    assert not torch.equal(other["unet"]["input_blocks.0.0.weight"], a["unet"]["input_blocks.0.0.weight"])


def test_second_call_loads_from_the_file(cw, smoke_world, smoke_dir):
    world_mod = pack_import("concept_world.world")
    world_mod._cache.clear()
    t0 = time.perf_counter()
    again = cw.load_or_train(seed=3, preset="smoke", cache_dir=smoke_dir)
    assert time.perf_counter() - t0 < 15
    assert again is not smoke_world and again.path == smoke_world.path
    sd_a = smoke_world.model.model.diffusion_model.state_dict()
    sd_b = again.model.model.diffusion_model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert cw.load_or_train(seed=3, preset="smoke", cache_dir=smoke_dir) is again  # in-memory reuse


def test_a_world_trained_with_other_options_is_retrained(cw, smoke_world, tmp_path, monkeypatch, caplog):
    """A cached file of the same version but trained with a trial option (here the context-norm start) is not the
    world today's code trains: it is retrained, not loaded, and the new file records the options it was trained with."""
    import logging
    import shutil

    store = pack_import("concept_world.store")
    train = pack_import("concept_world.train")
    world_mod = pack_import("concept_world.world")
    path = tmp_path / Path(smoke_world.path).name
    shutil.copy(smoke_world.path, path)
    assert store.load(str(path))[1]["training"] == dict(train.OPTIONS_OFF, threads=1)
    monkeypatch.setattr(train, "CONTEXT_NORM", True)
    world_mod._cache.clear()
    with caplog.at_level(logging.WARNING):
        again = cw.load_or_train(seed=3, preset="smoke", cache_dir=str(tmp_path))
    assert any("retraining" in r.getMessage() and "context_norm" in r.getMessage() for r in caplog.records)
    assert store.load(again.path)[1]["training"]["context_norm"] is True
    world_mod._cache.clear()


def test_training_context_is_what_comfyui_encodes(smoke_world):
    nets = pack_import("concept_world.nets")
    clip = smoke_world.clip
    prompts = ["a photo of red lantern", "Alba Moreno", "art in dotwork style", ""]
    ids = torch.tensor([nets.token_ids(clip, p) for p in prompts])
    with torch.no_grad():
        ours = nets.encode_ids(clip, ids)
        comfy = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])
    assert ours.shape == comfy.shape == (4, 77, 64)
    assert torch.allclose(ours, comfy, atol=1e-5)


def test_samples_and_decodes_through_comfyui_nodes(host, smoke_world):
    import nodes

    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(smoke_world.clip, "a photo of red lantern")[0]
        neg = nodes.CLIPTextEncode().encode(smoke_world.clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
        out = nodes.common_ksampler(smoke_world.model, 7, 3, 5.0, "euler", "normal", pos, neg, latent)[0]
        images = nodes.VAEDecode().decode(smoke_world.vae, out)[0]
        again = nodes.VAEEncode().encode(smoke_world.vae, images)[0]["samples"]
    assert out["samples"].shape == (2, 4, 8, 8)
    assert images.shape == (2, 64, 64, 3) and torch.isfinite(images).all()
    assert again.shape == (2, 4, 8, 8)


def test_world_helpers_generate_and_classify(smoke_world):
    spec = smoke_world.spec
    ids = smoke_world.predict(["a photo of red lantern", "dotwork style"], seeds=[0, 1, 2], steps=3)
    assert ids.shape == (2, 3) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() <= spec.NONE
    # a prompt's image depends on its own seed only, not on what shares the batch
    one = smoke_world.sample(["dotwork style"], [2], steps=3)
    both = smoke_world.sample(["a photo of red lantern", "dotwork style"], [2], steps=3)
    assert torch.allclose(one[0], both[1], atol=1e-4)
    images = smoke_world.generate(["red lantern"], [0], steps=2)
    assert images.shape == (1, 1, 64, 64, 3)
    assert smoke_world.concept_masks(images, "red lantern").shape == (1, 1, 64, 64)
    assert smoke_world.concept_masks(images, "stipple style").min() == 1


def test_a_wider_world_carries_its_width(cw, tmp_path):
    """bench/eval_world.py --text-width: the text encoder and the UNet's context widen together, the file is named
    and described by its width, and loading it by path alone rebuilds the same networks."""
    world = cw.load_or_train(seed=3, preset="smoke", cache_dir=tmp_path, text_width=96)
    assert world.path.endswith("_smoke_text96_seed3.safetensors")
    assert world.metrics["preset"]["text_width"] == 96  # the width trained, not the preset's
    with torch.no_grad():
        ctx = world.clip.encode_from_tokens(world.clip.tokenize("a photo of red lantern"))
    assert ctx.shape == (1, 77, 96)
    to_k = [v for k, v in world.model.model_state_dict().items() if k.endswith("attn2.to_k.weight")]
    assert len(to_k) == 7 and all(w.shape[1] == 96 for w in to_k)
    again = cw.load(world.path)
    assert torch.equal(world.generate(["red lantern"], [0], steps=2), again.generate(["red lantern"], [0], steps=2))
    assert "_text" not in cw.load_or_train(seed=3, preset="smoke", cache_dir=tmp_path, text_width=64).path
    with pytest.raises(ValueError, match="multiple of 32"):
        cw.load_or_train(seed=3, preset="smoke", cache_dir=tmp_path, text_width=80)


def test_a_world_of_twenty_diffusion_steps_trains(cw):
    """PyTorch's OneCycleLR divides by zero when 5 % warm-up is exactly one step; such a preset still trains."""
    import dataclasses

    train = pack_import("concept_world.train")
    preset = dataclasses.replace(train.PRESETS["smoke"], name="twenty", diff_steps=20)
    taesd, base_model, clip, classifier, metrics = train.train_world(3, preset)
    assert base_model is not None and metrics is not None


def test_the_world_is_the_same_whatever_threads_the_caller_runs(cw):
    """The world trains on one thread whatever torch's setting (and the machine's load): another thread count sums in
    another order, which used to give the same seed another world. A file from before (no thread count recorded)
    counts as stale."""
    import dataclasses

    train = pack_import("concept_world.train")
    preset = dataclasses.replace(train.PRESETS["smoke"], name="threads", diff_steps=10, diff_batch=16)
    before = torch.get_num_threads()
    weights = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            _, base_model, _, _, _ = train.train_world(3, preset)
            weights.append({k: v.detach().clone() for k, v in base_model.diffusion_model.state_dict().items()})
            assert torch.get_num_threads() == n, "the caller's setting is restored"
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert train.training_options()["threads"] == 1 and "threads" not in train.OPTIONS_OFF


def test_the_key_value_start_trial_scales_only_those_weights_and_is_recorded_only_when_set(host, monkeypatch):
    """train.KEY_VALUE_STD (world E of docs/world_attention.md): the cross-attention key and value projections start at
    the given std from the same draws, every other weight as before; a world file names the option only when it is
    set, so the worlds trained before it existed stay current."""
    nets = pack_import("concept_world.nets")
    train = pack_import("concept_world.train")
    unet_config = nets.configs()[0]
    models = []
    for std in (None, 0.02):
        base = nets.new_base_model(unet_config)
        nets.init_unet_(base.diffusion_model, torch.Generator().manual_seed(1), std)
        models.append(base.diffusion_model.state_dict())
    plain, trial = models
    kv = [k for k in plain if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert kv and all(torch.equal(plain[k], trial[k]) for k in plain if k not in kv)
    for k in kv:
        assert torch.allclose(trial[k], plain[k] * 0.02 * plain[k].shape[1] ** 0.5)
        assert abs(float(trial[k].std()) - 0.02) < 0.005
    assert "key_value_std" not in train.training_options()
    monkeypatch.setattr(train, "KEY_VALUE_STD", 0.02)
    assert train.training_options()["key_value_std"] == 0.02
