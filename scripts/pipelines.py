"""The pack's workflows as graphs: one definition feeds the UI file, its API twin and mace-erase."""

import importlib
import importlib.util
import sys
from pathlib import Path

from workflow_graph import Graph


def _concepts_module():
    """mace_core.concepts, the pack's one parser of concept lines, imported by path under its own name only: the pack
    root must not go on sys.path, where its nodes/ package would shadow ComfyUI's nodes module."""
    if "mace_core" not in sys.modules:
        core = Path(__file__).resolve().parent.parent / "mace_core"
        spec = importlib.util.spec_from_file_location("mace_core", core / "__init__.py",
                                                      submodule_search_locations=[str(core)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mace_core"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("mace_core.concepts")

DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"


def _loader(g: Graph, ckpt: str | None, world_seed: int = 0):
    """Load Checkpoint, or the pack's concept world when no checkpoint is given."""
    if ckpt:
        node = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    else:
        node = g.add("MACEConceptWorld", seed=world_seed)
    return node[0], node[1], node[2]


def _before_after(g: Graph, clip, vae, before, after, prompt, seed, size, steps, prefix, cfg=7.0):
    """Sample the same prompt and seed with the original and the erased model, and save both."""
    pos = g.add("CLIPTextEncode", title="Prompt to compare", text=prompt, clip=clip)
    neg = g.add("CLIPTextEncode", title="Negative", text="", clip=clip)
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    for model, tag in ((before, "before"), (after, "after")):
        ks = g.add("KSampler", title=f"Sample {tag}", model=model, seed=seed, steps=steps, cfg=cfg,
                   sampler_name="euler", scheduler="normal", positive=pos[0], negative=neg[0],
                   latent_image=latent[0], denoise=1.0)
        img = g.add("VAEDecode", samples=ks[0], vae=vae)
        g.add("SaveImage", title=f"{tag.capitalize()} erasure", images=img[0], filename_prefix=f"{prefix}_{tag}")


def first_concept(concepts: str) -> str:
    """The first concept's name, read as the nodes read the list ('Claude Monet | style' names Claude Monet)."""
    split_line = _concepts_module().split_line
    for line_no, line in enumerate(concepts.splitlines(), 1):
        parts = split_line(line, f"line {line_no}")
        if parts and parts[0]:
            return parts[0]
    raise ValueError(f"no concept in {concepts!r}")


def refine_graph(ckpt=DEFAULT_CKPT, concepts="Claude Monet", concept_type="style", prompt=None, seed=42,
                 size=512, steps=20) -> Graph:
    g = Graph()
    model, clip, vae = _loader(g, ckpt)
    refined = g.add("MACERefineCrossAttention", model=model, clip=clip, concepts=concepts, concept_type=concept_type,
                    anchor="", preserve="", preservation_strength=1.0, lambda_=0.01)
    _before_after(g, clip, vae, model, refined[0], prompt or f"a painting in the style of {first_concept(concepts)}",
                  seed, size, steps, "mace_refine")
    return g



def train_graph(ckpt=DEFAULT_CKPT, concepts="Claude Monet", concept_type="style", prompt=None, seed=42, size=512,
                steps=20, train_steps=50, learning_rate=1e-4, image_size=0) -> Graph:
    """Refine, train one LoRA per concept, compare before/after, save the LoRAs."""
    g = Graph()
    model, clip, vae = _loader(g, ckpt)
    refined = g.add("MACERefineCrossAttention", model=model, clip=clip, concepts=concepts, concept_type=concept_type,
                    anchor="", preserve="", preservation_strength=1.0, lambda_=0.01)
    train = g.add("MACETrainConceptLoRA", model=refined[0], clip=clip, concepts=concepts, concept_type=concept_type,
                  anchor="", steps=train_steps, learning_rate=learning_rate, rank=1, seed=seed,
                  timestep_sampling="importance", images_per_concept=8, mask_source="auto",
                  image_size=image_size, image_model=model)
    g.add("PreviewImage", title="Loss curve", images=train[2])
    _before_after(g, clip, vae, model, train[1], prompt or _prompt(concepts, concept_type), seed, size, steps,
                  "mace_train")
    g.add("MACESaveLoRAs", loras=train[0], filename_prefix="mace")
    return g


def erase_graph(ckpt=DEFAULT_CKPT, concepts="Claude Monet", concept_type="style", preserve="", prompt=None, seed=42,
                size=512, steps=20, train_steps=50, learning_rate=1e-4, image_size=0, prefix="mace_erasure",
                world_seed=0, images=8, cfg=7.0, image_cfg=None) -> Graph:
    """The whole MACE pipeline: refine, one LoRA per concept, closed-form fusion, before/after, save the erasure. The
    concepts and the concepts to preserve are typed once, into MACE Concept List, which every stage reads (issue 16);
    the stages' own boxes stay blank. `image_cfg`: the guidance of Train's images; None is the node's (the paper's)."""
    g = Graph()
    model, clip, vae = _loader(g, ckpt, world_seed)
    listed = g.add("MACEConceptList", title="Concepts (typed once)", concepts=concepts, concept_type=concept_type,
                   anchor="", preserve=preserve, prompts="", concept_file="", corpus_file="")
    cl = listed[0]
    refined = g.add("MACERefineCrossAttention", model=model, clip=clip, concepts="", concept_type=concept_type,
                    anchor="", preserve="", preservation_strength=1.0, lambda_=0.01, concept_list=cl)
    train = g.add("MACETrainConceptLoRA", model=refined[0], clip=clip, concepts="", concept_type=concept_type,
                  anchor="", steps=train_steps, learning_rate=learning_rate, rank=1, seed=seed,
                  timestep_sampling="importance", images_per_concept=images, mask_source="auto",
                  image_size=image_size, image_model=model, concept_list=cl,
                  **({} if image_cfg is None else {"image_cfg": image_cfg}))
    fused = g.add("MACEFuseLoRAs", model=refined[0], clip=clip, loras=train[0], preserve="",
                  preservation_strength=1.0, lambda_=0.01, keep_target="input model", concept_list=cl)
    _before_after(g, clip, vae, model, fused[0], prompt or _prompt(concepts, concept_type), seed, size, steps,
                  prefix, cfg)
    # the verdict at a glance: every erased and preserved concept, the same seeds before and after, one labelled grid
    check = g.add("MACEErasureCheck", model=model, erased_model=fused[0], clip=clip, vae=vae, concepts="",
                  concept_type=concept_type, anchor="", other_prompts="", preserve="", seed=seed,
                  images_per_prompt=2, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
                  image_size=size, negative="", concept_list=cl)
    g.add("SaveImage", title="Erasure check", images=check[0], filename_prefix=f"{prefix}_check")
    g.add("MACESaveErasure", model=fused[0], filename_prefix=prefix, mode="full", rank=64, loras=train[0],
          concept_list=cl)
    return g


def one_node_graph(concepts="Tomas Lindqvist", concept_type="celebrity", preserve="Alba Moreno\nNadia Okafor",
                   prompts="Tomas Lindqvist: Tommy Lindqvist; Mister Lindqvist", seed=0) -> Graph:
    """MACE Erase and MACE Erasure Check on the concept world: the whole erasure in one node, then the same seeds
    before and after as one labelled grid, both reading one Concept List (cfg 3: the world's guidance). The person's
    two other names are listed as nicknames, so they are erased too and get rows of their own in the grid."""
    g = Graph()
    model, clip, vae = _loader(g, None)
    listed = g.add("MACEConceptList", title="Concepts (typed once)", concepts=concepts, concept_type=concept_type,
                   anchor="", preserve=preserve, prompts=prompts, concept_file="", corpus_file="")
    erased = g.add("MACEErase", model=model, clip=clip, concepts="", concept_type=concept_type, anchor="",
                   mode="full", preserve="", preservation_strength=1.0, lambda_=0.01, seed=seed,
                   concept_list=listed[0], image_cfg=WORLD_DEFAULT["cfg"])
    grid = g.add("MACEErasureCheck", model=model, erased_model=erased[0], clip=clip, vae=vae, concepts="",
                 concept_type=concept_type, anchor="", other_prompts="", preserve="", seed=seed, images_per_prompt=2,
                 steps=20, cfg=WORLD_DEFAULT["cfg"], sampler_name="euler", scheduler="normal", image_size=0,
                 negative="", concept_list=listed[0])
    g.add("SaveImage", title="Erasure check", images=grid[0], filename_prefix="mace_world_check")
    g.add("MACESaveErasure", model=erased[0], filename_prefix="mace_world_one_node", mode="full", rank=64,
          concept_list=listed[0])
    return g


def _prompt(concepts: str, concept_type: str) -> str:
    name = first_concept(concepts)
    return {"style": f"a painting in the style of {name}", "celebrity": f"a photo of {name}",
            "object": f"a photo of {name}", "explicit": name}[concept_type]


# The concept world (MACEConceptWorld): 64x64 images, a model that really learned its concepts; what mace-erase
# uses when no checkpoint is given.
# cfg 3: the guidance the world is made for (concept_world.world.SamplerSettings); at 7 it oversaturates, and the
# quick start's "after" picture showed another figure instead of the anchor's
WORLD_DEFAULT = {"concepts": "Tomas Lindqvist", "concept_type": "celebrity", "preserve": "", "size": 64,
                 "sample_steps": 20, "steps": 50, "learning_rate": 1e-4, "cfg": 3.0}


def world_graph() -> Graph:
    w = WORLD_DEFAULT
    return erase_graph(ckpt=None, concepts=w["concepts"], concept_type=w["concept_type"], preserve=w["preserve"],
                       size=w["size"], steps=w["sample_steps"], train_steps=w["steps"],
                       learning_rate=w["learning_rate"], image_size=w["size"], prefix="mace_world_erasure",
                       cfg=w["cfg"], image_cfg=w["cfg"])


WORKFLOWS = {"refine_cross_attention": refine_graph, "train_concept_lora": train_graph, "mace_erase": erase_graph,
             "concept_world_erase": world_graph, "mace_erase_one_node": one_node_graph}
