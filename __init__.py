"""MACE concept erasure for ComfyUI: registers the pack's nodes, nothing else.

Imports happen when ComfyUI calls the entry point, so importing this folder outside ComfyUI (test collection,
tools) has no side effects.
"""


async def comfy_entrypoint():
    from .nodes.registry import MaceExtension

    return MaceExtension()
