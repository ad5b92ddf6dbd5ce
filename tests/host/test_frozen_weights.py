"""A training step remakes the frozen UNet weights' copies in backward instead of keeping them
(nodes/frozen_weights.py): the gradients are bit for bit those of keeping them, autograd keeps a small fraction of the
bytes, and a copy some other wrapper changed is kept, never remade wrong. Real ComfyUI, tiny real models, CPU."""

import comfy_host  # noqa: F401  (conftest boots the host)
import pytest
import torch

pytestmark = pytest.mark.usefixtures("unloaded")


def _step(mods, model, clip, remake: bool):
    """One concept's loss and backward through the Train node's TrainableModel/BatchTask: (gradients, bytes kept)."""
    att, host = mods.att, mods.host
    keys = host.cross_attention_keys(model, clip)
    concept = mods.concepts.parse_concepts("Claude Monet", "celebrity")[0]
    with torch.inference_mode():
        prompts = att.concept_prompts(clip, concept, ["a photo of {}", "a portrait of {}"],
                                      host.clip_encoder(clip).end_id)
    shapes = {k: tuple(w.shape) for k, w in host.original_weights(model, keys).items()}
    g = torch.Generator().manual_seed(0)
    lat, mask = torch.randn(2, 4, 8, 8, generator=g), (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    with torch.inference_mode(False), torch.enable_grad():
        tm = att.TrainableModel(model, keys)
        try:
            tm.load()
            tm.copies.enabled = remake
            gen = torch.Generator().manual_seed(1)
            up = {k: (torch.randn(s[0], 1, generator=gen) * 0.1)[None].requires_grad_(True) for k, s in shapes.items()}
            down = {k: torch.randn(1, s[1], generator=gen)[None].requires_grad_(True) for k, s in shapes.items()}
            task = att.BatchTask(tm, [att.ConceptData(prompts, lat, mask, "importance")], up, down)
            loss = task.losses(0, [torch.Generator().manual_seed(2)]).sum()
            loss.backward()
            # (the last layers' value factors reach no later attention: no gradient)
            grads = {f"{part}:{k}": t.grad.clone() for part, d in (("up", up), ("down", down)) for k, t in d.items()
                     if t.grad is not None}
            kept, remade = tm.copies.kept_bytes, tm.copies.remade_bytes
        finally:
            with torch.inference_mode():
                tm.release()
    return grads, kept, remade


def _unet_bytes_fp32(model):
    return sum(p.numel() for p in model.model.diffusion_model.parameters()) * 4


@pytest.mark.parametrize("family,dtype", [("sd15", torch.float16), ("sd15", torch.float32),
                                          ("sdxl", torch.bfloat16), ("sd15", torch.float8_e4m3fn)])
def test_remade_copies_give_the_same_gradients_and_keep_far_less(mods, family, dtype):
    with torch.inference_mode():
        model = comfy_host.tiny_model(dtype=dtype, family=family)
        clip = comfy_host.tiny_clip(family=family) if family != "sd15" else comfy_host.tiny_clip()
    g_kept, kept_before, _ = _step(mods, model, clip, remake=False)
    g_remade, kept_now, remade = _step(mods, model, clip, remake=True)
    assert g_kept.keys() == g_remade.keys()
    for k in g_kept:
        assert torch.equal(g_kept[k], g_remade[k]), k
    assert any(float(g.abs().max()) > 0 for g in g_remade.values()), "the step has gradients to compare"
    # the copies are float32 (training computes in float32); from the first cross-attention layer to the last, the
    # UNet lies on the backward path (on this tiny one about half its weights)
    assert remade > 0.3 * _unet_bytes_fp32(model)
    assert kept_now < 0.5 * kept_before, (kept_now, kept_before)
    assert abs(kept_before - (kept_now + remade)) < 0.1 * kept_before, "what is not kept is what is remade"


def test_a_copy_another_wrapper_changed_is_kept_not_remade(mods):
    """A wrapper ahead of ours (as ComfyUI's low-VRAM patches are) makes the copy differ from a cast of the stored
    weight: remaking it would give wrong gradients, so it is kept."""
    with torch.inference_mode():
        model, clip = comfy_host.tiny_model(dtype=torch.float16), comfy_host.tiny_clip()
        changed = model.clone()
    # every output-block convolution and projection computes with 1.5x its stored weight
    keys = [k for k in changed.model_state_dict() if k.startswith("diffusion_model.output_blocks.")
            and k.endswith(".weight") and changed.model_state_dict()[k].ndim >= 2]
    assert keys
    for k in keys:
        changed.add_weight_wrapper(k, lambda w: w * 1.5)
    g_kept, _, _ = _step(mods, changed, clip, remake=False)
    g_remade, _, remade = _step(mods, changed, clip, remake=True)
    assert remade > 0, "the other weights are still remade"
    for k in g_kept:
        assert torch.equal(g_kept[k], g_remade[k]), k
    g_plain, _, _ = _step(mods, model, clip, remake=True)
    assert not all(torch.equal(g_plain[k], g_remade[k]) for k in g_plain), "the wrapper changes the gradients"
