"""The world's content: concepts, names, pictures, latents. Rendering needs no ComfyUI."""

import torch
from world_support import pack_import

spec = pack_import("concept_world.spec")
render = pack_import("concept_world.render")


def test_concepts_concept_types_synonyms():
    assert len(spec.CONCEPTS) >= 16
    assert {c.concept_type for c in spec.CONCEPTS} == set(spec.CONCEPT_TYPES)
    names = [n.lower() for c in spec.CONCEPTS for n in c.names]
    assert len(names) == len(set(names)), "every name belongs to one concept"
    for i, c in enumerate(spec.CONCEPTS):
        assert len(c.synonyms) == 2
        assert all(spec.concept_index(n) == i for n in c.names)
        assert len(spec.prompts_for(i, "all")) == 3 * len(spec.TEMPLATES[c.concept_type])
    assert spec.CLASS_NAMES[spec.NONE] == "none"


def test_render_is_deterministic_and_masks_mean_something():
    targets = list(range(render.N_TARGETS))
    a, ma = render.render(targets, torch.Generator().manual_seed(5))
    b, mb = render.render(targets, torch.Generator().manual_seed(5))
    c, _ = render.render(targets, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(a, c)
    assert a.shape == (render.N_TARGETS, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    for t in targets:
        ctype = render.concept_type_of(t)
        area = ma[t].mean().item()
        if ctype in ("object", "person"):
            assert 0.02 < area < 0.5, (t, area)
        elif t < render.N:  # a style covers the whole picture
            assert area == 1.0


def test_foreground_mask_finds_the_object():
    segment = pack_import("concept_world.segment")
    images, masks = render.render(spec.concept_type_indices("object") + spec.concept_type_indices("person"),
                                  torch.Generator().manual_seed(1))
    found = segment.foreground(images.movedim(1, -1))
    truth = masks[:, 0] > 0.5
    iou = ((found > 0) & truth).sum((1, 2)) / ((found > 0) | truth).sum((1, 2))
    assert iou.min() > 0.6, iou


def test_latent_formula_is_the_taesd_encoder(host):
    ae = pack_import("concept_world.autoencoder")
    taesd = ae.build_taesd(torch.Generator().manual_seed(0))
    x, _ = render.render(list(range(render.N_TARGETS)), torch.Generator().manual_seed(2))
    with torch.no_grad():
        # ComfyUI's VAE feeds TAESD.encode images in [-1, 1] and reads comfy latents = model latents / 0.18215
        comfy_latent = taesd.encode(x * 2 - 1)
    assert torch.allclose(comfy_latent * ae.SCALE_FACTOR, ae.latent_of(x), atol=1e-4)
    z = ae.latent_of(x)
    assert z.abs().max() < 3.5, "latents stay where the decoder's tanh clamp (3 tanh(z / 3)) still resolves them"
    assert 0.4 < z.std() < 1.5
