"""Fixtures for the concept-world tests: a booted ComfyUI, the pack imported as ComfyUI would, smoke worlds."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_support import comfy_host, pack_import  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: uses (and trains once, minutes, if missing) the full concept world")


@pytest.fixture(scope="session")
def host():
    if not comfy_host.available():
        if comfy_host.in_ci():
            pytest.fail(f"CI: no ComfyUI host at {comfy_host.HOST}; run scripts/setup.sh or set COMFYUI_PATH")
        pytest.skip(f"ComfyUI host not found at {comfy_host.HOST} (set COMFYUI_PATH)")
    comfy_host.boot()
    return comfy_host


@pytest.fixture(scope="session")
def cw(host):
    return pack_import("concept_world")


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mace_world_smoke")


@pytest.fixture(scope="session")
def smoke_world(cw, smoke_dir):
    return cw.load_or_train(seed=3, preset="smoke", cache_dir=smoke_dir)


@pytest.fixture(scope="session")
def sdxl_smoke_world(cw, smoke_dir):
    return cw.load_or_train(seed=3, preset="smoke", cache_dir=smoke_dir, family="sdxl")


def pytest_collection_modifyitems(config, items):
    # The full world trains once per machine (about 10 minutes on 2 cores) and is then loaded from ComfyUI's models
    # folder; MACE_FAST=1 skips what needs it, for quick local runs. CI runs everything.
    import os

    if os.environ.get("MACE_FAST") != "1":
        return
    skip = pytest.mark.skip(reason="full concept world: MACE_FAST=1 is set")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
