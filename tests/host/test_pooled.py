"""Pooled-vector editing (issue 15, fault 2) on a tiny real SDXL: MACE Refine's edit_pooled maps the concept prompts'
pooled vectors, as the label embedding reads them, onto the anchor's, holds generic prompts, touches only the pooled
columns of label_emb.0.0, leaves the input unchanged, and fusion keeps it."""

import copy
import sys

import comfy_host
import pytest
import torch

REFINE, TRAIN = "MACERefineCrossAttention", "MACETrainConceptLoRA"
CONCEPT = "Tom Cruise"
KEY = "diffusion_model.label_emb.0.0.weight"


def mod(pack_module, name):
    return sys.modules[f"{pack_module.__name__}.{name}"]


def state(patcher):
    weights = {k: v.detach().clone() for k, v in patcher.model_state_dict().items()}
    return weights, {k: len(v) for k, v in patcher.patches.items()}, copy.deepcopy(patcher.model_options)


@pytest.fixture(scope="module")
def sdxl(pack, pack_module):
    comfy_host.unload_all()
    with torch.inference_mode():
        model, clip = comfy_host.tiny_pair("sdxl")
        before = state(model)
        on = pack[REFINE].execute(model, clip, CONCEPT, "celebrity", "", "", 1.0, 0.01, "", True).result[0]
        off = pack[REFINE].execute(model, clip, CONCEPT, "celebrity", "", "", 1.0, 0.01, "", False).result[0]
    yield {"model": model, "clip": clip, "before": before, "on": on, "off": off}
    comfy_host.unload_all()


def weight(host, model):
    return host.current_weights(model, [KEY])[KEY]


def test_patches_label_emb_pooled_columns_only(pack_module, sdxl):
    host = mod(pack_module, "nodes.host")
    kv = set(host.cross_attention_keys(sdxl["model"]))
    assert set(sdxl["on"].patches) == kv | {KEY}
    assert set(sdxl["off"].patches) == kv  # off: as before the option existed
    delta = weight(host, sdxl["on"]) - weight(host, sdxl["model"])
    width = host.pooled_width(sdxl["clip"])
    assert width == 64 and delta.shape == (sdxl["model"].model.diffusion_model.label_emb[0][0].out_features, 64 + 1536)
    assert delta[:, width:].abs().max() == 0  # the size embeddings' columns stay
    assert delta[:, :width].abs().max() > 1e-4
    # the cross-attention edit is the same with or without the pooled one
    for k in kv:
        a, b = (host.current_weights(m, [k])[k] for m in (sdxl["on"], sdxl["off"]))
        assert torch.equal(a, b), k


def test_input_model_is_unchanged(sdxl):
    comfy_host.unload_all()
    weights, patches, options = state(sdxl["model"])
    assert patches == sdxl["before"][1] and options == sdxl["before"][2]
    assert all(torch.equal(weights[k], sdxl["before"][0][k]) for k in weights)


def test_concept_pooled_vector_acts_as_the_anchors(pack_module, sdxl):
    host = mod(pack_module, "nodes.host")
    concepts = mod(pack_module, "mace_core.concepts")
    prior = mod(pack_module, "mace_core.prior")
    clip = sdxl["clip"]
    c = concepts.Concept(CONCEPT, concepts.DEFAULT_ANCHORS["celebrity"], "celebrity")
    with torch.inference_mode():
        old, new = host.encode_pooled(clip, c.prompts()), host.encode_pooled(clip, c.prompts(anchor=True))
        generic = host.encode_pooled(clip, prior.generic_prompts()[::8])
    w0, w1 = weight(host, sdxl["model"])[:, :64], weight(host, sdxl["on"])[:, :64]
    before = (old @ w0.T - new @ w0.T).norm(dim=1)
    after = (old @ w1.T - new @ w0.T).norm(dim=1)
    # the generic prior pulls against the map (a random tiny CLIP's prompts overlap), so not to zero: to a tenth
    assert after.mean() < 0.15 * before.mean() and (after < 0.5 * before).all(), (after / before)
    moved = (generic @ w1.T - generic @ w0.T).norm(dim=1)
    assert moved.mean() < 0.2 * before.mean(), (moved.mean(), before.mean())


def test_same_inputs_same_edit(pack, pack_module, sdxl):
    host = mod(pack_module, "nodes.host")
    with torch.inference_mode():
        again = pack[REFINE].execute(sdxl["model"], sdxl["clip"], CONCEPT, "celebrity", "", "", 1.0, 0.01, "",
                                     True).result[0]
    assert torch.equal(weight(host, again), weight(host, sdxl["on"]))


def test_fusion_carries_the_pooled_edit(pack, pack_module, sdxl):
    host = mod(pack_module, "nodes.host")
    fuse = mod(pack_module, "nodes.fuse")
    with torch.inference_mode():
        bundle = pack[TRAIN].execute(sdxl["on"], sdxl["clip"], CONCEPT, "celebrity", "", 1, 1e-4, 1, 0,
                                     "importance", 1, "auto", image_size=64, image_model=sdxl["model"]).result[0]
        for target in ("input", "original"):
            fused = fuse.fuse_model(sdxl["on"], sdxl["clip"], bundle, "", 1.0, 0.01, target)
            assert KEY in fused.patches, target
            assert torch.equal(weight(host, fused), weight(host, sdxl["on"])), target


def test_families_without_a_pooled_road_ignore_it(pack, pack_module, tiny):
    host = mod(pack_module, "nodes.host")
    model, clip = tiny  # SD1.5
    with torch.inference_mode():
        on = pack[REFINE].execute(model, clip, CONCEPT, "celebrity", "", "", 1.0, 0.01, "", True).result[0]
        off = pack[REFINE].execute(model, clip, CONCEPT, "celebrity", "", "", 1.0, 0.01, "", False).result[0]
    assert set(on.patches) == set(off.patches) == set(host.cross_attention_keys(model))


def test_mismatched_pooled_width_is_refused(pack, pack_module):
    errors = mod(pack_module, "mace_core.errors")
    with torch.inference_mode():
        model = comfy_host.tiny_model(family="sdxl")  # pooled 64 wide
        clip = comfy_host.tiny_clip(family="sdxl", widths=(32, 96))  # context 128 as the model's, pooled 96
        with pytest.raises(errors.MaceInputError, match="pooled"):
            pack[REFINE].execute(model, clip, CONCEPT, "celebrity", "", "", 1.0, 0.01, "", True)


def test_save_erasure_says_the_pooled_edit_is_not_in_the_file(pack_module, sdxl, caplog):
    erasure = mod(pack_module, "nodes.erasure")
    with caplog.at_level("WARNING", logger="MACE"), torch.inference_mode():
        erasure.erasure_deltas(sdxl["off"])
        assert "pooled-vector edit" not in caplog.text
        deltas = erasure.erasure_deltas(sdxl["on"])
    assert "pooled-vector edit" in caplog.text and KEY not in deltas
