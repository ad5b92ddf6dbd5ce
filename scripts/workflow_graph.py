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


# Node metrics of ComfyUI's frontend (litegraph, frontend 1.27): the title bar sits above a node's pos, each socket
# row and each one-line widget takes a fixed height. A node saved smaller than its widgets need is grown when loaded,
# over whatever lies below it (issue 16: Train Concept LoRA grew over 'Sample before' and hid its widgets), so sizes
# are computed here, generously, from what the node shows, and the layout spaces nodes by those sizes.
TITLE_H = 30
SLOT_H = 20
WIDGET_H = 24  # 20 px widget + 4 px spacing (litegraph NODE_WIDGET_HEIGHT)
TEXTBOX_H = 100  # a multiline text box: the frontend needs 54 at least; 100 shows a few lines
TEXTBOX_MIN_H = 54
IMAGE_NODES = ("SaveImage", "PreviewImage")
IMAGE_H = 240  # room for the picture these nodes show after a run
NODE_W = 340
GAP_X, GAP_Y = 60, 40


def _widget_rows(info: dict, textbox: int) -> list[int]:
    """The height of each widget the frontend gives this node, in order (a seed's control widget included)."""
    rows = []
    for name in _ordered_inputs(info):
        spec = _spec(info, name)
        if not _is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        rows.append(textbox if spec[0] == "STRING" and opts.get("multiline") else WIDGET_H)
        if _has_control(spec):
            rows.append(WIDGET_H)
    return rows


def min_height(info: dict, textbox: int = TEXTBOX_MIN_H) -> int:
    """The body height (title excluded, as litegraph stores it) the frontend grows a smaller node to."""
    sockets = sum(1 for name in _ordered_inputs(info) if not _is_widget(_spec(info, name)))
    rows = max(sockets, len(info["output"]), 1)
    widgets = _widget_rows(info, textbox)
    return rows * SLOT_H + 6 + (8 + sum(widgets) if widgets else 0)


def node_size(info: dict) -> tuple[int, int]:
    """Width and body height for a generated file: every socket and widget shown, text boxes a few lines tall."""
    height = min_height(info, TEXTBOX_H) + 10
    if info.get("name") in IMAGE_NODES:
        height = max(height, IMAGE_H)
    return NODE_W, height


def complete(api: dict, object_info: dict) -> dict:
    """The API graph with every widget input stated, optional ones at their defaults: what the frontend's
    graphToPrompt() sends for the UI file, so the API twin and the dropped file queue the same graph."""
    out = {}
    for nid, node in api.items():
        info = object_info[node["class_type"]]
        inputs = dict(node["inputs"])
        for name in _ordered_inputs(info):
            spec = _spec(info, name)
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if name not in inputs and _is_widget(spec) and "default" in opts:
                inputs[name] = opts["default"]
        out[nid] = {**node, "inputs": inputs}
    return out


def _depths(api: dict) -> dict[str, int]:
    """Each node's column: one past the deepest node feeding it, so every link runs left to right."""
    depth: dict[str, int] = {}

    def visit(nid):
        if nid not in depth:
            srcs = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((visit(s) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def auto_layout(api: dict, object_info: dict, origin=(40, 60)) -> dict[str, tuple[list[int], list[int]]]:
    """Position and size of every node: columns by depth, each stacked top to bottom, no two overlapping. A column's
    nodes go in the order of where their inputs sit (mean height of the nodes feeding them, then id), so a branch
    reads along a row: 'Sample before' and its decode and save stay level."""
    depth = _depths(api)
    sizes = {nid: node_size(object_info[n["class_type"]]) for nid, n in api.items()}
    out = {}
    x = origin[0]

    def inputs_at(nid):
        ys = [out[v[0]][0][1] + sizes[v[0]][1] / 2 for v in api[nid]["inputs"].values() if isinstance(v, list)]
        return sum(ys) / len(ys) if ys else 0.0

    for col in range(max(depth.values()) + 1):
        members = sorted((nid for nid in api if depth[nid] == col), key=lambda nid: (inputs_at(nid), int(nid)))
        y = origin[1] + TITLE_H
        for nid in members:
            w, h = sizes[nid]
            out[nid] = ([x, y], [w, h])
            y += h + TITLE_H + GAP_Y
        x += max(sizes[nid][0] for nid in members) + GAP_X
    return out


def bounds(node: dict) -> tuple[float, float, float, float]:
    """A UI node's rectangle as drawn: its title bar above pos included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlapping(ui: dict) -> list[tuple[int, int]]:
    """Pairs of node ids whose rectangles (title bars included) intersect."""
    boxes = [(n["id"], bounds(n)) for n in ui["nodes"]]
    pairs = []
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                pairs.append((a, b))
    return pairs


def to_ui(api: dict, object_info: dict) -> dict:
    """UI-format workflow (litegraph JSON, version 0.4) for an API graph, laid out by auto_layout."""
    layout = auto_layout(api, object_info)
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
                    widgets.append("fixed")  # the file's values are the ones the tests ran; no new seed per run
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
        pos, size = layout[nid]
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": pos, "size": size, "flags": {},
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
        if "size" in n and n["size"][1] < min_height(info):
            problems.append(f"node {n['id']} {n['type']}: {n['size'][1]} px tall, its widgets need "
                            f"{min_height(info)}: the frontend would grow it over its neighbours")
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
    if all("pos" in n and "size" in n for n in ui["nodes"]):
        for a, b in overlapping(ui):
            problems.append(f"nodes {a} and {b} overlap")
    return problems


def node_info(cls, name: str, display_names: dict | None = None) -> dict:
    """A node definition in /object_info shape, computed in-process the way ComfyUI's server does."""
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES), "name": name}


def thumbnail(ui: dict, path, object_info: dict | None = None, size=(512, 384)):
    """A JPEG picture of the graph's layout for ComfyUI's template browser (it asks for <name>.jpg beside the .json,
    shown as a 4:3 card): nodes as boxes titled as on the canvas, links as lines. Pillow comes with ComfyUI."""
    from PIL import Image, ImageDraw, ImageFont

    boxes = {n["id"]: bounds(n) for n in ui["nodes"]}
    x0, y0 = min(b[0] for b in boxes.values()), min(b[1] for b in boxes.values())
    x1, y1 = max(b[2] for b in boxes.values()), max(b[3] for b in boxes.values())
    margin = 12
    scale = min((size[0] - 2 * margin) / (x1 - x0), (size[1] - 2 * margin) / (y1 - y0))
    ox = (size[0] - (x1 - x0) * scale) / 2
    oy = (size[1] - (y1 - y0) * scale) / 2
    img = Image.new("RGB", size, (32, 32, 36))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def at(x, y):
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, src, slot, dst, dslot, _ in ui["links"]:
        start = at(boxes[src][2], by_id[src]["pos"][1] + SLOT_H * (slot + 0.5))
        end = at(boxes[dst][0], by_id[dst]["pos"][1] + SLOT_H * (dslot + 0.5))
        draw.line([start, end], fill=(140, 160, 190), width=1)
    for n in ui["nodes"]:
        bx0, by0, bx1, by1 = boxes[n["id"]]
        mace = n["type"].startswith("MACE")
        draw.rectangle([at(bx0, by0), at(bx1, by1)], fill=(53, 53, 58), outline=(90, 90, 96))
        draw.rectangle([at(bx0, by0), at(bx1, by0 + TITLE_H)], fill=(120, 60, 150) if mace else (70, 70, 78))
        info = (object_info or {}).get(n["type"], {})
        title = n.get("title") or info.get("display_name") or n["type"]
        title = title.removeprefix("MACE ")
        tx, ty = at(bx0 + 4, by0 + 2)
        draw.text((tx, ty), title[:max(1, int((bx1 - bx0) * scale / 6))], fill=(235, 235, 235), font=font)
    img.save(path, "JPEG", quality=85)
