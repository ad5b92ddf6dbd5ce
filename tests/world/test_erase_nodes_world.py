"""MACE Erase, Erasure Check and Attention Map on the concept world, run the way the executor runs nodes.

The smoke world (seconds to train) checks the pictures' layout: rows, columns, labels and that every cell is what
the world's own sampler draws for its prompt and seed. The full world (slow) checks what the pictures show: one node
at its defaults erases a person, and after erasure the person's attention inside its mask falls, in the numbers and
in the heatmap's pixels."""

import logging

import pytest
import torch
from world_support import comfy_host, pack_import

log = logging.getLogger("MACE.test")

PERSON = "Tomas Lindqvist"
PRESERVED = ["Alba Moreno", "red lantern"]
CFG = 3.0  # the world's SamplerSettings


def _mods():
    names = ("erase", "check", "attention_map", "picture", "host", "fuse")
    return {n: pack_import(f"nodes.{n}") for n in names}


def _run_node(cls, **kwargs):
    """Call a V3 node as the executor does (locked class clone, inference mode)."""
    from comfy_api.internal import make_locked_method_func

    cls.VALIDATE_CLASS()
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        return f(**kwargs).result


def _defaults(cls):
    """Every widget input at its schema default, as a user who changes nothing queues it."""
    return {i.id: i.default for i in cls.GET_SCHEMA().inputs if getattr(i, "default", None) is not None}


def _unloaded_weights(world):
    comfy_host.unload_all()
    return {k: v.clone() for k, v in world.model.model.diffusion_model.state_dict().items()}


def _box(image, box):
    x0, y0, x1, y1 = box
    return image[0, y0:y1, x0:x1]


def _assert_labelled_grid(image, layout, cells, rows, cols):
    picture = pack_import("nodes.picture")
    assert (layout.rows, layout.cols) == (rows, cols)
    assert image.shape == (1,) + layout.size + (3,)
    k = picture.cell_scale(*cells.shape[2:4])
    for r in range(rows):
        assert (_box(image, layout.row_label_box(r)) < 0.5).any(), f"row {r} has no label"
        for c in range(cols):
            want = cells[r, c].repeat_interleave(k, 0).repeat_interleave(k, 1)
            assert torch.allclose(_box(image, layout.cell_box(r, c)), want, atol=1 / 255 + 1e-6), (r, c)
    for c in range(cols):
        assert (_box(image, layout.col_label_box(c)) < 0.5).any(), f"column {c} has no label"
    # between the before and the after block: an empty strip, so the two are told apart at a glance
    if layout.group:
        gap = image[0, :, layout.col_x(layout.group) - layout.group_gap:layout.col_x(layout.group)]
        assert torch.equal(gap, torch.ones_like(gap))


# ---------------------------------------------------------------- smoke world: mechanics and layout

def test_check_grid_rows_columns_labels_and_cells(host, smoke_world):
    m = _mods()
    world = smoke_world
    synonyms = list(world.spec.CONCEPTS[world.spec.concept_index(PERSON)].synonyms)
    with torch.inference_mode():
        erased = m["erase"].erase_model(world.model, world.clip, PERSON, mode="quick")
    out = _run_node(m["check"].MACEErasureCheck, model=world.model, erased_model=erased, clip=world.clip,
                    vae=world.vae, concepts="", concept_type="celebrity", anchor="",
                    other_prompts="\n".join(f"a photo of {s}" for s in synonyms), preserve="\n".join(PRESERVED), seed=4,
                    images_per_prompt=2, steps=20, cfg=CFG, sampler_name="euler", scheduler="normal", image_size=0,
                    negative="")
    with torch.inference_mode():
        r = m["check"].erasure_check(world.model, erased, world.clip, world.vae, "", "celebrity",
                                     other_prompts="\n".join(f"a photo of {s}" for s in synonyms),
                                     preserve="\n".join(PRESERVED), seed=4, cfg=CFG)
        # the world's own sampler (its SamplerSettings: cfg 3, euler, 20 steps) draws the same pictures
        expect = world.generate([row.prompt for row in r.rows], r.seeds, model=world.model)
        expect_after = world.generate([row.prompt for row in r.rows], r.seeds, model=erased)
    assert torch.equal(out[0], r.image)
    assert [row.kind for row in r.rows] == ["erased", "other", "other", "preserved", "preserved"]
    assert r.rows[0].prompt == f"a photo of {PERSON}" and r.rows[3].prompt == "a photo of Alba Moreno"
    assert r.col_labels == ["before, seed 4", "before, seed 5", "after, seed 4", "after, seed 5"]
    assert r.cells.shape == (5, 4, 64, 64, 3), "the world's 64 px, from the model's sampling hint"
    _assert_labelled_grid(r.image, r.layout, r.cells, 5, 4)
    assert torch.allclose(r.cells[:, :2], expect, atol=2e-3)
    assert torch.allclose(r.cells[:, 2:], expect_after, atol=2e-3)


def test_attention_map_rows_columns_and_masks(host, smoke_world):
    m = _mods()
    world = smoke_world
    lines = f"{PERSON}\ndotwork style | style"
    with torch.inference_mode():
        erased = m["erase"].erase_model(world.model, world.clip, lines, mode="quick")
    image, mask = _run_node(m["attention_map"].MACEAttentionMap, model=world.model, erased_model=erased,
                            clip=world.clip, vae=world.vae, concepts=lines, concept_type="celebrity", anchor="",
                            tokens="concept words", show_mask=True, seed=0, steps=20, cfg=CFG, sampler_name="euler",
                            scheduler="normal", image_size=0)
    with torch.inference_mode():
        r = m["attention_map"].attention_map(world.model, erased, world.clip, world.vae, lines, cfg=CFG)
    assert torch.equal(image, r.image) and torch.equal(mask, r.masks)
    assert r.col_labels == ["picture", "attention before", "attention after", "mask (training)"]
    cells = torch.stack([torch.stack([p, *(m["picture"].overlay(p, h, float(hh.max())) for h in hh),
                                      m["picture"].mask_picture(p, mk)])
                         for p, hh, mk in zip(r.pictures, r.heat, r.masks)])
    _assert_labelled_grid(r.image, r.layout, cells, 2, 4)
    assert mask.shape == (2, 64, 64)
    assert 0 < float(mask[0].mean()) < 1, "a person's mask is the region its words are attended"
    assert float(mask[1].mean()) == 1.0, "a style trains on the whole picture"


def test_erase_node_at_defaults_returns_an_erased_clone(host, smoke_world):
    m = _mods()
    world = smoke_world
    raw = _unloaded_weights(world)
    cls = m["erase"].MACEErase
    kwargs = _defaults(cls)
    assert kwargs["mode"] == "full"
    (out,) = _run_node(cls, model=world.model, clip=world.clip, **dict(kwargs, concepts=PERSON))
    keys = m["host"].cross_attention_keys(world.model)
    with torch.inference_mode():
        w, w0 = m["host"].current_weights(out, keys), m["host"].current_weights(world.model, keys)
    assert any(not torch.equal(w[k], w0[k]) for k in keys)
    assert [e["concept"] for e in m["fuse"].erased_concepts(out)] == [PERSON]
    after = _unloaded_weights(world)
    assert all(torch.equal(raw[k], after[k]) for k in raw) and not world.model.patches, "the world's model changed"


# ---------------------------------------------------------------- full world: what the pictures show

@pytest.fixture(scope="module")
def world(cw):
    return cw.load_or_train(seed=0)


@pytest.fixture(scope="module")
def erased_at_defaults(world):
    """{mode: MODEL} from MACE Erase with every input at its default but the concept."""
    m = _mods()
    cls = m["erase"].MACEErase
    out = {}
    for mode in ("quick", "full"):
        kwargs = dict(_defaults(cls), concepts=PERSON, mode=mode)
        out[mode] = _run_node(cls, model=world.model, clip=world.clip, **kwargs)[0]
    return out


@pytest.mark.slow
def test_one_node_at_defaults_erases_a_person(world, erased_at_defaults):
    """Both modes at their defaults erase the person and its synonyms. With preserve left blank the other concepts
    lose some, how many depends on the world (measured: Acc_s 0.96 -> 0.83 quick, 0.82 full on one CPU's world;
    0.97 -> 0.68 quick, 0.67 full on another's); listing them in preserve, as the README advises, keeps them."""
    ee = pack_import("concept_world.erasure_eval")
    m = _mods()
    others = "\n".join(c.name for c in world.spec.CONCEPTS if c.name != PERSON)
    with torch.inference_mode():
        preserved = m["erase"].erase_model(world.model, world.clip, PERSON, mode="quick", preserve=others)
        original = ee.scores(world, world.model, [PERSON], range(6))
        got = {mode: ee.scores(world, model, [PERSON], range(6)) for mode, model in erased_at_defaults.items()}
        got["quick, preserve"] = ee.scores(world, preserved, [PERSON], range(6))
    log.info("erase at defaults: original %s, %s", original, got)
    assert original["acc_e"] >= 0.9 and original["acc_g"] >= 0.9, original
    for mode, s in got.items():
        assert s["acc_e"] <= 0.25 and s["acc_g"] <= 0.25, (mode, s, original)
        assert s["acc_s"] >= 0.6, (mode, s, original)
    assert got["quick, preserve"]["acc_s"] >= max(0.9, got["quick"]["acc_s"]), got


def _heat_luminance(r):
    """Mean brightness inside the mask of the 'before' and 'after' heatmap cells of the first row, read from the
    grid's pixels: both maps lie over the same picture on one colour scale whose brightness rises with attention."""
    pic = pack_import("nodes.picture")
    k = pic.cell_scale(*r.pictures.shape[1:3])
    mask = r.masks[0].repeat_interleave(k, 0).repeat_interleave(k, 1)
    return [float(pic.luminance(_box(r.image, r.layout.cell_box(0, c)))[mask > 0].mean()) for c in (1, 2)]


@pytest.mark.slow
def test_attention_inside_the_mask_falls_after_erasure(world, erased_at_defaults):
    """The Attention Map of the person's words, before and after erasure, in numbers and in the heatmap's pixels.
    At the paper's learning rate (Erase's defaults) the LoRA stage barely moves this small model's attention (issue
    14; measured 0.098 -> 0.089 on one CPU's world, 0.086 -> 0.087 on another's): there the map must not show the
    words drawing more attention than before. At 1e-2, where every stage moves it (README), it falls (by about 45 % on
    the first world, 25 % on the second), and the heatmap darkens with it."""
    m = _mods()
    ee = pack_import("concept_world.erasure_eval")
    with torch.inference_mode():
        strong = ee.erase(world, [PERSON], ee.Settings(lr=1e-2), pipelines=(ee.MACE,))[ee.MACE]
    for name, erased, most in (("defaults", erased_at_defaults["full"], 1.05), ("lr 1e-2", strong, 0.85)):
        for seed in (0, 1):
            with torch.inference_mode():
                r = m["attention_map"].attention_map(world.model, erased, world.clip, world.vae, PERSON, cfg=CFG,
                                                     seed=seed)
            before, after = float(r.mass[0, 0]), float(r.mass[0, 1])
            lum = _heat_luminance(r)
            log.info("attention in mask, %s, seed %d: %.4f -> %.4f, heatmap brightness %.3f -> %.3f", name, seed,
                     before, after, *lum)
            assert after < most * before, (name, seed, before, after)
            if most < 1:  # a change large enough to see
                assert lum[1] < lum[0] - 0.02, (name, seed, lum)
            assert 0.2 < float(r.masks[0].mean()) < 0.8, "the person's region, not the whole picture"
