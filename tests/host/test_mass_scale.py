"""Mass scale inside a real ComfyUI, on tiny real models: concept lists from files with mixed types, 1000-concept
refinement and fusion with a measured memory bound, and resumable training.

Memory is watched from the nodes' own progress calls (ComfyUI's cancel check runs once per concept): the resident set
size of the process, and how many feature tensors the text encoder handed out are still alive. Keeping one concept's
prompt features (30 prompts x 77 tokens x 64 floats, 0.6 MB here) for each of 1000 concepts would hold about 600 MB
and 1000 tensors; streaming holds a few.
"""

import gc
import itertools
import logging
import os
import time
import weakref

import comfy_host  # noqa: F401  (conftest boots the host)
import psutil
import pytest
import torch

REFINE, TRAIN, FUSE = "MACERefineCrossAttention", "MACETrainConceptLoRA", "MACEFuseLoRAs"
CONCEPT_TYPES = ("celebrity", "style", "object", "explicit")
log = logging.getLogger("MACE.test")

RSS_BOUND = 96 * 2**20  # growth allowed over the run; holding per-concept features would take ~600 MB
ALIVE_BOUND = 4  # encoder outputs alive at once (an anchor set, a concept); per-concept or per-anchor: 200+

pytestmark = pytest.mark.usefixtures("unloaded")


@pytest.fixture()
def input_dir(tmp_path, monkeypatch):
    """ComfyUI's input folder redirected to a temporary one."""
    import folder_paths

    root = tmp_path / "input"
    root.mkdir()
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(root))
    yield root
    folder_paths.set_input_directory(old)


# ---------------------------------------------------------------- many distinct concepts

_FIRST = ["Ba", "Ke", "Lo", "Mi", "Nu", "Ra", "Se", "To", "Vi", "Zo"]
_SECOND = ["dan", "len", "mir", "sok", "tav", "bel", "gor", "pim", "rus", "wen"]
_SURNAMES = ["Hartwell", "Okonkwo", "Lindqvist", "Moreau", "Castellano", "Tanaka", "Brennan", "Vasquez", "Kowalski",
             "Ashford"]
_ADJ = ["tall", "quiet", "bright", "small", "old", "young", "plain", "famous", "dark", "calm", "red", "green", "blue",
        "happy", "strange", "gentle", "modern", "simple", "wild", "soft"]
_NOUN = ["person", "figure", "picture", "thing", "scene", "shape", "artist", "object", "painting", "image"]


def names(n: int = 1000) -> list[str]:
    """Distinct two-word names made of letters only (numbered names like 'concept 0001' share most tokens)."""
    out = [f"{a}{b} {s}" for a, b, s in itertools.product(_FIRST, _SECOND, _SURNAMES)][:n]
    assert len({x.lower() for x in out}) == n
    return out


def anchors() -> list[str]:
    return [f"a {a} {b}" for a, b in itertools.product(_ADJ, _NOUN)]  # 200 distinct


def big_csv(n: int = 1000) -> str:
    an = anchors()
    rows = [f"{name},{an[i % len(an)]},{CONCEPT_TYPES[i % 4]}" for i, name in enumerate(names(n))]
    return "concept,anchor,type\n" + "\n".join(rows) + "\n"


class MemoryWatch:
    """Samples RSS and live encoder outputs at every progress/cancel call of the node under test."""

    def __init__(self, enc, monkeypatch):
        import comfy.model_management as mm

        self.proc = psutil.Process()
        self.made = self.freed = 0
        self.calls = 0
        self.max_alive = 0
        real_encode, real_check = enc.encode, mm.throw_exception_if_processing_interrupted

        def encode(prompts):
            ids, feats = real_encode(prompts)
            self.made += 1
            weakref.finalize(feats, self._freed)
            return ids, feats

        def check():
            self.calls += 1
            self.max_alive = max(self.max_alive, self.made - self.freed)
            self.peak = max(self.peak, self.proc.memory_info().rss)
            real_check()

        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        monkeypatch.setattr(enc, "encode", encode)
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", check)

    def _freed(self):
        self.freed += 1

    @property
    def growth(self) -> int:
        return self.peak - self.base


def delta(patcher, key):
    (_, (kind, (d,)), *_), = patcher.patches[key]
    assert kind == "diff"
    return d


def test_inputs_added_last_and_optional(pack):
    r = [i for i in pack[REFINE].define_schema().inputs]
    t = [i for i in pack[TRAIN].define_schema().inputs]
    assert [i.id for i in r][-3:] == ["concept_file", "edit_pooled", "concept_list"] and all(i.optional for i in r[-3:])
    assert r[-3].default == "" and r[-2].default is False
    assert [i.id for i in t][-9:] == ["concept_file", "resume_folder", "settings", "batch", "concept_list",
                                      "image_steps", "image_cfg", "image_sampler", "image_scheduler"]
    assert all(i.optional for i in t[-9:])
    assert [i.id for i in r][:8] == ["model", "clip", "concepts", "concept_type", "anchor", "preserve",
                                     "preservation_strength", "lambda_"], "existing inputs keep their order"


def check_and_report(out, keys, watch, dt, what):
    """Every cross-attention matrix patched with finite values; the run's time and memory logged and printed."""
    assert sorted(out.patches) == keys
    assert all(torch.isfinite(delta(out, k)).all() for k in keys)
    msg = (f"{what}: {dt:.1f}s, RSS growth {watch.growth / 2**20:.1f} MiB, at most {watch.max_alive} encoder outputs "
           f"alive, {watch.made} encoded")
    log.info(msg)
    print("\n" + msg)


def test_thousand_concept_refine_from_a_file_streams(pack, mods, tiny, input_dir, monkeypatch):
    model, clip = tiny
    (input_dir / "thousand.csv").write_text(big_csv())
    with torch.inference_mode():  # as the executor runs nodes (the tiny CLIP's weights are inference tensors)
        enc = mods.host.clip_encoder(clip)
        pack[REFINE].execute(model, clip, "Claude Monet", "style", "", "", 1.0, 0.01)  # prior cached before measuring
        watch = MemoryWatch(enc, monkeypatch)
        t0 = time.perf_counter()
        out = pack[REFINE].execute(model, clip, "", "celebrity", "", "Tom Hanks", 1.0, 0.01,
                                   concept_file="thousand.csv").result[0]
        dt = time.perf_counter() - t0
    check_and_report(out, mods.host.cross_attention_keys(model), watch, dt,
                     "refine 1000 concepts (200 distinct anchors, 4 types)")
    assert watch.calls >= 1000, "the node reported progress per concept"
    assert watch.made >= 1000 + 200
    assert watch.max_alive <= ALIVE_BOUND, "per-concept or per-anchor features are being kept"
    assert watch.growth < RSS_BOUND


def test_thousand_lora_fusion_streams(pack, mods, tiny, monkeypatch):
    model, clip = tiny
    host, lb = mods.host, mods.bundle
    with torch.inference_mode():
        keys = host.cross_attention_keys(model, clip)
        enc = host.clip_encoder(clip)
        w0 = {k: w.clone() for k, w in host.original_weights(model, keys).items()}
    g = torch.Generator().manual_seed(0)
    an = anchors()
    loras = []
    for i, name in enumerate(names()):
        up = {k: torch.randn(w.shape[0], 1, generator=g) * 0.05 for k, w in w0.items()}
        down = {k: torch.randn(1, w.shape[1], generator=g) / w.shape[1] ** 0.5 for k, w in w0.items()}
        loras.append(lb.ConceptLoRA(name, an[i % len(an)], CONCEPT_TYPES[i % 4], 1, 50, up, down))
    bundle = lb.LoRABundle(loras, "")
    with torch.inference_mode():
        pack[FUSE].execute(model, clip, lb.LoRABundle(loras[:1], ""), "", 1.0, 0.01)  # prior cached
        watch = MemoryWatch(enc, monkeypatch)
        t0 = time.perf_counter()
        out = pack[FUSE].execute(model, clip, bundle, "Tom Hanks", 1.0, 0.01).result[0]
        dt = time.perf_counter() - t0
    check_and_report(out, keys, watch, dt, "fuse 1000 rank-1 LoRAs (4 types)")
    assert watch.calls >= 1000 and watch.made >= 1000
    assert watch.max_alive <= ALIVE_BOUND
    assert watch.growth < RSS_BOUND


# ---------------------------------------------------------------- mixed types: own templates and anchors

MIXED_CSV = """concept,anchor,type
Tom Hanks,,
Claude Monet,,style
Mickey Mouse,a mouse,object
nudity,,explicit
"""


def test_mixed_list_gives_each_concept_its_own_templates_and_anchor(pack, mods, tiny, input_dir, monkeypatch):
    model, clip = tiny
    T = mods.concepts.TEMPLATES
    (input_dir / "mixed.csv").write_text(MIXED_CSV)
    expected = {"Tom Hanks": ("a man", "celebrity"), "Claude Monet": ("art", "style"),
                "Mickey Mouse": ("a mouse", "object"), "nudity": ("a person wearing clothes", "explicit"),
                "Van Gogh": ("a painter", "style")}
    box = "Van Gogh => a painter | style"
    with torch.inference_mode():
        enc = mods.host.clip_encoder(clip)
    encoded = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda prompts: (encoded.extend(prompts), real(prompts))[1])
    with torch.inference_mode():
        pack[REFINE].execute(model, clip, box, "celebrity", "a man", "", 0.0, 0.01, concept_file="mixed.csv")
    for name, (anchor, concept_type) in expected.items():
        own = {p for p in encoded if name in p}
        assert own == {t.format(name) for t in T[concept_type]}, f"{name} uses the {concept_type} templates only"
        assert {t.format(anchor) for t in T[concept_type]} <= set(encoded), f"{name} maps onto '{anchor}'"

    # training: each concept's prompts from its own templates; the bundle records type and anchor
    seen = {}
    real_prompts = mods.att.concept_prompts

    def spy(clip_, concept, templates, end_id, with_end=True):
        seen[concept.name] = (concept.anchor, concept.concept_type, list(templates))
        return real_prompts(clip_, concept, templates, end_id, with_end)

    monkeypatch.setattr(mods.att, "concept_prompts", spy)
    lat = {"samples": torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        bundle = pack[TRAIN].execute(model, clip, box, "celebrity", "a man", 1, 1e-2, 1, 0, "uniform", 1,
                                     "whole image", latents=lat, concept_file="mixed.csv").result[0]
    assert bundle.concepts == ["Van Gogh", "Tom Hanks", "Claude Monet", "Mickey Mouse", "nudity"]
    for lora in bundle.loras:
        anchor, concept_type = expected[lora.concept]
        assert (lora.anchor, lora.concept_type) == (anchor, concept_type)
        assert seen[lora.concept] == (anchor, concept_type, T[concept_type])

    # fusion encodes each LoRA's prompts with its own templates
    encoded.clear()
    with torch.inference_mode():
        pack[FUSE].execute(model, clip, bundle, "", 0.0, 0.01)
    for name, (_, concept_type) in expected.items():
        assert {p for p in encoded if name in p} == {t.format(name) for t in T[concept_type]}


def test_concept_file_errors_and_cache_fingerprint(pack, tiny, input_dir):
    from_pack = pack[REFINE]
    model, clip = tiny
    (input_dir / "bad.csv").write_text("concept,type\nTom Hanks,animal\n")
    with torch.inference_mode(), pytest.raises(Exception, match=r"'bad.csv' line 2: unknown concept type 'animal'"):
        from_pack.execute(model, clip, "", "celebrity", "", "", 0.0, 0.01, concept_file="bad.csv")
    with torch.inference_mode(), pytest.raises(Exception, match="no file 'none.csv'"):
        from_pack.execute(model, clip, "", "celebrity", "", "", 0.0, 0.01, concept_file="none.csv")
    (input_dir / "list.txt").write_text("Tom Hanks\n")
    f1 = from_pack.fingerprint_inputs(concept_file="list.txt")
    assert from_pack.fingerprint_inputs(concept_file="list.txt") == f1
    (input_dir / "list.txt").write_text("Tom Hanks\nMeryl Streep\n")
    assert from_pack.fingerprint_inputs(concept_file="list.txt") != f1, "an edited file reruns the node"
    assert pack[TRAIN].fingerprint_inputs(concept_file="") == from_pack.fingerprint_inputs() == ""


# ---------------------------------------------------------------- resumable training

RESUME_NAMES = ["Tom Hanks", "Claude Monet | style", "Mickey Mouse | object", "Meryl Streep"]


def count_training(mods, monkeypatch) -> list:
    """The concepts nodes/train.py actually trains, in order (one entry per concept of every batch started)."""
    trained, real = [], mods.train.train_batch

    def spy(task, cfg, generators, *a, **k):
        trained.extend(generators)  # one generator per concept of the batch
        return real(task, cfg, generators, *a, **k)

    monkeypatch.setattr(mods.train, "train_batch", spy)
    return trained


def _train(pack, model, clip, n, folder="", steps=2, seed=3, batch=0):
    lat = {"samples": torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(4))[:2 * n]}
    with torch.inference_mode():
        return pack[TRAIN].execute(model, clip, "\n".join(RESUME_NAMES[:n]), "celebrity", "", steps, 1e-2, 1, seed,
                                   "uniform", 2, "whole image", latents=lat, resume_folder=folder,
                                   batch=batch).result[0]


def test_other_image_settings_train_again_and_the_same_ones_resume(pack, mods, tiny, loras_dir, monkeypatch):
    """A concept's file records how its images were made: a rerun with the same image settings loads it, one with
    another sampler run trains it again (its images are other images)."""
    model, clip = tiny
    trained = count_training(mods, monkeypatch)

    def run(**image):
        with torch.inference_mode():
            return mods.train.train_concept_loras(model, clip, "Tom Hanks\nMeryl Streep", "celebrity", steps=2,
                                                  learning_rate=1e-2, images_per_concept=1, image_size=64,
                                                  mask_source="whole image", settings="custom",
                                                  resume_folder="mace/images", **image)[0]

    first = run(image_steps=3)
    assert len(trained) == 2
    again = run(image_steps=3)
    assert len(trained) == 2, "the same image settings: both loaded"
    _same(first, again)
    run(image_steps=3, image_cfg=2.5)
    assert len(trained) == 4, "another guidance: other images, trained again"


def exact_device() -> bool:
    """CPU training is bitwise reproducible; CUDA kernels (atomics in backward) are not run to run, so there two
    uninterrupted runs differ as much as a resumed and an uninterrupted one."""
    import comfy.model_management as mm

    return mm.get_torch_device().type == "cpu"


def _same(a, b):
    assert a.concepts == b.concepts
    for x, y in zip(a.loras, b.loras):
        fields = ("concept", "anchor", "concept_type", "rank", "steps", "scale")
        assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]
        assert x.keys == y.keys
        for k in x.keys:
            assert torch.equal(x.up[k], y.up[k]) and torch.equal(x.down[k], y.down[k]), (x.concept, k)
        assert x.meta["losses"] == y.meta["losses"]


@pytest.mark.parametrize("batch", [1, 2])
def test_interrupted_training_resumes_where_it_stopped(pack, mods, tiny, loras_dir, monkeypatch, batch):
    """One concept at a time, or two per batch: each concept's file is written as soon as its batch is done, and a
    rerun trains only the missing ones, to the LoRAs an uninterrupted run (with the same batches) gives."""
    import comfy.model_management as mm

    model, clip = tiny
    full = _train(pack, model, clip, 4, batch=batch)  # uninterrupted, resume off

    folder = loras_dir / "mace" / "run1"
    trained = count_training(mods, monkeypatch)
    real_check = mm.throw_exception_if_processing_interrupted

    def stop_after_two():
        if folder.is_dir() and len(list(folder.glob("*.safetensors"))) >= 2:
            mm.interrupt_current_processing(True)
        real_check()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", stop_after_two)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(pack, model, clip, 4, "mace/run1", batch=batch)
    finally:
        mm.interrupt_current_processing(False)
        monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", real_check)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == ["claude-monet.safetensors", "tom-hanks.safetensors"], "each concept written when done"
    assert len(trained) == 2 + batch, "stopped during the batch after the first two concepts"
    assert not list(folder.glob("*.tmp")), "no half-written file"
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}

    trained.clear()
    resumed = _train(pack, model, clip, 4, "mace/run1", batch=batch)
    assert len(trained) == 2, "only the two missing concepts are trained"
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors") if p.name in mtimes} == mtimes
    assert len(list(folder.glob("*.safetensors"))) == 4
    if exact_device():
        _same(resumed, full)  # same seed: the same LoRAs as the uninterrupted run

    trained.clear()
    again = _train(pack, model, clip, 4, "mace/run1", batch=batch)
    assert not trained, "everything loaded"
    _same(again, resumed)  # the files give back exactly what was trained, on any device

    trained.clear()
    other = _train(pack, model, clip, 4, "mace/run1", steps=3, batch=batch)
    assert len(trained) == 4, "files trained with other settings are not reused"
    assert all(lora.steps == 3 for lora in other.loras)


def test_appending_concepts_trains_only_the_new_ones(pack, mods, tiny, loras_dir, monkeypatch):
    # two concepts per batch in every run: the appended pair is then trained in the batch an uninterrupted run puts
    # it in, so the LoRAs are bitwise equal (other batch sizes agree to float rounding: test_train_batch.py)
    model, clip = tiny
    trained = count_training(mods, monkeypatch)
    first = _train(pack, model, clip, 2, "mace/run2", batch=2)
    assert len(trained) == 2
    trained.clear()
    full = _train(pack, model, clip, 4, "mace/run2", batch=2)
    assert len(trained) == 2
    _same(type(full)(full.loras[:2], full.base), first)
    trained.clear()
    plain = _train(pack, model, clip, 4, batch=2)
    assert len(trained) == 4
    if exact_device():
        _same(full, plain)  # the same as one uninterrupted run without a folder
    with pytest.raises(Exception, match="outside models/loras") as e:
        _train(pack, model, clip, 1, "../elsewhere")
    assert e.value.input_name == "resume_folder"
    assert os.path.isdir(loras_dir / "mace" / "run2")
