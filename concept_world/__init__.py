"""A small world in which a tiny SD1.5-architecture model really learns concepts, so erasure can be measured (20
concepts; the mass world, mass.py, has 126).

    world = load_or_train(seed=0)      # World: .model (ModelPatcher), .clip (comfy.sd.CLIP), .vae (comfy.sd.VAE),
                                       # .spec (concepts, concept types, synonyms, templates, anchors), .classifier
    world.predict(prompts, seeds, model=some_patched_clone)   # (P, S) class ids, spec.NONE = no concept
    evaluate.hits(world, concepts, names="synonyms", seeds=range(4), model=...)  # (concept ids, predictions)

Modules: spec (what exists; WorldSpec per world), mass (the mass world's concepts), render (drawing it), autoencoder
(TAESD: fixed encoder, trained decoder), nets (ComfyUI UNet / CLIP builders), train (the three training phases),
classifier, segment (concept masks), store (safetensors under <models>/mace_world/), world (World, load_or_train),
evaluate (accuracy helpers).
"""

from . import evaluate, spec
from .store import VERSION
from .world import SamplerSettings, World, load, load_or_train

__all__ = ["VERSION", "World", "SamplerSettings", "evaluate", "load", "load_or_train", "spec"]
