"""The mosaic world (126 concepts drawn as codes of colour cells): its spec, its codes and pictures, a smoke-size
world through every phase, and the loader's option. bench/eval_world.py --world mosaic measures erasure on the full
one."""

import itertools

import pytest
import torch
from world_support import comfy_host, pack_import

mosaic = pack_import("concept_world.mosaic")
mass = pack_import("concept_world.mass")
render = pack_import("concept_world.render")
spec = pack_import("concept_world.spec")
MOSAIC = mosaic.MOSAIC_WORLD


def test_126_concepts_each_with_a_synonym_and_no_name_of_the_mass_world():
    assert spec.named("mosaic") is MOSAIC
    assert {t: len(MOSAIC.concept_type_indices(t)) for t in spec.CONCEPT_TYPES} == mosaic.COUNTS
    names = {n.lower() for c in MOSAIC.CONCEPTS for n in c.names}
    assert len(names) == sum(len(c.names) for c in MOSAIC.CONCEPTS), "every name belongs to one concept"
    assert all(len(c.synonyms) == 1 for c in MOSAIC.CONCEPTS)
    assert not names & {n.lower() for c in mass.MASS.CONCEPTS for n in c.names}
    assert sorted(MOSAIC.ORDER) == sorted(c.name for c in MOSAIC.CONCEPTS)
    assert {MOSAIC.CONCEPTS[MOSAIC.concept_index(n)].concept_type for n in MOSAIC.ORDER[:3]} == set(spec.CONCEPT_TYPES)


def test_any_two_concepts_of_a_type_differ_in_enough_cells():
    """The codes' minimum distance is what lets the classifier name a concept drawn with a cell wrong."""
    for t, (cells, distance) in mosaic.CODES.items():
        codes = [c.colors for c in MOSAIC.CONCEPTS if c.concept_type == t]
        assert all(len(code) == cells for code in codes)
        worst = min(sum(x != y for x, y in zip(a, b)) for a, b in itertools.combinations(codes, 2))
        assert worst >= distance, (t, worst)


def _cell_centres(mask, cols, rows):
    ys, xs = torch.nonzero(mask[0] > 0.99, as_tuple=True)
    x0, x1, y0, y1 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
    return [(int(y0 + (j + 0.5) * (y1 - y0) / rows), int(x0 + (i + 0.5) * (x1 - x0) / cols))
            for j in range(rows) for i in range(cols)]


@pytest.mark.parametrize("concept_type", spec.CONCEPT_TYPES)
def test_every_cell_is_drawn_in_its_code_s_colour(concept_type):
    g = torch.Generator().manual_seed(11)
    for index in MOSAIC.concept_type_indices(concept_type)[:5]:
        c = MOSAIC.CONCEPTS[index]
        img, mask = render.render_one(index, g, sp=MOSAIC)
        if concept_type == "style":
            centres = [(8 + 16 * j, 8 + 16 * i) for j in range(4) for i in range(4)]
            tolerance = 0.07  # lit 0.94-1.06
        else:
            body = mask
            if concept_type == "person":  # the body, below the head: the mask's lower 70 %
                rows = torch.nonzero(mask[0].amax(1) > 0.99)[:, 0]
                body = mask.clone()
                body[:, : rows.min() + int(0.3 * (rows.max() - rows.min()))] = 0
            centres = _cell_centres(body, *((3, 2) if concept_type == "object" else (2, 2)))
            tolerance = 0.02
        got = torch.stack([img[:, y, x] for y, x in centres])
        assert torch.allclose(got, torch.tensor(c.colors), atol=tolerance), (c.name, got, c.colors)


def test_renders_every_target_deterministically():
    targets = list(range(render.n_targets(MOSAIC)))
    a, ma = render.render(targets, torch.Generator().manual_seed(5), sp=MOSAIC)
    b, mb = render.render(targets, torch.Generator().manual_seed(5), sp=MOSAIC)
    assert torch.equal(a, b) and torch.equal(ma, mb) and 0 <= a.min() and a.max() <= 1


def test_the_bench_counts_a_part_shared_only_in_the_same_cell():
    import importlib.util

    loaded = importlib.util.spec_from_file_location("eval_world_bench", comfy_host.PACK / "bench" / "eval_world.py")
    bench = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(bench)
    colours = list(mass._COLORS.values())
    a = spec.Concept("a", "object", (), render.MOSAIC, tuple(colours[:6]))
    grey = ((0.5, 0.5, 0.5),)
    same_cell = spec.Concept("b", "object", (), render.MOSAIC, (colours[0],) + grey * 5)
    other_cell = spec.Concept("c", "object", (), render.MOSAIC, grey + (colours[0],) + grey * 4)
    assert bench.shares_part(a, same_cell) and not bench.shares_part(a, other_cell)


@pytest.fixture(scope="module")
def mosaic_smoke_world(cw, smoke_dir):
    return cw.load_or_train(seed=3, preset="mosaic_smoke", cache_dir=smoke_dir)


def test_a_mosaic_smoke_world_trains_saves_and_loads_with_its_concepts(cw, mosaic_smoke_world):
    store = pack_import("concept_world.store")
    world = mosaic_smoke_world
    assert world.spec is MOSAIC and "mosaic_smoke_text128" in world.path
    groups, meta = store.load(world.path)
    assert meta["world"] == "mosaic" and meta["spec"] == MOSAIC.as_dict()
    assert groups["classifier"]["head.weight"].shape[0] == len(MOSAIC.CLASS_NAMES)
    assert cw.load(world.path).spec is MOSAIC


def test_the_loader_node_offers_the_mosaic_world(host, mosaic_smoke_world, monkeypatch):
    from comfy_api.internal import make_locked_method_func

    mod = pack_import("nodes.concept_world")
    inputs = mod.MACEConceptWorld.GET_SCHEMA().inputs
    assert inputs[2].options[-1] == "mosaic (126 concepts)"  # added last: saved workflows keep their choice
    calls = []
    monkeypatch.setattr(mod.concept_world, "load_or_train",
                        lambda seed, **options: calls.append((seed, options)) or mosaic_smoke_world)
    cls = mod.MACEConceptWorld
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        got = f(seed=4, concepts="mosaic (126 concepts)")
    assert calls == [(4, {"preset": "mosaic"})] and got.result[0] is mosaic_smoke_world.model


def test_the_share_outside_the_kept_span_grows_as_fewer_are_kept(mosaic_smoke_world):
    """Fewer kept concepts span less, so more of each erased concept's feature lies outside their span."""
    evaluate = pack_import("concept_world.evaluate")
    with torch.inference_mode():
        got = evaluate.outside_span(mosaic_smoke_world, [10, 100])
    assert list(got) == [10, 100] and 0 < got[10] < got[100] <= 1, got
