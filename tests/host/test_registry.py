"""The registry lists every node explicitly: a node class written in nodes/ but left off the list would silently
never reach ComfyUI."""

import importlib

import comfy_host


def test_every_node_class_in_nodes_is_registered_once(pack, pack_module):
    from comfy_api.latest import io

    registry = importlib.import_module(f"{pack_module.__name__}.nodes.registry")
    listed = registry.all_nodes()
    defined = []
    for path in sorted((comfy_host.PACK / "nodes").glob("*.py")):
        module = importlib.import_module(f"{pack_module.__name__}.nodes.{path.stem}")
        defined += [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, io.ComfyNode)
                    and obj is not io.ComfyNode and obj.__module__ == module.__name__]
    assert defined, "no node classes found"
    assert sorted(c.__name__ for c in listed) == sorted(c.__name__ for c in defined)
    ids = [c.define_schema().node_id for c in listed]
    assert len(set(ids)) == len(ids)
    for node_id in ids:
        assert pack[node_id].__name__ == node_id, "ComfyUI registered the node under its id"
