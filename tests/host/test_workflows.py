"""Workflow files: valid for ComfyUI's frontend, in step with their generator, and run headless by a real server."""

import json
import os
import sys
from pathlib import Path

import comfy_host
import pytest

sys.path.insert(0, str(comfy_host.PACK / "scripts"))
from comfy_server import ComfyServer, error_text  # noqa: E402
from pipelines import WORKFLOWS, refine_graph  # noqa: E402
from workflow_graph import check_ui, complete, min_height, node_info, overlapping, to_ui  # noqa: E402

WF = comfy_host.PACK / "example_workflows"


@pytest.fixture(scope="module")
def object_info(pack):
    import nodes

    return {name: node_info(cls, name) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def test_every_workflow_file_loads_in_the_frontend_shape(object_info):
    files = sorted(WF.glob("*.json"))
    assert files, "no workflows"
    for f in files:
        ui = json.loads(f.read_text())
        assert check_ui(ui, object_info) == [], f.name
        api = json.loads((WF / "api" / f.name).read_text())
        assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in api.values()}, f.name


def test_every_workflow_has_its_template_thumbnail():
    """ComfyUI's template browser shows <name>.jpg beside each <name>.json of example_workflows/."""
    from PIL import Image

    for f in sorted(WF.glob("*.json")):
        thumb = f.with_suffix(".jpg")
        assert thumb.is_file(), f"{f.name}: no thumbnail"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.size == (512, 384), thumb.name
        assert thumb.stat().st_size < 100_000, f"{thumb.name}: a thumbnail should be small"


def test_generated_layouts_show_every_widget_and_never_overlap(object_info):
    """The issue's case: a node saved smaller than its widgets need is grown on load over the node below it."""
    for name, make in WORKFLOWS.items():
        ui = to_ui(make().api(), object_info)
        assert overlapping(ui) == [], name
        for n in ui["nodes"]:
            assert n["size"][1] >= min_height(object_info[n["type"]]), (name, n["type"])


def test_check_ui_catches_overlaps_and_hidden_widgets(object_info):
    ui = to_ui(refine_graph().api(), object_info)
    a, b = ui["nodes"][0], ui["nodes"][1]
    b["pos"] = [a["pos"][0] + 10, a["pos"][1] + 10]
    b["size"] = [b["size"][0], 100]
    problems = " | ".join(check_ui(ui, object_info))
    assert f"nodes {a['id']} and {b['id']} overlap" in problems and "would grow it over its neighbours" in problems


def test_a_world_seed_never_randomizes(object_info):
    """A new Concept World seed trains a new world for minutes: the frontend must not add a randomize control."""
    spec = object_info["MACEConceptWorld"]["input"]["required"]["seed"]
    assert spec[1].get("control_after_generate") is False
    ui = to_ui(json.loads((WF / "api" / "concept_world_erase.json").read_text()), object_info)
    world = next(n for n in ui["nodes"] if n["type"] == "MACEConceptWorld")
    assert world["widgets_values"] == [0, "SD1.5", "20 concepts"]  # seed, family, concepts: each new one last
    for n in ui["nodes"]:
        if n["type"] == "KSampler" or n["type"] == "MACETrainConceptLoRA":
            assert "fixed" in n["widgets_values"] and "randomize" not in n["widgets_values"], n["type"]


def test_lambda_is_labelled_lambda_in_the_frontend(object_info):
    """The input id stays lambda_ (saved workflows use it); the label comes from the pack's locale file."""
    labels = json.loads((comfy_host.PACK / "locales" / "en" / "nodeDefs.json").read_text())
    for node in ("MACERefineCrossAttention", "MACEFuseLoRAs"):
        assert "lambda_" in object_info[node]["input"]["required"], node
        assert labels[node]["inputs"]["lambda_"]["name"] == "lambda", node


def test_keep_target_is_labelled_preservation_target(object_info):
    """Fuse's input id stays keep_target (saved workflows and API graphs use it); it shows as preservation_target,
    the word the rest of the pack uses, from the locale file and the schema's display_name alike."""
    labels = json.loads((comfy_host.PACK / "locales" / "en" / "nodeDefs.json").read_text())
    spec = object_info["MACEFuseLoRAs"]["input"]["optional"]["keep_target"]
    assert spec[1].get("display_name") == "preservation_target"
    assert labels["MACEFuseLoRAs"]["inputs"]["keep_target"]["name"] == "preservation_target"


def test_check_ui_catches_broken_files(object_info):
    ui = to_ui(refine_graph().api(), object_info)
    ui["nodes"][1]["widgets_values"] = ui["nodes"][1]["widgets_values"][:-1]
    ui["links"][0][3] = 999
    ui["nodes"][2]["type"] = "NoSuchNode"
    problems = " | ".join(check_ui(ui, object_info))
    assert "widget values" in problems and "does not exist" in problems and "unknown type" in problems


LIST_STAGES = {"MACERefineCrossAttention", "MACETrainConceptLoRA", "MACEFuseLoRAs", "MACESaveErasure", "MACEErase",
               "MACEErasureCheck"}


@pytest.mark.parametrize("name", ["mace_erase", "concept_world_erase", "mace_erase_one_node"])
def test_each_list_is_typed_once_and_every_stage_reads_it(name):
    """Issue 16: one MACE Concept List per graph holds the concepts and the concepts to preserve; every stage is linked
    to it and its own concept boxes are blank, so no second copy can disagree."""
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    lists = [nid for nid, n in api.items() if n["class_type"] == "MACEConceptList"]
    assert len(lists) == 1 and api[lists[0]]["inputs"]["concepts"].strip()
    stages = {nid: n for nid, n in api.items() if n["class_type"] in LIST_STAGES}
    assert stages
    for nid, n in stages.items():
        assert n["inputs"].get("concept_list") == [lists[0], 0], (name, n["class_type"])
        for box in ("concepts", "preserve", "anchor", "concept_file"):
            assert not str(n["inputs"].get(box, "")).strip(), (name, n["class_type"], box)


def test_committed_workflows_match_their_generator(object_info):
    for name, make in WORKFLOWS.items():
        api = complete(make().api(), object_info)
        assert json.loads((WF / "api" / f"{name}.json").read_text()) == api, f"{name}: run scripts/make_workflows.py"
        assert json.loads((WF / f"{name}.json").read_text()) == to_ui(api, object_info), name


@pytest.fixture(scope="session")
def server_base(tmp_path_factory, checkpoint):
    """A ComfyUI base directory holding only this pack and the test checkpoint."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(comfy_host.PACK, base / "custom_nodes" / "comfyui-mace")
    (base / "models" / "checkpoints").mkdir(parents=True)
    os.symlink(checkpoint, base / "models" / "checkpoints" / checkpoint.name)
    # Share the pack's per-encoder cache with the host, so the generic-prompt statistics are computed once per machine.
    shared = comfy_host.HOST / "models" / "mace"
    shared.mkdir(parents=True, exist_ok=True)
    os.symlink(shared, base / "models" / "mace")
    return base


@pytest.fixture(scope="session")
def server(server_base):
    with ComfyServer(extra_args=["--base-directory", str(server_base)], log_file=server_base / "server.log") as s:
        yield s


def shipped_at_test_size(name: str, checkpoint: Path) -> dict:
    """The shipped API graph, on the generated checkpoint, with sizes and step counts a CPU runs in a minute."""
    api = json.loads((WF / "api" / f"{name}.json").read_text())
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint.name
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "MACETrainConceptLoRA":
            inputs.update(steps=3, images_per_concept=2, image_size=64)
        elif kind == "MACEErasureCheck":
            inputs.update(steps=2, images_per_prompt=1, image_size=64)
    return api


def test_refine_api_workflow_runs_on_a_real_server(server, server_base, checkpoint):
    api = shipped_at_test_size("refine_cross_attention", checkpoint)
    entry = server.run(api, timeout=600, show_progress=False)
    assert error_text(entry) is None, error_text(entry)
    saved = [img["filename"] for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(saved) == 2
    for name in saved:
        assert (server_base / "output" / name).stat().st_size > 0
    assert "MACERefineCrossAttention" in server.get("/object_info")


def test_bad_concept_fails_the_run_with_the_clear_message(server, checkpoint):
    api = refine_graph(ckpt=checkpoint.name, concepts="art", size=64, steps=1).api()
    entry = server.run(api, timeout=300, show_progress=False)
    msg = error_text(entry)
    assert msg and "input 'concepts'" in msg and "same as its anchor" in msg


def test_object_info_of_the_server_agrees_with_in_process(server, object_info):
    remote = server.get("/object_info")
    for name in ("MACERefineCrossAttention", "KSampler"):
        assert remote[name]["input_order"] == object_info[name].get("input_order", remote[name]["input_order"])


def test_whole_pipeline_api_workflow_writes_images_and_erasure(server, server_base, checkpoint):
    """Refine -> Train -> Fuse -> before/after -> Save Erasure, headless, as a shared API workflow runs."""
    api = shipped_at_test_size("mace_erase", checkpoint)
    entry = server.run(api, timeout=1200, show_progress=False)
    assert error_text(entry) is None, error_text(entry)
    images = [img["filename"] for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len([i for i in images if "_before" in i]) == 1 and len([i for i in images if "_after" in i]) == 1
    assert len([i for i in images if "_check" in i]) == 1, ("the labelled before/after grid", images)
    loras = list((server_base / "models" / "loras").rglob("mace_erasure*.safetensors"))
    assert loras, "the erasure LoRA was written"
    from safetensors import safe_open

    with safe_open(str(loras[0]), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(".attn2.to_" in k for k in keys)
    assert "Claude Monet" in json.dumps(meta)
