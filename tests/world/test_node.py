"""The loader node, through ComfyUI's V3 node API the way the executor runs it."""

import torch
from world_support import pack_import


def _node(host):
    return pack_import("nodes.concept_world")


def test_schema(host):
    mod = _node(host)
    cls = mod.MACEConceptWorld
    assert mod.NODES == [cls]
    cls.VALIDATE_CLASS()
    schema = cls.GET_SCHEMA()
    assert schema.node_id == "MACEConceptWorld"
    assert schema.display_name == "MACE Concept World" and schema.category == "MACE/demo"
    assert schema.description
    # each new input comes last, so workflows saved before it keep their widget values in order
    assert [i.id for i in schema.inputs] == ["seed", "family", "concepts"] and all(i.tooltip for i in schema.inputs)
    assert schema.inputs[0].default == 0
    assert schema.inputs[1].default == "SD1.5" and schema.inputs[1].options == ["SD1.5", "SDXL"]
    info = cls.GET_NODE_INFO_V1()
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    assert "seed" in cls.INPUT_TYPES()["required"]


def test_execute_as_the_executor_does(host, smoke_world, monkeypatch):
    from comfy_api.internal import make_locked_method_func

    mod = _node(host)
    seen = []
    monkeypatch.setattr(mod.concept_world, "load_or_train", lambda seed, **options: seen.append(seed) or smoke_world)
    cls = mod.MACEConceptWorld
    cls.VALIDATE_CLASS()
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        out = f(seed=3)
    assert seen == [3]
    assert out.result == (smoke_world.model, smoke_world.clip, smoke_world.vae)


def test_family_option_loads_the_sdxl_world(host, smoke_world, sdxl_smoke_world, monkeypatch):
    """SDXL asks for the SDXL world; leaving the option out (an old workflow) asks for the SD1.5 one, as before."""
    from comfy_api.internal import make_locked_method_func

    mod = _node(host)
    calls = []

    def fake(seed, family="sd15"):
        calls.append((seed, family))
        return sdxl_smoke_world if family == "sdxl" else smoke_world

    monkeypatch.setattr(mod.concept_world, "load_or_train", fake)
    cls = mod.MACEConceptWorld
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        xl = f(seed=5, family="SDXL")
        old = f(seed=5)
    assert calls == [(5, "sdxl"), (5, "sd15")]
    assert xl.result == (sdxl_smoke_world.model, sdxl_smoke_world.clip, sdxl_smoke_world.vae)
    assert old.result[0] is smoke_world.model
