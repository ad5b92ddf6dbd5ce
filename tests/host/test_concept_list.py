"""MACE Concept List (issue 16: one concept list through the whole graph) inside a real ComfyUI, on tiny real models:
the list feeds every stage exactly as the same text typed into each would, old text inputs keep working, a stage box
that disagrees with a connected list is refused by name, your own prompts and nicknames reach refinement, training
and fusion, and a caption corpus is read, cached and invalidated when the file changes."""

import json
import sys

import pytest
import torch
from safetensors import safe_open
from test_fuse import random_bundle

NODE = "MACEConceptList"
STAGES = ["MACERefineCrossAttention", "MACETrainConceptLoRA", "MACEFuseLoRAs", "MACESaveErasure", "MACELoadLoRAs",
          "MACEErase", "MACEErasureCheck", "MACEAttentionMap"]
CONCEPTS = "Claude Monet\nTomas Lindqvist => a man | celebrity"
PRESERVE = "Rembrandt | style\nTom Hanks"


def mod(pack_module, name):
    return sys.modules[f"{pack_module.__name__}.{name}"]


@pytest.fixture()
def input_dir(tmp_path):
    import folder_paths

    root = tmp_path / "input"
    root.mkdir()
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root))
    yield root
    folder_paths.set_input_directory(old)


@pytest.fixture()
def fresh_cache(mods, tmp_path, monkeypatch):
    """The statistics cache in a temporary folder and an empty memo, so a test sees every computation it causes."""
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setattr(mods.host, "cache_dir", lambda: str(folder))
    monkeypatch.setattr(mods.host, "_MEMO", {})
    calls = []
    real = mods.refine.prior_moment

    def counted(enc, prompts=None, **kw):
        calls.append(list(prompts) if prompts is not None else None)
        return real(enc, prompts, **kw)

    monkeypatch.setattr(mods.refine, "prior_moment", counted)
    return calls


def make(pack, concepts=CONCEPTS, concept_type="style", anchor="", preserve=PRESERVE, prompts="", concept_file="",
         corpus_file=""):
    return pack[NODE].execute(concepts, concept_type, anchor, preserve, prompts, concept_file, corpus_file).result[0]


def refine(pack, model, clip, concepts="", concept_type="style", anchor="", preserve="", concept_list=None,
           strength=1.0):
    return pack["MACERefineCrossAttention"].execute(model, clip, concepts, concept_type, anchor, preserve, strength,
                                                    0.01, concept_file="", concept_list=concept_list).result[0]


def deltas(mods, patched):
    keys = mods.host.cross_attention_keys(patched)
    cur, orig = mods.host.current_weights(patched, keys), mods.host.original_weights(patched, keys)
    return {k: (cur[k] - orig[k]).double() for k in keys}


def assert_same_patch(mods, a, b):
    da, db = deltas(mods, a), deltas(mods, b)
    assert da.keys() == db.keys()
    for k in da:
        assert torch.equal(da[k], db[k]), k


def latents(n):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(n))}


# ---------------------------------------------------------------- schema


def test_node_and_every_stage_take_the_list_as_their_last_optional_input(pack):
    s = pack[NODE].define_schema()
    assert s.display_name == "MACE Concept List" and s.category == "MACE" and s.description
    assert all(i.tooltip for i in s.inputs)
    assert [i.id for i in s.inputs] == ["concepts", "concept_type", "anchor", "preserve", "prompts", "concept_file",
                                        "corpus_file"]
    assert s.outputs[0].io_type == "MACE_CONCEPTS"
    # the list was the last input when it came; Train and Erase have since gained their image_* inputs after it
    later = ["image_steps", "image_cfg", "image_sampler", "image_scheduler"]
    for stage in STAGES:
        ids = [i.id for i in pack[stage].define_schema().inputs]
        after = later if stage in ("MACETrainConceptLoRA", "MACEErase") else []
        assert ids[len(ids) - len(after):] == after, stage
        listed = pack[stage].define_schema().inputs[len(ids) - len(after) - 1]
        assert (listed.id, listed.optional, listed.io_type) == ("concept_list", True, "MACE_CONCEPTS"), stage
        assert listed.tooltip, stage


def test_a_saved_api_graph_without_the_list_still_validates(pack):
    """Workflows saved before the list existed lack the input; ComfyUI's validation must accept them as they are."""
    import asyncio

    import execution

    prompt = {"1": {"class_type": "MACEConceptWorld", "inputs": {"seed": 0}},
              "2": {"class_type": "MACERefineCrossAttention",
                    "inputs": {"model": ["1", 0], "clip": ["1", 1], "concepts": "Claude Monet", "concept_type": "style",
                               "anchor": "", "preserve": "", "preservation_strength": 1.0, "lambda_": 0.01}}}
    ok, errors, _ = asyncio.run(execution.validate_inputs("t", prompt, "2", {}))
    assert ok, errors


# ---------------------------------------------------------------- one list, every stage


def test_the_list_refines_exactly_as_the_typed_text(pack, mods, tiny):
    model, clip = tiny
    typed = refine(pack, model, clip, CONCEPTS, "style", "", PRESERVE)
    listed = refine(pack, model, clip, concept_list=make(pack))
    assert_same_patch(mods, typed, listed)
    # the stage's own concept_type is not used when a list is connected: the list's type is
    assert_same_patch(mods, listed, refine(pack, model, clip, concept_type="object", concept_list=make(pack)))
    # and a box that says exactly what the list says is no conflict
    assert_same_patch(mods, listed, refine(pack, model, clip, CONCEPTS + "\n", "style", "", PRESERVE, make(pack)))


def test_the_list_trains_fuses_and_saves_as_the_typed_text(pack, mods, tiny, loras_dir):
    model, clip = tiny
    cl = make(pack)
    train = pack["MACETrainConceptLoRA"]
    common = dict(steps=2, learning_rate=1e-3, rank=1, seed=3, timestep_sampling="uniform", images_per_concept=1,
                  mask_source="whole image", latents=latents(2), settings="custom")
    with torch.inference_mode():
        typed = train.execute(model=model, clip=clip, concepts=CONCEPTS, concept_type="style", anchor="",
                              **common).result[0]
        listed = train.execute(model=model, clip=clip, concepts="", concept_type="celebrity", anchor="",
                               concept_list=cl, **common).result[0]
    assert [(lora.concept, lora.anchor, lora.concept_type) for lora in listed.loras] == \
        [("Claude Monet", "art", "style"), ("Tomas Lindqvist", "a man", "celebrity")]
    for a, b in zip(typed.loras, listed.loras):
        for k in a.up:
            assert torch.equal(a.up[k], b.up[k]) and torch.equal(a.down[k], b.down[k]), (a.concept, k)
    fuse = pack["MACEFuseLoRAs"]
    by_text = fuse.execute(model, clip, typed, PRESERVE, 1.0, 0.01, "input model").result[0]
    by_list = fuse.execute(model, clip, listed, "", 1.0, 0.01, "input model", cl).result[0]
    assert_same_patch(mods, by_text, by_list)
    pack["MACESaveErasure"].execute(by_list, "listed", "full", 64, None, "", cl)
    with safe_open(str(loras_dir / "listed.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["mace_concepts"])
    assert [(r["concept"], r["anchor"], r["family"]) for r in recorded] == \
        [("Claude Monet", "art", "style"), ("Tomas Lindqvist", "a man", "celebrity")]


def test_erase_quick_reads_the_list_as_refine_does(pack, mods, tiny):
    model, clip = tiny
    cl = make(pack)
    erased = pack["MACEErase"].execute(model, clip, "", "celebrity", "", "quick", "", 1.0, 0.01, 0, "",
                                       cl).result[0]
    assert_same_patch(mods, erased, refine(pack, model, clip, concept_list=cl))


# ---------------------------------------------------------------- precedence


@pytest.mark.parametrize("field,value", [("concepts", "Vincent van Gogh"), ("preserve", "Pablo Picasso"),
                                         ("anchor", "a painting")])
def test_a_stage_box_that_disagrees_with_the_list_is_refused_by_name(pack, mods, tiny, field, value):
    model, clip = tiny
    args = {"concepts": "", "anchor": "", "preserve": "", field: value}
    with pytest.raises(mods.errors.MaceInputError) as e:
        refine(pack, model, clip, args["concepts"], "style", args["anchor"], args["preserve"], make(pack))
    assert e.value.input_name == field and "concept_list" in str(e.value) and "MACE Refine" in str(e.value)


def test_train_and_fuse_refuse_a_disagreeing_box_and_list_too(pack, mods, tiny):
    model, clip = tiny
    with pytest.raises(mods.errors.MaceInputError) as e:
        mods.train.train_concept_loras(model, clip, "Vincent van Gogh", "style", concept_list=make(pack))
    assert e.value.input_name == "concepts"
    with pytest.raises(mods.errors.MaceInputError) as e:
        mods.fuse.fuse_model(model, clip, None, "Pablo Picasso", concept_list=make(pack))
    assert e.value.input_name == "preserve"


def test_fuse_refuses_loras_trained_with_another_anchor_than_the_list(pack, mods, pack_module, tiny):
    model, clip = tiny
    bundle = random_bundle(pack_module, model, ["Tom Cruise"])  # anchor 'a person'
    with pytest.raises(mods.errors.MaceInputError) as e:
        mods.fuse.fuse_model(model, clip, bundle, concept_list=make(pack, "Tom Cruise => a man", "celebrity", "", ""))
    assert e.value.input_name == "concept_list" and "a man" in str(e.value)


# ---------------------------------------------------------------- own prompts and nicknames


def test_prompts_line_reads_own_prompts_and_nicknames(pack):
    cl = make(pack, prompts="Claude Monet: water lilies at dawn by claude monet; {} painting a garden; "
                            "the painter of Giverny\n# a note\nTomas Lindqvist: Tommy L")
    monet, tomas = cl.concepts
    assert monet.extra == ("water lilies at dawn by {}", "{} painting a garden")
    assert monet.aliases == ("the painter of Giverny",)
    assert tomas.aliases == ("Tommy L",) and tomas.extra == ()
    prompts = monet.prompts()
    assert "water lilies at dawn by the painter of Giverny" in prompts and "a landscape by Claude Monet" in prompts
    assert len(prompts) == len(monet.prompts(anchor=True)) == 2 * len(monet.templates())


@pytest.mark.parametrize("prompts,fragment", [
    ("Vincent van Gogh: starry night", "not one of the concepts"),
    ("Claude Monet impressionism", "has no ':'"),
    ("Claude Monet: art", "is the anchor"),
    ("Claude Monet: Tomas Lindqvist", "already a concept"),
    ("Claude Monet: ; ", "no prompt or nickname"),
    ("Claude Monet: the (painter)", "prompt syntax"),
])
def test_bad_prompts_lines_name_the_input(pack, mods, prompts, fragment):
    with pytest.raises(mods.errors.MaceInputError) as e:
        make(pack, prompts=prompts)
    assert e.value.input_name == "prompts" and fragment in str(e.value)


def residual(mods, pack_module, clip, patched, word, anchor, templates):
    """|W e(word prompt) - W0 e(anchor prompt)| over the aligned tokens, all layers: what refinement drives down for
    the words it is given."""
    align = mod(pack_module, "mace_core.align").align_pairs
    enc = mods.host.clip_encoder(clip)
    ids_o, e_o = enc.encode([t.format(word) for t in templates])
    ids_n, e_n = enc.encode([t.format(anchor) for t in templates])
    keys = mods.host.cross_attention_keys(patched)
    w, w0 = mods.host.current_weights(patched, keys), mods.host.original_weights(patched, keys)
    total = 0.0
    for k in keys:
        for j in range(len(templates)):
            i_o, i_n = align(ids_o[j], ids_n[j], enc.end_id)
            total += float((e_o[j, i_o].double() @ w[k].double().T - e_n[j, i_n].double() @ w0[k].double().T)
                           .pow(2).sum())
    return total


def test_a_nickname_and_own_prompts_reach_refinement(pack, mods, pack_module, tiny):
    model, clip = tiny

    def listed(prompts=""):
        return refine(pack, model, clip, strength=0.0, concept_list=make(pack, "Claude Monet", preserve="",
                                                                         prompts=prompts))

    plain, nick = listed(), listed("Claude Monet: Oscar Giverny")
    own = listed("Claude Monet: water lilies by Claude Monet")
    d0, d1, d2 = deltas(mods, plain), deltas(mods, nick), deltas(mods, own)
    assert any(not torch.equal(d0[k], d1[k]) for k in d0) and any(not torch.equal(d0[k], d2[k]) for k in d0)
    templates = mods.concepts.TEMPLATES["style"]
    # refinement maps the nickname's prompts onto the anchor's once the nickname is listed, and not before
    r_plain = residual(mods, pack_module, clip, plain, "Oscar Giverny", "art", templates)
    r_nick = residual(mods, pack_module, clip, nick, "Oscar Giverny", "art", templates)
    assert r_nick < 0.7 * r_plain, (r_plain, r_nick)
    r_own0 = residual(mods, pack_module, clip, plain, "Claude Monet", "art", ["water lilies by {}"])
    r_own = residual(mods, pack_module, clip, own, "Claude Monet", "art", ["water lilies by {}"])
    # one prompt among the type's thirty: a smaller, but certain, pull on its own tokens (measured 6405 -> 5988)
    assert r_own < 0.97 * r_own0, (r_own0, r_own)


def test_own_prompts_and_nicknames_reach_training_and_fusion(pack, mods, tiny, monkeypatch):
    model, clip = tiny
    seen = []
    real = mods.att.ConceptData

    def spy(prompts, *a, **kw):  # the training data each concept's LoRA sees
        seen.append([p.text for p in prompts])
        return real(prompts, *a, **kw)

    monkeypatch.setattr(mods.att, "ConceptData", spy)
    cl = make(pack, "Claude Monet", preserve="", prompts="Claude Monet: water lilies by Claude Monet; Oscar Giverny")
    with torch.inference_mode():
        bundle = pack["MACETrainConceptLoRA"].execute(
            model=model, clip=clip, concepts="", concept_type="style", anchor="", steps=1, learning_rate=1e-3, rank=1,
            seed=0, timestep_sampling="uniform", images_per_concept=1, mask_source="whole image",
            latents=latents(1), concept_list=cl).result[0]
    # the batch-size probe builds the same data too: every copy carries the same prompts
    texts = seen[-1]
    assert all(t == texts for t in seen)
    assert "water lilies by Claude Monet" in texts and "water lilies by Oscar Giverny" in texts
    assert "a landscape by Oscar Giverny" in texts and "a landscape by Claude Monet" in texts
    assert len(texts) == 2 * (len(mods.concepts.TEMPLATES["style"]) + 1)
    plain = mods.fuse.fuse_model(model, clip, bundle, concept_list=make(pack, "Claude Monet", preserve=""))
    with_nick = mods.fuse.fuse_model(model, clip, bundle, concept_list=cl)
    d0, d1 = deltas(mods, plain), deltas(mods, with_nick)
    assert any(not torch.equal(d0[k], d1[k]) for k in d0), "the nickname's prompts weigh in fusion"


def test_erasure_check_rows_come_from_the_list_with_nickname_rows(pack, mods, pack_module):
    check = mod(pack_module, "nodes.check")
    cl = make(pack, "Claude Monet", preserve="Rembrandt | style", prompts="Claude Monet: Oscar Giverny")
    rows = check.check_rows(list(cl.concepts), "", list(cl.preserve), cl.concept_type)
    assert [(r.kind, r.prompt) for r in rows] == [
        ("erased", "a painting in the style of Claude Monet"), ("other", "a painting in the style of Oscar Giverny"),
        ("preserved", "a painting in the style of Rembrandt")]


# ---------------------------------------------------------------- the caption corpus


def test_corpus_is_read_cached_and_invalidated_when_the_file_changes(pack, mods, pack_module, tiny, input_dir,
                                                                     fresh_cache):
    model, clip = tiny
    captions = input_dir / "captions.txt"
    captions.write_text("a red kite over a beach\n\n# a comment\na bowl of  soup on a table\n")
    node = pack[NODE]
    fp1 = node.fingerprint_inputs(corpus_file="captions.txt")
    cl = make(pack, "Claude Monet", preserve="", corpus_file="captions.txt")
    assert cl.corpus == ("a red kite over a beach", "a bowl of soup on a table")
    no_corpus = refine(pack, model, clip, concept_list=make(pack, "Claude Monet", preserve=""))
    with_corpus = refine(pack, model, clip, concept_list=cl)
    assert [c[-2:] if c else c for c in fresh_cache] == [None, ["a red kite over a beach", "a bowl of soup on a table"]]
    d0, d1 = deltas(mods, no_corpus), deltas(mods, with_corpus)
    assert any(not torch.equal(d0[k], d1[k]) for k in d0), "the corpus changes the prior"
    # cached: refine again, and fuse with the same corpus, compute nothing new
    refine(pack, model, clip, concept_list=cl)
    bundle = random_bundle(pack_module, model, ["Claude Monet"])
    for lora in bundle.loras:
        lora.anchor, lora.concept_type = "art", "style"
    mods.fuse.fuse_model(model, clip, bundle, concept_list=cl)
    assert len(fresh_cache) == 2
    # on disk too: a new process (an empty memo) reads the file instead of computing
    mods.host._MEMO.clear()
    refine(pack, model, clip, concept_list=cl)
    assert len(fresh_cache) == 2
    # the file changes under the same name: a new fingerprint, and new statistics
    captions.write_text("a red kite over a beach\na green bicycle in the snow\n")
    assert node.fingerprint_inputs(corpus_file="captions.txt") != fp1
    changed = refine(pack, model, clip, concept_list=make(pack, "Claude Monet", preserve="",
                                                          corpus_file="captions.txt"))
    assert len(fresh_cache) == 3 and fresh_cache[-1][-1] == "a green bicycle in the snow"
    d2 = deltas(mods, changed)
    assert any(not torch.equal(d1[k], d2[k]) for k in d1)


@pytest.mark.parametrize("name,content,fragment", [
    ("../outside.txt", None, "outside ComfyUI's input folder"),
    ("missing.txt", None, "no file 'missing.txt'"),
    ("empty.txt", "\n# only a comment\n  \n", "holds no captions"),
    ("captions.csv", "a,b\n", "not a .txt file"),
])
def test_bad_corpus_file_names_the_input(pack, mods, input_dir, name, content, fragment):
    if content is not None:
        (input_dir / name).write_text(content)
    with pytest.raises(mods.errors.MaceInputError) as e:
        make(pack, "Claude Monet", corpus_file=name)
    assert e.value.input_name == "corpus_file" and fragment in str(e.value)


def test_a_wrong_object_on_the_list_input_names_it(pack, mods, tiny):
    model, clip = tiny
    with pytest.raises(mods.errors.MaceInputError) as e:
        refine(pack, model, clip, concept_list="Claude Monet")
    assert e.value.input_name == "concept_list"


def test_load_loras_takes_type_and_anchor_from_the_list_for_a_foreign_file(pack, mods, tiny, loras_dir):
    """A LoRA trained elsewhere records no type or anchor: the list's entry for its concept gives them, so Fuse reads
    it with the same templates as the other stages."""
    from safetensors.torch import save_file

    model, _ = tiny
    keys = mods.host.cross_attention_keys(model)
    w0 = mods.host.original_weights(model, keys)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, w in w0.items():
        stem = k[: -len(".weight")]
        sd[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], 1, generator=g)
        sd[f"{stem}.lora_down.weight"] = torch.randn(1, w.shape[1], generator=g)
    save_file(sd, str(loras_dir / "foreign.safetensors"))
    cl = make(pack, "Claude Monet | style\nTom Hanks", "celebrity", "", "")
    load = pack["MACELoadLoRAs"]
    (lora,) = load.execute(model, "foreign.safetensors => Claude Monet", "celebrity", "", True, cl).result[0].loras
    assert (lora.concept, lora.anchor, lora.concept_type) == ("Claude Monet", "art", "style")
    (plain,) = load.execute(model, "foreign.safetensors => Claude Monet", "celebrity", "", True).result[0].loras
    assert (plain.anchor, plain.concept_type) == ("a person", "celebrity"), "without the list: the node's own type"
    with pytest.raises(mods.errors.MaceInputError) as e:
        load.execute(model, "foreign.safetensors => Claude Monet", "celebrity", "a painter", True, cl)
    assert e.value.input_name == "anchor"


def test_the_log_says_the_list_was_used(pack, tiny, caplog):
    import logging

    model, clip = tiny
    with caplog.at_level(logging.INFO, logger="MACE"):
        refine(pack, model, clip, concept_type="object", concept_list=make(pack))
    assert "MACE Refine: 2 concepts and 2 to preserve from the connected concept_list (type style)" in caplog.text


def test_thousands_of_captions_are_read_and_an_oversized_file_is_refused(pack, mods, pack_module, input_dir):
    files = mod(pack_module, "mace_core.concept_files")
    (input_dir / "many.txt").write_text("".join(f"a photo of house number {i}\n" for i in range(5000)))
    cl = make(pack, "Claude Monet", corpus_file="many.txt")
    assert len(cl.corpus) == 5000 and cl.corpus[-1] == "a photo of house number 4999" and cl.corpus_name == "many.txt"
    with open(input_dir / "huge.txt", "wb") as f:
        f.truncate(files.MAX_BYTES + 1)
    with pytest.raises(mods.errors.MaceInputError) as e:
        make(pack, "Claude Monet", corpus_file="huge.txt")
    assert e.value.input_name == "corpus_file" and "MiB" in str(e.value)


def test_a_cancel_while_a_corpus_is_encoded_stops_refine_and_caches_nothing(pack, mods, tiny, input_dir, fresh_cache,
                                                                             monkeypatch, tmp_path):
    """A caption corpus (up to 100k lines) is encoded in batches of 64 on the first use; a cancel pressed meanwhile
    stops at the next batch, leaves the model as it was and writes no statistics, so the next run computes them."""
    import comfy.model_management as mm
    import comfy_host

    model, clip = tiny
    (input_dir / "many.txt").write_text("\n".join(f"a photo of thing number {i} on a table" for i in range(300)))
    cl = make(pack, "Claude Monet", preserve="", corpus_file="many.txt")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    encoded = []
    enc = mods.host.clip_encoder(clip)
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda prompts: encoded.append(len(prompts)) or real(prompts))
    calls = comfy_host.interrupt_at_check(monkeypatch, 2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            refine(pack, model, clip, concept_list=cl)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2 and encoded.count(64) == 2, "stopped at the second of the corpus's 8 batches, not after all"
    folder = tmp_path / "cache"
    assert not list(folder.iterdir()), "a cancelled prior is not cached"
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.patches
