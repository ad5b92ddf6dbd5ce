"""Writes example_workflows/<name>.json (UI format), its thumbnail <name>.jpg and example_workflows/api/<name>.json
from scripts/pipelines.py.

Node definitions come from a real ComfyUI booted in-process with the pack loaded, so widget order and defaults are
the ones the frontend will use. Run after changing a node's inputs or a pipeline: python scripts/make_workflows.py
"""

import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "host"))

import comfy_host  # noqa: E402
from pipelines import WORKFLOWS  # noqa: E402
from workflow_graph import check_ui, complete, node_info, thumbnail, to_ui  # noqa: E402


def object_info() -> dict:
    comfy_host.boot()
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT))), "the pack failed to load"
    return {name: node_info(cls, name) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def main():
    info = object_info()
    (ROOT / "example_workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, make in WORKFLOWS.items():
        api = complete(make().api(), info)
        ui = to_ui(api, info)
        problems = check_ui(ui, info)
        if problems:
            raise SystemExit(f"{name}: " + "; ".join(problems))
        (ROOT / "example_workflows" / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        (ROOT / "example_workflows" / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        thumbnail(ui, ROOT / "example_workflows" / f"{name}.jpg", info)
        print(f"wrote example_workflows/{name}.json, .jpg and api/{name}.json")  # a script's own output


if __name__ == "__main__":
    main()
