"""Graphs written once in Python, emitted as ComfyUI API format (run headless) and UI format (drag and drop).

The UI form is derived from the API form and each node's definition (ComfyUI's /object_info shape), so the two never
drift apart; `check_ui` validates a UI file against node definitions (types exist, links agree, widgets fit).
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class Ref(tuple):
    """An output socket: (node id, output slot)."""


class Node:
    def __init__(self, graph, node_id: str, class_type: str, inputs: dict, title: str | None):
        self.graph, self.id, self.class_type, self.inputs, self.title = graph, node_id, class_type, inputs, title

    def __getitem__(self, slot: int) -> Ref:
        return Ref((self.id, slot))


class Graph:
    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, class_type: str, title: str | None = None, **inputs) -> Node:
        node = Node(self, str(len(self.nodes) + 1), class_type, inputs, title)
        self.nodes.append(node)
        return node

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = {k: [v[0], v[1]] if isinstance(v, Ref) else v for k, v in n.inputs.items()}
            out[n.id] = {"class_type": n.class_type, "inputs": inputs}
            if n.title:
                out[n.id]["_meta"] = {"title": n.title}
        return out


def _spec(info: dict, name: str):
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec is not None:
            return spec
    return None


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _ordered_inputs(info: dict) -> list[str]:
    order = info.get("input_order") or {g: list(v) for g, v in info["input"].items()}
    return list(order.get("required", [])) + list(order.get("optional", []))


def _has_control(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate"))


def to_ui(api: dict, object_info: dict, layout: dict[str, tuple[int, int]] | None = None) -> dict:
    """UI-format workflow (litegraph JSON, version 0.4) for an API graph."""
    layout = layout or {}
    nodes, links = [], []
    link_id = 0
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for order, (nid, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        ui_inputs, widgets = [], []
        for name in _ordered_inputs(info):
            spec = _spec(info, name)
            value = node["inputs"].get(name)
            if _is_widget(spec) and not isinstance(value, list):
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                widgets.append(default if value is None else value)
                if _has_control(spec):
                    widgets.append("fixed")
                continue
            entry = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": None}
            if isinstance(value, list):
                link_id += 1
                src, slot = value
                src_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), len(ui_inputs), src_type])
                outputs_links.setdefault((src, slot), []).append(link_id)
                entry["link"] = link_id
            if _is_widget(spec):
                entry["widget"] = {"name": name}
            ui_inputs.append(entry)
        pos = layout.get(nid, (60 + 360 * (order % 5), 80 + 320 * (order // 5)))
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": list(pos), "size": [320, 200], "flags": {},
            "order": order, "mode": 0, "inputs": ui_inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if node.get("_meta", {}).get("title") else {}),
        })
    for n in nodes:
        info = object_info[n["type"]]
        names = info.get("output_name") or info["output"]
        n["outputs"] = [{"name": names[i], "type": t, "links": outputs_links.get((str(n["id"]), i), []),
                         "slot_index": i} for i, t in enumerate(info["output"])]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def check_ui(ui: dict, object_info: dict, file_inputs=("ckpt_name", "lora_name")) -> list[str]:
    """Problems a UI workflow would show when dropped into ComfyUI (empty list: none)."""
    problems = []
    by_id = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        info = object_info.get(n["type"])
        if info is None:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        expected = []
        for name in _ordered_inputs(info):
            spec = _spec(info, name)
            linked = any(i["name"] == name and i.get("link") is not None for i in n["inputs"])
            if _is_widget(spec) and not linked:
                expected.append((name, spec))
                if _has_control(spec):
                    expected.append((name + ":control", ["COMBO"]))
            elif not _is_widget(spec) and name in info["input"].get("required", {}) and not linked:
                problems.append(f"node {n['id']} {n['type']}: required input '{name}' is not connected")
        values = n.get("widgets_values", [])
        if len(values) != len(expected):
            problems.append(f"node {n['id']} {n['type']}: {len(values)} widget values for {len(expected)} widgets")
            continue
        for value, (name, spec) in zip(values, expected):
            kind = spec[0]
            if isinstance(kind, list) and kind and value not in kind and not name.endswith(":control") \
                    and name not in file_inputs:  # model files differ per machine
                problems.append(f"node {n['id']} {n['type']}: '{name}'={value!r} is not one of its options")
            elif kind == "INT" and not isinstance(value, int):
                problems.append(f"node {n['id']} {n['type']}: '{name}' should be an integer, got {value!r}")
            elif kind == "FLOAT" and not isinstance(value, (int, float)):
                problems.append(f"node {n['id']} {n['type']}: '{name}' should be a number, got {value!r}")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {n['id']} {n['type']}: '{name}' should be text, got {value!r}")
    for link in ui["links"]:
        lid, src, slot, dst, dslot, kind = link
        if src not in by_id or dst not in by_id:
            problems.append(f"link {lid}: joins a node that does not exist")
            continue
        out = by_id[src]["outputs"][slot] if slot < len(by_id[src]["outputs"]) else None
        inp = by_id[dst]["inputs"][dslot] if dslot < len(by_id[dst]["inputs"]) else None
        if out is None or lid not in out["links"]:
            problems.append(f"link {lid}: not listed on its source output")
        if inp is None or inp.get("link") != lid:
            problems.append(f"link {lid}: not listed on its target input")
        elif out is not None and inp["type"] not in (out["type"], "*") and out["type"] != "*":
            problems.append(f"link {lid}: {out['type']} into {inp['type']}")
    return problems


def node_info(cls, name: str, display_names: dict | None = None) -> dict:
    """A node definition in /object_info shape, computed in-process the way ComfyUI's server does."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES), "name": name}
