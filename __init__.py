"""MACE concept erasure for ComfyUI: registers the pack's nodes, nothing else."""

from comfy_api.latest import ComfyExtension

from .nodes import registry


class MaceExtension(ComfyExtension):
    async def get_node_list(self):
        return registry.all_nodes()


async def comfy_entrypoint() -> MaceExtension:
    return MaceExtension()
