"""Host tests run the pack inside a real ComfyUI (see comfy_host.py). Without one they skip with one line, except
under CI (CI=true), where a missing host is a failure: a green run must mean the nodes ran."""

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_host  # noqa: E402

if not comfy_host.available():
    if comfy_host.in_ci():
        raise RuntimeError(f"CI: no ComfyUI host at {comfy_host.HOST}; run scripts/setup.sh or set COMFYUI_PATH")
    pytest.skip(f"no ComfyUI host at {comfy_host.HOST} (set COMFYUI_PATH); host tests skipped",
                allow_module_level=True)

comfy_host.boot()


@pytest.fixture(scope="session")
def pack():
    """The pack loaded exactly as ComfyUI loads a custom node folder; returns ComfyUI's node class mapping."""
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(comfy_host.PACK))), "the pack failed to load"
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def pack_module(pack):
    return sys.modules[str(comfy_host.PACK).replace(".", "_x_")]


@pytest.fixture(scope="session")
def tiny():
    import torch

    with torch.inference_mode():
        return comfy_host.tiny_model(), comfy_host.tiny_clip()


@pytest.fixture(scope="session")
def checkpoint():
    """An SD1.5-detected checkpoint, generated once per machine (never committed)."""
    import torch

    path = comfy_host.HOST / "models" / "checkpoints" / "mace_test_sd15.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode():
            comfy_host.write_sd15_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def mods(pack_module):
    """The pack's modules by short name (mods.train, mods.host, ...), as ComfyUI imported them."""
    import types

    name = pack_module.__name__
    paths = {"host": "nodes.host", "refine": "nodes.refine", "train": "nodes.train", "att": "nodes.attention",
             "fuse": "nodes.fuse", "concepts": "mace_core.concepts", "errors": "mace_core.errors",
             "bundle": "mace_core.lora_bundle"}
    return types.SimpleNamespace(**{k: sys.modules[f"{name}.{v}"] for k, v in paths.items()})


@pytest.fixture()
def unloaded():
    """No model loaded before or after a test (comfy_host.unload_all)."""
    comfy_host.unload_all()
    yield
    comfy_host.unload_all()


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch):
    """models/loras redirected to a temporary folder, so tests never write into the host's own."""
    import folder_paths

    root = tmp_path / "loras"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(root)], set(folder_paths.supported_pt_extensions)))
    folder_paths.filename_list_cache.pop("loras", None)
    yield root
    folder_paths.filename_list_cache.pop("loras", None)
