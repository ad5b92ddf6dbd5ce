"""Many concepts at once (issue 18): batched training images, masks and LoRA training give what each concept gets
alone, inside a real ComfyUI on tiny real models (CPU, 8x8 latents)."""

import logging

import comfy_host  # noqa: F401  (conftest boots the host)
import pytest
import torch

pytestmark = pytest.mark.usefixtures("unloaded")

NODE = "MACETrainConceptLoRA"
# three preset groups: celebrities and the style (lr 1e-4, 50 steps), the object (1e-5, 50), explicit (1e-5, 120)
MIXED = "Claude Monet | style\nTom Hanks\nEmma Watson\na red car | object\nnudity | explicit\nBrad Pitt"


def snapshot(patcher):
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}


def _lat(n, seed=4):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    assert a.concepts == b.concepts
    worst = 0.0
    for x, y in zip(a.loras, b.loras):
        assert (x.steps, x.meta["learning_rate"], x.meta["timestep_sampling"]) == \
            (y.steps, y.meta["learning_rate"], y.meta["timestep_sampling"]), x.concept
        assert len(x.meta["losses"]) == len(y.meta["losses"]) == x.steps
        assert torch.allclose(torch.tensor(x.meta["losses"]), torch.tensor(y.meta["losses"]), atol=1e-6, rtol=1e-4)
        for k in x.keys:
            for p, q in ((x.up[k], y.up[k]), (x.down[k], y.down[k])):
                assert torch.allclose(p, q, atol=atol, rtol=rtol), (what, x.concept, k)
                worst = max(worst, float((p - q).abs().max()))
    return worst


def test_batched_images_and_masks_equal_each_concept_alone(mods, tiny):
    """One sampler run for three concepts' images gives each concept the images its own run gives (its noise from
    its own seed, its own prompt per sample), and one batch of attention forwards gives each its own masks."""
    model, clip = tiny
    att = mods.att
    before = snapshot(model)
    items = mods.concepts.parse_concepts("Claude Monet\nTom Hanks\na red car", "celebrity")
    texts = [att.data_template(c).format(c.name) for c in items]
    seeds = [10, 11, 12]
    end_id = mods.host.clip_encoder(clip).end_id
    with torch.inference_mode():
        alone = [att.generate_latents(model, clip, t, 2, 64, s) for t, s in zip(texts, seeds)]
        steps = []
        batched = att.generate_latents_batch(model, clip, texts, 2, 64, seeds, on_step=steps.append)
        prompts = [att.concept_prompts(clip, c, [att.data_template(c)], end_id)[0] for c in items]
        masks_alone = [att.derive_masks(model, p, lat, seed=s) for p, lat, s in zip(prompts, alone, seeds)]
        masks_batched = att.derive_masks_batch(model, prompts, alone, seeds)
    assert steps == [3] * att.GEN_STEPS, "one progress call per sampler step of the whole batch, for its 3 texts"
    assert [tuple(b.shape) for b in batched] == [(2, 4, 8, 8)] * 3
    for a, b in zip(alone, batched):
        # the sampler's 20 steps reach latents of size ~100 on this random model; a batched matmul may sum in another
        # order than a single one (CPU kernels differ by batch shape), so the bound is relative to that size
        scale = float(a.abs().max())
        assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-4), float((a - b).abs().max()) / scale
    assert not torch.allclose(alone[0], alone[1], atol=1e-2), "each concept has images of its own"
    for a, b in zip(masks_alone, masks_batched):
        assert a.shape == b.shape and float((a != b).float().mean()) <= 1 / 64, "at most a pixel on the threshold"
    assert not torch.equal(masks_alone[0], masks_alone[2]), "the masks follow each concept's own words"
    after = model.model_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batched_training_equals_single_runs(mods, tiny, caplog):
    """Six concepts of three preset groups (different learning rates and 50 or 120 steps) trained two and four at a
    time give the LoRAs and loss curves of one concept at a time: each LoRA saw its own data, timesteps, noise,
    optimiser state and clipping."""
    model, clip = tiny
    before = snapshot(model)
    common = dict(latents=_lat(12), mask_source="whole image")
    with torch.inference_mode(), caplog.at_level(logging.INFO, logger="MACE"):
        single, _, _ = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", batch=1, **common)
        caplog.clear()
        four, _, _ = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", batch=4, **common)
        two, _, _ = mods.train.train_concept_loras(model, clip, MIXED, "celebrity", batch=2, **common)
    assert [lora.steps for lora in single.loras] == [50, 50, 50, 50, 120, 50]
    assert any("6 concepts, 4 at a time, in 3 groups" in r.getMessage() for r in caplog.records)
    w4, w2 = _close(single, four, "batch 4"), _close(single, two, "batch 2")
    logging.getLogger("MACE.test").info("largest LoRA difference to single runs: batch 4 %.2e, batch 2 %.2e", w4, w2)
    # the LoRAs moved: equality is not two untrained starts
    k = single.loras[1].keys[0]
    assert float(single.loras[1].up[k].abs().max()) > 1e-4
    after = model.model_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batched_training_of_generated_data_is_seeded_and_batch_free(pack, tiny):
    """Through the node, images and attention masks made by the model: auto batch and one at a time agree."""
    model, clip = tiny
    args = dict(model=model, clip=clip, concepts="Claude Monet\nVincent van Gogh\na red car", concept_type="celebrity",
                anchor="", steps=3, learning_rate=1e-2, rank=1, seed=5, timestep_sampling="importance",
                images_per_concept=2, mask_source="attention", image_size=64, settings="custom")
    with torch.inference_mode():
        one = pack[NODE].execute(**args, batch=1).result[0]
        auto = pack[NODE].execute(**args, batch=0).result[0]
    _close(one, auto, "auto", atol=1e-4, rtol=1e-3)


def test_out_of_memory_in_a_batch_retries_smaller_and_keeps_every_lora(mods, tiny, caplog, monkeypatch):
    """A batch that does not fit (here: a forward of more than two samples fails as CUDA's allocator fails) is
    retried at half the size, announced in the log, and every concept still gets the LoRA it gets alone."""
    model, clip = tiny
    att = mods.att
    real = att.denoise_forward

    def small_memory(patcher, latent, *a, **k):
        if torch.is_grad_enabled() and latent.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(patcher, latent, *a, **k)

    common = dict(latents=_lat(5), mask_source="whole image", steps=3, learning_rate=1e-2, settings="custom")
    names = "Claude Monet\nTom Hanks\nEmma Watson\nBrad Pitt\nVincent van Gogh"
    with torch.inference_mode():
        single, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=1, **common)
        monkeypatch.setattr(att, "denoise_forward", small_memory)
        with caplog.at_level(logging.WARNING, logger="MACE"):
            got, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=5, **common)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("5 concepts at a time did not fit in memory" in w and "going on with 2 at a time" in w
               for w in warnings), warnings
    assert all(lora is not None for lora in got.loras)
    _close(single, got, "after the retry")


def test_out_of_memory_mid_batch_does_not_count_the_retried_steps_twice(mods, tiny, monkeypatch):
    """A batch that runs out of memory after some of its steps (as a fragmenting GPU can) is retried smaller; the
    progress bar neither moves back nor counts the thrown-away steps, so it is full only when the last step is done."""
    import comfy.utils

    model, clip = tiny
    att = mods.att
    real = att.denoise_forward
    big = [0]

    def fails_later(patcher, latent, *a, **k):
        if torch.is_grad_enabled() and latent.shape[0] > 2:
            big[0] += 1
            if big[0] >= 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(patcher, latent, *a, **k)

    monkeypatch.setattr(att, "denoise_forward", fails_later)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        with torch.inference_mode():
            got, _, _ = mods.train.train_concept_loras(
                model, clip, "Claude Monet\nTom Hanks\nEmma Watson\nBrad Pitt", "celebrity", batch=4,
                latents=_lat(4), mask_source="whole image", steps=4, learning_rate=1e-2, settings="custom")
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert big[0] >= 3, "the batch of 4 never ran out of memory mid-way"
    assert all(lora is not None for lora in got.loras)
    values = [v for v, _ in seen]
    total = seen[-1][1]
    assert total == 4 * (4 + 1) and values[-1] == total, seen
    assert values == sorted(values), ("the bar moved back", values)
    assert values.index(total) == len(values) - 1, ("the bar was full before the last step", values)


def test_one_concept_that_does_not_fit_says_so(mods, tiny, monkeypatch):
    model, clip = tiny

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(mods.att, "denoise_forward", no_memory)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="out of memory with one concept at a time"):
        mods.train.train_concept_loras(model, clip, "Claude Monet", "celebrity", latents=_lat(1), steps=2,
                                       mask_source="whole image")


@pytest.mark.parametrize("batch", [-1, 1025, 2.5, True])
def test_bad_batch_names_the_input(mods, tiny, batch):
    model, clip = tiny
    with torch.inference_mode(), pytest.raises(mods.errors.MaceInputError) as e:
        mods.train.train_concept_loras(model, clip, "Claude Monet", "celebrity", steps=2, batch=batch)
    assert e.value.input_name == "batch"


def test_a_batch_larger_than_the_free_memory_is_lowered_and_announced(mods, tiny, caplog, monkeypatch):
    """The batch input is checked against what one concept of a batch needs (measured by one forward) and the free
    memory: with (as good as) none free, 3 concepts are trained one at a time, said in the log, LoRAs unchanged."""
    model, clip = tiny
    common = dict(latents=_lat(3), mask_source="whole image", steps=2, learning_rate=1e-2, settings="custom")
    names = "Claude Monet\nTom Hanks\nEmma Watson"
    with torch.inference_mode():
        alone, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=1, **common)
        monkeypatch.setattr(mods.train, "_free_memory", lambda patcher, loaded: 0.0)
        with caplog.at_level(logging.INFO, logger="MACE"):
            got, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=3, **common)
    lines = [r.getMessage() for r in caplog.records]
    assert any("batch 3 does not fit in free memory" in m and "training 1 at a time" in m for m in lines), \
        lines
    assert any("3 concepts, 1 at a time" in m for m in lines)
    _close(alone, got, "lowered")


def test_out_of_memory_while_making_the_images_retries_smaller(mods, tiny, caplog, monkeypatch):
    """The data phase falls back the same way: a sampler run of more than one concept's images fails (as CUDA's
    allocator fails), the log says so, and each concept gets the images and masks it gets alone."""
    model, clip = tiny
    att = mods.att
    real = att.generate_latents_batch

    def one_at_most(model_, clip_, texts, *a, **k):
        if len(texts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model_, clip_, texts, *a, **k)

    common = dict(steps=2, learning_rate=1e-2, images_per_concept=1, image_size=64, mask_source="attention",
                  settings="custom", seed=3)
    names = "Claude Monet\nTom Hanks\nEmma Watson"
    with torch.inference_mode():
        alone, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=1, **common)
        monkeypatch.setattr(att, "generate_latents_batch", one_at_most)
        with caplog.at_level(logging.WARNING, logger="MACE"):
            got, _, _ = mods.train.train_concept_loras(model, clip, names, "celebrity", batch=3, **common)
    assert any("3 concepts at a time did not fit in memory (training images and masks)" in r.getMessage()
               for r in caplog.records)
    _close(alone, got, "data retried", atol=1e-4, rtol=1e-3)


def test_cancel_inside_a_batch_changes_nothing(mods, tiny, monkeypatch):
    import comfy.model_management as mm

    model, clip = tiny
    before = snapshot(model)
    calls = comfy_host.interrupt_at_check(monkeypatch, 5)
    try:
        with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
            mods.train.train_concept_loras(model, clip, "Claude Monet\nTom Hanks\nEmma Watson", "celebrity",
                                           steps=20, learning_rate=1e-2, latents=_lat(3), mask_source="whole image",
                                           batch=3)
    finally:
        mm.interrupt_current_processing(False)
    assert 5 <= len(calls) < 20, "stopped mid-batch"
    assert not any(lm.model.weight_wrapper_patches for lm in mm.current_loaded_models), "training clone unloaded"
    after = model.model_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.model_options.get("transformer_options", {}).get("patches"), "no patch on the input model"
