"""The pack's ComfyUI extension: every node it registers, listed by name, so adding a node is one visible line."""

from comfy_api.latest import ComfyExtension

from . import attention_map, check, concept_list, concept_world, erase, erasure, fuse, loras, refine, train


def all_nodes() -> list:
    return [
        refine.MACERefineCrossAttention,
        train.MACETrainConceptLoRA,
        loras.MACESaveLoRAs,
        loras.MACELoadLoRAs,
        fuse.MACEFuseLoRAs,
        erasure.MACESaveErasure,
        concept_world.MACEConceptWorld,
        erase.MACEErase,
        check.MACEErasureCheck,
        attention_map.MACEAttentionMap,
        concept_list.MACEConceptList,
    ]


class MaceExtension(ComfyExtension):
    async def get_node_list(self):
        return all_nodes()
