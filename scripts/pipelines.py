"""The pack's workflows as graphs: one definition feeds the UI file, its API twin and mace-erase."""

from workflow_graph import Graph

DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"


def _loader(g: Graph, ckpt: str | None, world_seed: int = 0):
    """Load Checkpoint, or the pack's concept world when no checkpoint is given."""
    if ckpt:
        node = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    else:
        node = g.add("MACEConceptWorld", seed=world_seed)
    return node[0], node[1], node[2]


def _before_after(g: Graph, clip, vae, before, after, prompt, seed, size, steps, prefix):
    """Sample the same prompt and seed with the original and the erased model, and save both."""
    pos = g.add("CLIPTextEncode", title="Prompt to compare", text=prompt, clip=clip)
    neg = g.add("CLIPTextEncode", title="Negative", text="", clip=clip)
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    for model, tag in ((before, "before"), (after, "after")):
        ks = g.add("KSampler", title=f"Sample {tag}", model=model, seed=seed, steps=steps, cfg=7.0,
                   sampler_name="euler", scheduler="normal", positive=pos[0], negative=neg[0],
                   latent_image=latent[0], denoise=1.0)
        img = g.add("VAEDecode", samples=ks[0], vae=vae)
        g.add("SaveImage", title=f"{tag.capitalize()} erasure", images=img[0], filename_prefix=f"{prefix}_{tag}")


def first_concept(concepts: str) -> str:
    return next(line for line in concepts.splitlines() if line.strip()).split("=>")[0].strip()


def refine_graph(ckpt=DEFAULT_CKPT, concepts="Claude Monet", concept_type="style", prompt=None, seed=42,
                 size=512, steps=20) -> Graph:
    g = Graph()
    model, clip, vae = _loader(g, ckpt)
    refined = g.add("MACERefineCrossAttention", model=model, clip=clip, concepts=concepts, concept_type=concept_type,
                    anchor="", preserve="", preservation_strength=1.0, lambda_=0.01)
    _before_after(g, clip, vae, model, refined[0], prompt or f"a painting in the style of {first_concept(concepts)}",
                  seed, size, steps, "mace_refine")
    return g


WORKFLOWS = {"refine_cross_attention": refine_graph}
