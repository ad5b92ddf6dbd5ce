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
    assert [i.id for i in schema.inputs] == ["seed"] and all(i.tooltip for i in schema.inputs)
    assert schema.inputs[0].default == 0
    info = cls.GET_NODE_INFO_V1()
    assert info["output"] == ["MODEL", "CLIP", "VAE"]
    assert "seed" in cls.INPUT_TYPES()["required"]


def test_execute_as_the_executor_does(host, smoke_world, monkeypatch):
    from comfy_api.internal import make_locked_method_func

    mod = _node(host)
    seen = []
    monkeypatch.setattr(mod.concept_world, "load_or_train", lambda seed: seen.append(seed) or smoke_world)
    cls = mod.MACEConceptWorld
    cls.VALIDATE_CLASS()
    f = make_locked_method_func(cls, cls.FUNCTION, cls.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        out = f(seed=3)
    assert seen == [3]
    assert out.result == (smoke_world.model, smoke_world.clip, smoke_world.vae)
