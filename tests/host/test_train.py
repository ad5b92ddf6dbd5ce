"""The Train Concept LoRA node inside a real ComfyUI, on tiny real models (CPU, 8x8 latents)."""

import copy
import logging

import comfy_host  # noqa: F401  (conftest boots the host)
import pytest
import torch

NODE = "MACETrainConceptLoRA"

pytestmark = pytest.mark.usefixtures("unloaded")
log = logging.getLogger("MACE.test")


def snapshot(patcher):
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}


def assert_untouched(patcher, before, options_before, patches_before):
    after = patcher.model_state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert patcher.model_options == options_before, "no patch leaked into the input model's options"
    assert {k: len(v) for k, v in patcher.patches.items()} == patches_before
    assert not patcher.weight_wrapper_patches
    for m in patcher.model.diffusion_model.modules():
        assert not m.__dict__.get("weight_function") and not m.__dict__.get("bias_function"), "wrappers left behind"


def state(patcher):
    return snapshot(patcher), copy.deepcopy(patcher.model_options), {k: len(v) for k, v in patcher.patches.items()}


def lora_tensors(bundle):
    return {(lora.concept, k, part): t for lora in bundle.loras for part, d in (("up", lora.up), ("down", lora.down))
            for k, t in d.items()}


def test_schema(pack):
    cls = pack[NODE]
    s = cls.define_schema()
    assert s.display_name == "MACE Train Concept LoRA" and s.category == "MACE" and s.description
    names = [i.id for i in s.inputs]
    # Inputs only ever get appended, so saved workflows keep loading.
    assert names[:16] == ["model", "clip", "concepts", "concept_type", "anchor", "steps", "learning_rate", "rank",
                          "seed", "timestep_sampling", "images_per_concept", "mask_source", "latents", "mask",
                          "image_size", "image_model"]
    assert names[16:] == ["concept_file", "resume_folder", "settings", "batch", "concept_list", "image_steps",
                          "image_cfg", "image_sampler", "image_scheduler"]
    assert all(i.tooltip for i in s.inputs)
    assert [i.optional for i in s.inputs][-10:] == [True] * 10
    defaults = {i.id: getattr(i, "default", None) for i in s.inputs}
    assert (defaults["steps"], defaults["learning_rate"], defaults["rank"], defaults["images_per_concept"]) == \
        (50, 1e-4, 1, 8)
    # the paper's images: 30 DPM-Solver++ steps at guidance 7.5 (MACE.md)
    assert [defaults[k] for k in names[-4:]] == [30, 7.5, "dpmpp_2m", "normal"]
    assert all("Ignored when latents are connected." in i.tooltip for i in s.inputs[-4:])
    batch = s.inputs[-6]
    assert (batch.default, batch.min) == (0, 0) and "automatic" in batch.tooltip
    settings = s.inputs[-7]
    assert settings.options == ["per type (paper)", "custom"] and settings.default == "per type (paper)"
    # the presets are shown where the choice is made
    assert "explicit: lr 1e-5, 120 steps, uniform timesteps" in settings.tooltip and "custom" in settings.tooltip
    bounds = {i.id: (i.min, i.max) for i in s.inputs if i.id in ("steps", "learning_rate")}
    assert bounds == {"steps": (1, 10000), "learning_rate": (1e-7, 0.1)}
    assert [o.display_name for o in s.outputs] == ["loras", "model", "loss_curve"]
    assert s.outputs[0].io_type == "MACE_LORAS"


def _data(mods, model, clip, concept, count=2, seed=0):
    att = mods.att
    lat = att.generate_latents(model, clip, att.data_template(concept).format(concept.name), count, 64, seed=seed)
    end_id = mods.host.clip_encoder(clip).end_id
    prompt = att.concept_prompts(clip, concept, [att.data_template(concept)], end_id)[0]
    return lat, att.derive_masks(model, prompt, lat, seed=seed)


def _mass(mods, model, prompts, lat, mask, timesteps):
    att = mods.att
    vals = [att.concept_attention_mass(model, att.Prompt(p.text, p.ids, p.cond, p.pooled, p.words, p.words),
                                       lat, mask, timesteps, seed=123) for p in prompts]
    return sum(vals) / len(vals)


def test_training_halves_concept_attention_inside_the_mask(mods, tiny):
    model, clip = tiny
    before = state(model)
    att = mods.att
    concept = mods.concepts.parse_concepts("Claude Monet", "celebrity")[0]
    end_id = mods.host.clip_encoder(clip).end_id
    with torch.inference_mode():
        lat, mask = _data(mods, model, clip, concept)
        assert lat.shape == (2, 4, 8, 8) and mask.shape == (2, 8, 8)
        assert 0.1 < float(mask.mean()) < 0.9, "attention-derived mask picks a region, not all or nothing"
        # prompts and timesteps the training never draws (not in the templates; off the sampled grid by noise seed)
        held_out = att.concept_prompts(clip, concept, ["a watercolor portrait of {}", "{} standing in a garden"],
                                       end_id)
        unrelated_c = mods.concepts.parse_concepts("a red car", "object")[0]
        unrelated = att.concept_prompts(clip, unrelated_c, ["a photo of {}", "{} parked in the street"], end_id)
        timesteps = (150, 250, 350, 450, 650)
        whole = torch.ones_like(mask)
        m0, u0 = _mass(mods, model, held_out, lat, mask, timesteps), _mass(mods, model, unrelated, lat, whole,
                                                                            timesteps)
        bundle, out, curves = mods.train.train_concept_loras(
            # the paper's start moves a rank-1 update along a nearly fixed random input direction; on this 64-wide
            # random model halving the mass takes more steps than the uniform start needed (30)
            model, clip, "Claude Monet", "celebrity", steps=60, learning_rate=5e-2, seed=0,
            latents={"samples": lat}, mask=mask, mask_source="given")
        assert_untouched(model, *before)  # before measuring `out`, which patches the shared module while loaded
        m1, u1 = _mass(mods, out, held_out, lat, mask, timesteps), _mass(mods, out, unrelated, lat, whole, timesteps)
    log.info("held-out concept attention mass in mask: %.4f -> %.4f (x%.2f); unrelated prompt words: %.4f -> %.4f "
             "(%+.0f%%)", m0, m1, m1 / m0, u0, u1, 100 * (u1 / u0 - 1))
    print(f"\nconcept mass {m0:.4f} -> {m1:.4f} (x{m1 / m0:.2f}); unrelated {u0:.4f} -> {u1:.4f} "
          f"({100 * (u1 / u0 - 1):+.0f}%)")
    assert m1 <= 0.5 * m0
    losses = curves["Claude Monet"]
    assert len(losses) == 60 and losses[-1] < losses[0]
    keys = mods.host.cross_attention_keys(model)
    assert len(keys) == 14 and sorted(out.patches) == keys
    lora = bundle.loras[0]
    assert (lora.concept, lora.anchor, lora.concept_type, lora.rank, lora.steps) == \
        ("Claude Monet", "a person", "celebrity", 1, 60)
    assert lora.keys == keys and lora.meta["mask_source"] == "given"
    assert bundle.base == mods.host.model_fingerprint(model)


def test_node_under_inference_mode_is_seeded_and_leaves_model_alone(pack, mods, tiny):
    model, clip = tiny
    before = state(model)
    node = pack[NODE]
    args = dict(model=model, clip=clip, concepts="Claude Monet\nVincent van Gogh", concept_type="style", anchor="",
                steps=2, learning_rate=1e-2, rank=2, seed=5, timestep_sampling="importance", images_per_concept=2,
                mask_source="attention", image_size=64)
    with torch.inference_mode():  # as the executor runs it
        runs = [node.execute(**args).result for _ in range(2)]
        other = node.execute(**{**args, "seed": 6}).result
    (b1, m1, img), (b2, _, _) = runs
    assert isinstance(b1, mods.bundle.LoRABundle) and b1.concepts == ["Claude Monet", "Vincent van Gogh"]
    t1, t2, t3 = lora_tensors(b1), lora_tensors(b2), lora_tensors(other[0])
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1), "same seed, same LoRA"
    assert any(not torch.equal(t1[k], t3[k]) for k in t1), "another seed, another LoRA"
    assert all(lora.rank == 2 and lora.up[lora.keys[0]].shape[1] == 2 for lora in b1.loras)
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert sorted(m1.patches) == mods.host.cross_attention_keys(model)
    assert_untouched(model, *before)


def test_image_model_makes_the_training_data(pack, mods, tiny):
    """With image_model connected, images and masks come from it (the original model), training from `model`."""
    model, clip = tiny
    with torch.inference_mode():
        other = comfy_host.tiny_model(seed=3)
    before = state(other)
    args = dict(model=model, clip=clip, concepts="Claude Monet", concept_type="style", anchor="", steps=2,
                learning_rate=1e-2, rank=1, seed=5, timestep_sampling="importance", images_per_concept=2,
                mask_source="attention", image_size=64)
    with torch.inference_mode():
        own = pack[NODE].execute(**args).result[0]
        same = pack[NODE].execute(**args, image_model=model).result[0]
        other_data = pack[NODE].execute(**args, image_model=other).result[0]
    t_own, t_same, t_other = lora_tensors(own), lora_tensors(same), lora_tensors(other_data)
    assert all(torch.equal(t_own[k], t_same[k]) for k in t_own), "image_model=model is the default"
    assert any(not torch.equal(t_own[k], t_other[k]) for k in t_own), "another image model, other data"
    assert_untouched(other, *before)


def test_training_starts_from_current_weights(mods, tiny):
    """The training clone computes with the incoming MODEL's patches (e.g. the refined model's), not the originals."""
    model, clip = tiny
    att, host = mods.att, mods.host
    keys = host.cross_attention_keys(model)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        deltas = {k: torch.randn(host.original_weights(model, [k])[k].shape, generator=g) for k in keys}
        refined = host.with_deltas(model, deltas)
        before, before_r = state(model), state(refined)
        concept = mods.concepts.parse_concepts("Claude Monet", "celebrity")[0]
        prompt = att.concept_prompts(clip, concept, ["a photo of {}"], host.clip_encoder(clip).end_id)[0]
        x0 = torch.randn(1, 4, 8, 8, generator=g)
        noise = torch.randn(1, 4, 8, 8, generator=g)
        t = torch.tensor([300])

        def out(patcher):
            probe = att.AttentionProbe()
            clone = att.probed_clone(patcher, probe)
            att.mm.load_models_gpu([clone])
            return att.denoise_forward(clone, x0, noise, t, att.model_conds(clone, prompt, x0.shape, "cpu"))

        ref, plain = out(refined), out(model)
    with torch.inference_mode(False), torch.enable_grad():
        tm = att.TrainableModel(refined, keys)
        try:
            tm.load()
            got = att.denoise_forward(tm.patcher, x0.clone(), noise.clone(), t.clone(),
                                      {k: v.clone() for k, v in att.model_conds(tm.patcher, prompt, x0.shape,
                                                                                 "cpu").items()})
        finally:
            tm.release()
    assert not torch.allclose(ref, plain, atol=1e-4), "the patches matter"
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert_untouched(model, *before)
    assert_untouched(refined, *before_r)


def test_half_precision_model_trains_in_fp32_and_stays_unchanged(mods):
    with torch.inference_mode():
        model, clip = comfy_host.tiny_model(dtype=torch.float16), comfy_host.tiny_clip()
        before = state(model)
        bundle, _, curves = mods.train.train_concept_loras(
            model, clip, "Claude Monet", "celebrity", steps=3, learning_rate=1e-2,
            latents={"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))},
            mask_source="whole image")
    losses = curves["Claude Monet"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] != losses[0]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in lora_tensors(bundle).values())
    assert model.model.manual_cast_dtype is None, "the compute-dtype object patch was undone"
    assert_untouched(model, *before)


def test_cancel_mid_run_raises_comfy_interrupt_and_changes_nothing(mods, tiny, monkeypatch):
    import comfy.model_management as mm

    model, clip = tiny
    before = state(model)
    calls = comfy_host.interrupt_at_check(monkeypatch, 5)
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            mods.train.train_concept_loras(model, clip, "Claude Monet", "celebrity", steps=20, learning_rate=1e-2,
                                           latents=lat, mask_source="whole image")
    finally:
        mm.interrupt_current_processing(False)
    assert 5 <= len(calls) < 20, "stopped mid-training"
    assert not any(lm.model.weight_wrapper_patches for lm in mm.current_loaded_models), "training clone unloaded"
    assert_untouched(model, *before)


def test_image_size_zero_follows_the_models_sampling_hint(mods, tiny, monkeypatch):
    """image_size 0 makes training images at the model's own size: the hint a model carries (the concept world says
    64 px) over its family's (SD1.5's 512, 64x the pixels and off what the world learned)."""
    model, clip = tiny
    real, latents = mods.att.generate_latents_batch, []
    monkeypatch.setattr(mods.att, "generate_latents_batch",
                        lambda *a, **k: latents.extend(real(*a, **k)) or latents[-1:])
    with torch.inference_mode():
        hinted = model.clone()
        hinted.model_options[mods.host.SAMPLING_HINT] = {"image_size": 64}
        assert mods.host.default_image_size(model) == 512 and mods.host.default_image_size(hinted) == 64
        mods.train.train_concept_loras(hinted, clip, "Claude Monet", "style", steps=1, images_per_concept=1,
                                       settings="custom")
    assert [tuple(lat.shape[-2:]) for lat in latents] == [(8, 8)], "64 px images: 8x8 latents"


@pytest.mark.parametrize("batch", [1, 0])
def test_progress_covers_image_generation_masks_and_training(mods, tiny, batch):
    """The bar moves while the training images are sampled (each sampler step), after each concept's masks and at
    every training step, and ends exactly full: a user sees the long phases move, not a bar stuck at zero. A batch
    of concepts moves it by one unit per concept at each step (batch 0: both concepts in one batch here)."""
    import comfy.utils

    model, clip = tiny
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        with torch.inference_mode():
            mods.train.train_concept_loras(model, clip, "Claude Monet\nVincent van Gogh", "style", steps=3,
                                           learning_rate=1e-2, images_per_concept=1, image_size=64,
                                           mask_source="attention", settings="custom", batch=batch)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    gen = mods.att.GEN_STEPS
    total = 2 * (gen + 1 + 3)
    assert seen and all(t == total for _, t in seen), seen[:3]
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[-1] == total
    per = 1 if batch == 1 else 2
    assert values[:gen] == list(range(per, per * gen + 1, per)), "each sampler step of the first images shows"
    assert len(values) == (2 // per) * (gen + 1 + 3), "one update per sampler step, mask batch and training step"


@pytest.mark.parametrize("kwargs,input_name", [
    (dict(latents={"samples": torch.zeros(3, 4, 8, 8)}), "latents"),
    (dict(latents={"samples": torch.zeros(4, 3, 8, 8)}), "latents"),
    (dict(latents={"samples": torch.zeros(4, 4, 8, 8)}, mask=torch.ones(3, 8, 8)), "mask"),
    (dict(latents={"samples": torch.zeros(4, 4, 8, 8)}, mask=torch.ones(4, 8, 16)), "mask"),
    (dict(mask=torch.ones(4, 8, 8)), "mask"),
    (dict(mask_source="given"), "mask"),
    (dict(steps=0), "steps"),
    (dict(steps=10001), "steps"),
    (dict(learning_rate=0.5), "learning_rate"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(settings="paper"), "settings"),
    (dict(images_per_concept=0), "images_per_concept"),
    (dict(timestep_sampling="cosine"), "timestep_sampling"),
    (dict(concepts=""), "concepts"),
    (dict(image_steps=0), "image_steps"),
    (dict(image_cfg=-1.0), "image_cfg"),
    (dict(image_sampler="dpm_turbo_9000"), "image_sampler"),
    (dict(image_scheduler="cosine"), "image_scheduler"),
])
def test_bad_input_names_the_input(mods, tiny, kwargs, input_name):
    model, clip = tiny
    args = dict(concepts="Claude Monet\nVincent van Gogh", concept_type="celebrity", steps=2)
    args.update(kwargs)
    with torch.inference_mode(), pytest.raises(mods.errors.MaceInputError) as e:
        mods.train.train_concept_loras(model, clip, **args)
    assert e.value.input_name == input_name and f"'{input_name}'" in str(e.value)


# ---------------------------------------------------------------- the paper's settings per type

MIXED = "Claude Monet | style\na red car | object\nnudity | explicit"


def _lat(n, seed=4):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def test_mixed_list_trains_each_concept_with_its_types_preset(mods, tiny, caplog):
    model, clip = tiny
    before = state(model)
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="MACE"):
        bundle, _, curves = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", latents=_lat(3),
                                                           mask_source="whole image")
    got = {lora.concept: (lora.meta["learning_rate"], lora.steps, lora.meta["timestep_sampling"], lora.concept_type)
           for lora in bundle.loras}
    assert got == {"Claude Monet": (1e-4, 50, "importance", "style"),
                   "a red car": (1e-5, 50, "importance", "object"),
                   "nudity": (1e-5, 120, "uniform", "explicit")}
    assert [len(curves[c]) for c in bundle.concepts] == [50, 50, 120], "each trained its own number of steps"
    # the log says what each concept used, and where each value came from
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MACE train: '")]
    assert "MACE train: 'a red car' (object): lr 1e-5 (paper object), 50 steps (paper object), importance " \
           "timesteps (paper object)" in lines
    assert any(line.startswith("MACE train: 'nudity' (explicit): lr 1e-5 (paper explicit), 120 steps")
               for line in lines)
    assert_untouched(model, *before)


def test_typed_values_win_over_the_preset_and_custom_uses_the_inputs(mods, tiny, caplog):
    model, clip = tiny
    common = dict(latents=_lat(3), mask_source="whole image", steps=3)
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="MACE"):
        typed, _, _ = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", learning_rate=2e-2, **common)
        custom, _, _ = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", settings="custom", **common)
    assert {(lora.meta["learning_rate"], lora.steps) for lora in typed.loras} == {(2e-2, 3)}
    assert [lora.meta["timestep_sampling"] for lora in typed.loras] == ["importance", "importance", "uniform"], \
        "left at its default, the timestep choice is still the type's"
    assert {(lora.meta["learning_rate"], lora.steps, lora.meta["timestep_sampling"]) for lora in custom.loras} == \
        {(1e-4, 3, "importance")}, "custom: the inputs for every concept, explicit included"
    assert any("'nudity' (explicit): lr 2e-2 (input), 3 steps (input), uniform timesteps (paper explicit)"
               in r.getMessage() for r in caplog.records)
    # the learning rate really is the one used: a larger one moves the LoRA further
    small, _, _ = mods.train.train_concept_loras(model, clip, "a red car", "object", latents=_lat(1), steps=3,
                                                 mask_source="whole image")
    big = next(lora for lora in typed.loras if lora.concept == "a red car")
    assert small.loras[0].meta["learning_rate"] == 1e-5
    k = small.loras[0].keys[0]
    assert float(big.up[k].norm()) > 100 * float(small.loras[0].up[k].norm()) > 0


def test_explicit_type_without_names_erases_the_papers_list(mods, tiny):
    model, clip = tiny
    with torch.inference_mode():
        bundle, _, curves = mods.train.train_concept_loras(model, clip, "", "explicit", latents=_lat(4), steps=2,
                                                           mask_source="whole image")
    assert bundle.concepts == ["nudity", "naked", "erotic", "sexual"]
    assert {lora.anchor for lora in bundle.loras} == {"a person wearing clothes"}
    assert {lora.meta["learning_rate"] for lora in bundle.loras} == {1e-5} and all(len(c) == 2 for c in curves.values())


def _widget_names(schema):
    """The frontend's widget order: every input shown as a widget, seed followed by its control_after_generate."""
    names = []
    for i in schema.inputs:
        if i.get_io_type() in ("INT", "FLOAT", "STRING", "COMBO", "BOOLEAN"):
            names.append(i.id)
            if getattr(i, "control_after_generate", False):
                names.append("control_after_generate")
    return names


# widgets_values of the Train node as saved before `settings` existed (workflows/train_concept_lora.json at the
# commit before it), and an older run's with a typed learning rate
SAVED = ["Claude Monet", "style", "", 50, 0.0001, 1, 42, "fixed", "importance", 8, "auto", 0, "", ""]


def test_saved_workflows_keep_loading_and_keep_their_values(pack, mods, tiny):
    import asyncio

    import execution

    schema = pack[NODE].define_schema()
    names = _widget_names(schema)
    assert names[:len(SAVED)] == ["concepts", "concept_type", "anchor", "steps", "learning_rate", "rank", "seed",
                                  "control_after_generate", "timestep_sampling", "images_per_concept",
                                  "mask_source", "image_size", "concept_file", "resume_folder"], \
        "the frontend assigns saved values by position: every old widget keeps its place"
    assert names[len(SAVED):] == ["settings", "batch", "image_steps", "image_cfg", "image_sampler", "image_scheduler"]
    for values, lr in ((SAVED, 1e-4), (SAVED[:4] + [1e-2] + SAVED[5:], 1e-2)):
        inputs = {n: v for n, v in zip(names, values) if n != "control_after_generate"}
        inputs.update(model=["1", 0], clip=["1", 1])
        # an API graph saved then: ComfyUI's own validation accepts it without the new input
        prompt = {"1": {"class_type": "MACEConceptWorld", "inputs": {"seed": 0}},
                  "2": {"class_type": NODE, "inputs": inputs}}
        ok, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "2", {}))
        assert ok, errors
        model, clip = tiny
        args = {k: v for k, v in inputs.items() if k not in ("model", "clip")}
        args.update(latents=_lat(1))  # the training images given, so the saved 8 are not generated
        with torch.inference_mode():
            bundle = pack[NODE].execute(model=model, clip=clip, **{**args, "mask_source": "whole image"}).result[0]
        lora = bundle.loras[0]
        assert (lora.concept, lora.concept_type, lora.meta["learning_rate"], lora.steps) == \
            ("Claude Monet", "style", lr, 50), "a saved workflow trains as it says; a typed value stays"
        assert lora.meta["settings"] == "per type (paper)"


# ---------------------------------------------------------------- how the training images are made

def _image_run(mods, model, clip, seen, **image):
    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append(total))
    try:
        with torch.inference_mode():
            bundle, _, _ = mods.train.train_concept_loras(model, clip, "Claude Monet", "celebrity", steps=2,
                                                          learning_rate=1e-2, images_per_concept=2, image_size=64,
                                                          mask_source="attention", settings="custom", **image)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    return bundle.loras[0]


def test_image_settings_make_the_training_images(mods, tiny):
    """image_steps, image_cfg, image_sampler and image_scheduler reach the sampler that makes the images: the bar
    counts the steps asked for, other settings give other data and so other LoRAs, and an API graph that leaves the
    inputs out gets the paper's settings."""
    model, clip = tiny
    before = snapshot(model)
    seen = {k: [] for k in ("none", "defaults", "other")}
    plain = _image_run(mods, model, clip, seen["none"])
    same = _image_run(mods, model, clip, seen["defaults"], image_steps=30, image_cfg=7.5, image_sampler="dpmpp_2m",
                      image_scheduler="normal")
    other = _image_run(mods, model, clip, seen["other"], image_steps=4, image_cfg=2.0, image_sampler="euler",
                       image_scheduler="karras")
    assert set(seen["none"]) == set(seen["defaults"]) == {30 + 1 + 2}
    assert set(seen["other"]) == {4 + 1 + 2}, "the bar counts the sampler steps asked for"
    for k in plain.keys:
        assert torch.equal(plain.up[k], same.up[k]) and torch.equal(plain.down[k], same.down[k])
    assert any(not torch.allclose(plain.up[k], other.up[k]) for k in plain.keys), "other images, another LoRA"
    after = model.model_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_sampler_that_draws_noise_makes_each_concepts_images_alone(mods, tiny):
    """An ancestral sampler draws noise at every step from the run's seed, so one run for several concepts would give
    each concept images that depend on the batch. Such a sampler makes each concept's images in a run of its own:
    concept i's images still depend only on its seed."""
    model, clip = tiny
    att = mods.att
    texts, seeds = ["a photo of Tom Hanks", "a photo of a red car", "a painting by Claude Monet"], [5, 6, 7]
    ancestral = att.ImageSampling(steps=4, cfg=5.0, sampler="euler_ancestral")
    assert not ancestral.batchable() and att.ImageSampling().batchable()
    with torch.inference_mode():
        alone = [att.generate_latents(model, clip, t, 2, 64, s, sampling=ancestral) for t, s in zip(texts, seeds)]
        steps = []
        batched = att.generate_latents_batch(model, clip, texts, 2, 64, seeds, on_step=steps.append, sampling=ancestral)
        euler = att.generate_latents(model, clip, texts[1], 2, 64, seeds[1], sampling=att.ImageSampling(steps=4,
                                                                                                        cfg=5.0))
    for a, b in zip(alone, batched):
        assert torch.equal(a, b)
    assert not torch.allclose(alone[1], euler, atol=1e-3), "the ancestral sampler was the one that ran"
    assert steps == [1] * 12, "each text's own run counts its 4 steps for one text: the progress ends full, not over"
