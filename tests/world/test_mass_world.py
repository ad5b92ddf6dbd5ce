"""The mass world (126 concepts): its spec, its pictures, a smoke-size world through every phase, the loader's option.

The full mass world trains in about half an hour; CI trains only its smoke version, and bench/eval_world.py
--world mass measures erasure on the full one."""

import pytest
import torch
from world_support import comfy_host, pack_import

mass = pack_import("concept_world.mass")
render = pack_import("concept_world.render")
spec = pack_import("concept_world.spec")
MASS = mass.MASS


def test_at_least_120_concepts_of_every_type_each_with_a_synonym():
    assert len(MASS.CONCEPTS) >= 120
    counts = {t: len(MASS.concept_type_indices(t)) for t in spec.CONCEPT_TYPES}
    assert min(counts.values()) >= 30, counts
    names = [n.lower() for c in MASS.CONCEPTS for n in c.names]
    assert len(names) == len(set(names)), "every name belongs to one concept"
    for i, c in enumerate(MASS.CONCEPTS):
        assert len(c.synonyms) >= 1
        assert all(MASS.concept_index(n) == i for n in c.names)
    assert MASS.CLASS_NAMES[MASS.NONE] == "none" and len(MASS.CLASS_NAMES) == len(MASS.CONCEPTS) + 1
    assert spec.named("mass") is MASS and spec.named("standard") is spec.STANDARD
    with pytest.raises(ValueError, match="unknown concept world 'huge'"):
        spec.named("huge")


def test_every_concept_is_drawn_from_its_own_parts():
    """No two concepts share a drawing: the classifier could not tell them apart, nor could erasure keep one."""
    parts = [(c.concept_type, c.shape, c.colors) for c in MASS.CONCEPTS]
    assert len(parts) == len(set(parts))


def test_the_erasure_order_mixes_types_and_covers_every_concept():
    order = MASS.ORDER
    assert sorted(order) == sorted(c.name for c in MASS.CONCEPTS)
    first = [MASS.CONCEPTS[MASS.concept_index(n)].concept_type for n in order[:10]]
    assert set(first) == set(spec.CONCEPT_TYPES)
    first_colors = {col for n in order[:10] for col in MASS.CONCEPTS[MASS.concept_index(n)].colors}
    assert len(first_colors) >= 8, first_colors


def test_renders_every_target_deterministically():
    n = render.n_targets(MASS)
    targets = list(range(n))
    a, ma = render.render(targets, torch.Generator().manual_seed(5), sp=MASS)
    b, mb = render.render(targets, torch.Generator().manual_seed(5), sp=MASS)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert a.shape == (n, 3, 64, 64)
    labels = [render.class_of(t, MASS) for t in targets]
    assert labels[:MASS.NONE] == list(range(MASS.NONE)) and set(labels[MASS.NONE:]) == {MASS.NONE}
    assert render.concept_type_of(render.generic("person", MASS), MASS) == "person"
    assert render.concept_type_of(render.generic("blank", MASS), MASS) == "none"


def test_the_standard_world_renders_as_before_the_mass_world():
    """The standard world's targets keep their numbers (generic pictures after its 20 concepts)."""
    assert render.n_targets() == render.N_TARGETS == 24
    assert [render.generic(k) for k in ("object", "person", "style", "blank")] == [20, 21, 22, 23]


@pytest.fixture(scope="module")
def mass_smoke_world(cw, smoke_dir):
    return cw.load_or_train(seed=3, preset="mass_smoke", cache_dir=smoke_dir)


def test_a_mass_smoke_world_trains_saves_and_loads_with_its_concepts(cw, mass_smoke_world):
    store = pack_import("concept_world.store")
    world = mass_smoke_world
    assert world.spec is MASS and "mass_smoke" in world.path
    groups, meta = store.load(world.path)
    assert meta["world"] == "mass" and len(meta["spec"]["concepts"]) == len(MASS.CONCEPTS)
    # its text is wider than it has concepts (train.MASS_TEXT_WIDTH), and the file name says so
    width = meta["clip_config"]["hidden_size"]
    assert width == meta["unet_config"]["context_dim"] == 256 > len(MASS.CONCEPTS) and "_text256_" in world.path
    assert meta["metrics"]["preset"]["text_width"] == 256
    assert groups["unet"]["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 256
    assert groups["classifier"]["head.weight"].shape[0] == len(MASS.CLASS_NAMES)
    again = cw.load(world.path)
    assert again.spec is MASS
    ids = world.predict([MASS.prompts_for(MASS.concept_index(MASS.ORDER[0]))[0]], seeds=range(2))
    assert ids.shape == (1, 2) and 0 <= ids.min() and ids.max() <= MASS.NONE


def test_erasure_scores_on_the_mass_world_read_its_concepts(mass_smoke_world):
    ee = pack_import("concept_world.erasure_eval")
    erased = list(MASS.ORDER[:3])
    assert ee.concept_lines(erased, MASS).splitlines()[0] == f"{erased[0]} | celebrity"
    with torch.inference_mode():
        got = ee.scores(mass_smoke_world, mass_smoke_world.model, erased, range(1), detail=True)
    assert set(got) == {"acc_e", "acc_g", "acc_s", "H", "misses"}
    lost = set(got["misses"]["acc_s"])
    assert lost <= {c.name for c in MASS.CONCEPTS} - set(erased)


def test_an_unknown_preset_is_named(cw, smoke_dir):
    with pytest.raises(ValueError, match="preset 'huge'"):
        cw.load_or_train(seed=3, preset="huge", cache_dir=smoke_dir)


def test_the_loader_node_offers_the_mass_world(host, smoke_world, mass_smoke_world, monkeypatch):
    """'mass (126 concepts)' asks for the mass preset; leaving the option out (an old workflow) asks exactly as
    before; a wrong value is named."""
    from comfy_api.internal import make_locked_method_func

    mod = pack_import("nodes.concept_world")
    schema = mod.MACEConceptWorld.GET_SCHEMA()
    assert [i.id for i in schema.inputs] == ["seed", "family", "concepts"]
    assert schema.inputs[2].options == list(mod.WORLDS) and schema.inputs[2].default == "20 concepts"
    calls = []

    def fake(seed, **options):
        calls.append((seed, options))
        return mass_smoke_world if options.get("preset") == "mass" else smoke_world

    monkeypatch.setattr(mod.concept_world, "load_or_train", fake)
    cls = mod.MACEConceptWorld
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        got = f(seed=2, concepts="mass (126 concepts)")
        f(seed=2)
        f(seed=2, family="SDXL", concepts="mass (126 concepts)")
        with pytest.raises(ValueError, match="concepts must be one of"):
            f(seed=2, concepts="all of them")
    assert calls == [(2, {"preset": "mass"}), (2, {}), (2, {"family": "sdxl", "preset": "mass"})]
    assert got.result[0] is mass_smoke_world.model


def test_a_world_file_of_other_concepts_is_not_loaded_as_today_s(cw, mass_smoke_world, tmp_path):
    """A cached world trained on an earlier list of concepts (the same file name, another spec) is stale: load_or_train
    retrains it instead of scoring today's concept names against a model that never learnt them."""
    store = pack_import("concept_world.store")
    world_mod = pack_import("concept_world.world")
    groups, meta = store.load(mass_smoke_world.path)
    meta["spec"]["concepts"][0]["name"] = "an older name"
    path = str(tmp_path / "old.safetensors")
    store.save(path, groups, meta)
    with pytest.raises(ValueError, match="other concepts than today's mass world"):
        world_mod.load(path, current_only=True)
    assert world_mod.load(path).spec is MASS  # a trial file still loads when asked for by path


def test_a_world_file_of_another_recipe_is_not_loaded_as_today_s(cw, mass_smoke_world, tmp_path):
    """A cached world trained with other step counts (the mass world's 4000 diffusion steps before they became 3000)
    is another world for the same seed: load_or_train retrains it, so a seed means one world wherever it was made. A
    file from before a preset gained a key (world, text_width) still loads."""
    store = pack_import("concept_world.store")
    world_mod = pack_import("concept_world.world")
    groups, meta = store.load(mass_smoke_world.path)
    preset = meta["metrics"]["preset"]
    assert preset["name"] == "mass_smoke"
    older = {k: v for k, v in preset.items() if k not in ("world", "text_width")}
    meta["metrics"]["preset"] = older
    path = str(tmp_path / "older_keys.safetensors")
    store.save(path, groups, meta)
    assert world_mod.load(path, current_only=True).spec is MASS
    meta["metrics"]["preset"] = dict(older, diff_steps=older["diff_steps"] + 1)
    path = str(tmp_path / "other_recipe.safetensors")
    store.save(path, groups, meta)
    with pytest.raises(ValueError, match=f"diff_steps {older['diff_steps'] + 1}, not today's diff_steps "
                                         f"{older['diff_steps']}"):
        world_mod.load(path, current_only=True)
    assert world_mod.load(path).spec is MASS


def _eval_world_bench():
    """bench/eval_world.py as a module (a script, not part of the pack): its report tables are plain functions."""
    import importlib.util

    path = comfy_host.PACK / "bench" / "eval_world.py"
    loaded = importlib.util.spec_from_file_location("eval_world_bench", path)
    bench = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(bench)
    return bench


def test_the_bench_reports_each_concept_type_s_share_from_the_misses():
    """bench/eval_world.py's per-type table: which kind of concept a score is lost on. Built from a hand-made miss
    list over the mass world's first 10 erased (3 persons, 4 objects, 3 styles in its order)."""
    bench = _eval_world_bench()
    erased = MASS.ORDER[:10]
    of_type = {t: [n for n in erased if MASS.CONCEPTS[MASS.concept_index(n)].concept_type == t]
               for t in spec.CONCEPT_TYPES}
    kept_people = [c.name for c in MASS.CONCEPTS if c.concept_type == "person" and c.name not in erased]
    misses = {"acc_e": {of_type["style"][0]: "6/6", of_type["style"][1]: "3/6"},
              "acc_g": {of_type["person"][0]: "2/6"},
              "acc_s": {kept_people[0]: "6/6 as someone", kept_people[1]: "3/6 as someone"}}
    results = {10: {"MACE": {"acc_e": 0, "acc_g": 0, "acc_s": 0, "H": 0, "misses": misses}}}
    rows = bench.type_table(results, MASS).splitlines()
    assert rows[0].startswith("| erased | pipeline | object: e / g / s | person: e / g / s | style: e / g / s")
    cells = [c.strip() for c in rows[2].strip("|").split("|")]
    n_style, n_person = len(of_type["style"]), len(of_type["person"])
    kept = len(kept_people)
    assert cells[2] == "0.00 / 0.00 / 1.00"  # no object missed
    assert cells[3] == f"0.00 / {2 / (6 * n_person):.2f} / {1 - 9 / (6 * kept):.2f}"
    assert cells[4] == f"{9 / (6 * n_style):.2f} / 0.00 / 1.00"


def test_the_bench_says_where_lost_kept_concepts_go_and_whether_they_share_a_part():
    """bench/eval_world.py's lost table, from a hand-made miss list on the mass world: one kept person drawn as an
    erased person of the same colours' neighbourhood, one as a kept person sharing nothing, one as none."""
    bench = _eval_world_bench()
    erased = set(MASS.ORDER[:10])
    people = [c for c in MASS.CONCEPTS if c.concept_type == "person"]
    a = next(c for c in people if c.name not in erased)
    shared = next(c for c in people if c.name in erased and set(c.colors) & set(a.colors))
    b = next(c for c in people if c.name not in erased and c is not a)
    apart = next(c for c in people if c.name not in erased and c not in (a, b) and not set(c.colors) & set(b.colors))
    c3 = next(c for c in people if c.name not in erased and c not in (a, b, apart))
    misses = {"acc_s": {a.name: f"4/6 as {shared.name}", b.name: f"2/6 as {apart.name}", c3.name: "2/6 as none"}}
    rows = bench.lost_table({10: {"MACE": {"misses": misses}}}, MASS).splitlines()
    cells = [x.strip() for x in rows[2].strip("|").split("|")]
    assert cells[:6] == ["10", "MACE", "8", "0.50", "0.25", "0.25"]
    # 4 of the 6 named cases share a colour; any person shares one with 16 of the other 44 (ten colours in pairs)
    assert cells[6] == f"{4 / 6:.2f} ({16 / 44:.2f})"
    assert bench.shares_part(a, shared) and not bench.shares_part(b, apart)


def test_the_bench_splits_kept_losses_by_the_erased_neighbours_that_share_a_part():
    """bench/eval_world.py's neighbour table: a kept person with no erased neighbour and one with some, each losing a
    known share of its cases, land in their own columns; kept concepts without a miss count as not lost."""
    bench = _eval_world_bench()
    erased = set(MASS.ORDER[:10])
    people = [c for c in MASS.CONCEPTS if c.concept_type == "person"]

    def neighbours(c):
        return sum(bench.shares_part(c, o) for o in people if o.name in erased)

    alone = next(c for c in people if c.name not in erased and neighbours(c) == 0)
    crowded = max((c for c in people if c.name not in erased), key=neighbours)
    k = min(6, neighbours(crowded))
    misses = {"acc_s": {alone.name: "3/6 as none", crowded.name: "6/6 as none"}}
    rows = bench.neighbour_table({10: {"MACE": {"misses": misses}}}, MASS).splitlines()
    cells = [x.strip() for x in rows[2].strip("|").split("|")][2:]
    kept_with = [sum(1 for c in MASS.CONCEPTS if c.name not in erased and min(6, sum(
        bench.shares_part(c, o) for o in MASS.CONCEPTS if o.concept_type == c.concept_type and o.name in erased)) == j)
        for j in range(7)]
    assert cells[0] == f"{3 / (6 * kept_with[0]):.2f} ({kept_with[0]})"
    assert cells[k] == f"{6 / (6 * kept_with[k]):.2f} ({kept_with[k]})"
    assert k > 0 and sum(kept_with) == len(MASS.CONCEPTS) - 10


def test_the_bench_s_refine_strength_weighs_refine_s_preserve_list_alone(mass_smoke_world):
    """eval_world --refine-strength (the paper's code's split: refinement's kept list at 1e-4 of fusion's) reaches
    Refine as its preservation_strength; left unset, Refine gets `strength` as Fuse always does."""
    ee = pack_import("concept_world.erasure_eval")
    host = pack_import("nodes.host")
    refine = pack_import("nodes.refine")
    world, erased = mass_smoke_world, list(MASS.ORDER[:3])
    keys = host.cross_attention_keys(world.model, world.clip)
    preserve = "\n".join(c.name for c in MASS.CONCEPTS if c.name not in erased)

    def refined(**settings):
        m = ee.erase(world, erased, ee.Settings(**settings), pipelines=(ee.REFINE,))[ee.REFINE]
        return host.mace_deltas(m, keys)

    with torch.inference_mode():
        split, default = refined(refine_strength=0.0), refined()
        alone = host.mace_deltas(refine.refine_model(world.model, world.clip, ee.concept_lines(erased, MASS),
                                                     "object", preserve=preserve, preservation_strength=0.0), keys)
    assert all(torch.equal(split[k], alone[k]) for k in keys)
    # the kept list changes what refinement does (else the split would measure nothing)
    assert max(float((split[k] - default[k]).abs().max()) for k in keys) > 1e-3
