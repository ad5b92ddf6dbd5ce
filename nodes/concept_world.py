"""MACE Concept World: a tiny SD1.5- (or SDXL-) architecture model that really knows 20 (or, in the mass world, 126)
made-up concepts, for trying erasure."""

from comfy_api.latest import io

from ..concept_world import world as concept_world

# The family combo's choices -> concept_world's family names.
FAMILIES = {"SD1.5": "sd15", "SDXL": "sdxl"}
# The concepts combo's choices -> concept_world's training presets.
WORLDS = {"20 concepts": "full", "mass (126 concepts)": "mass", "mosaic (126 concepts)": "mosaic"}


class MACEConceptWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEConceptWorld",
            display_name="MACE Concept World",
            category="MACE/demo",
            description=(
                "Loads a tiny SD1.5-architecture model, its text encoder and a TAESD VAE that were trained on a small "
                "synthetic world of 20 concepts (objects such as 'red lantern', people such as 'Alba Moreno', styles "
                "such as 'dotwork style'), 64x64 pixels. Erase a concept and see it go. The first run for a seed "
                "trains the world on the CPU (several minutes) and saves it under models/mace_world; later runs "
                "load it. family SDXL gives the same world in SDXL's architecture (two text encoders, a pooled "
                "text vector and size conditioning). concepts 'mass' loads a world of 126 concepts (45 objects, 45 "
                "people, 36 styles) for erasing tens of them at once; it trains for about half an hour the first time. "
                "'mosaic' is a world of as many concepts, each drawn as a grid of colour cells (a code of many "
                "parts rather than a pair of colours), trained the same way."
            ),
            inputs=[
                # The frontend gives every INT named 'seed' a 'randomize after generate' control unless told not
                # to; here a new seed means minutes of training a new world, so the seed changes only by hand.
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Which world: every seed trains (once) a different but equally capable model."),
                # last, so workflows saved before it existed keep their widget values in order
                io.Combo.Input("family", options=list(FAMILIES), default="SD1.5", optional=True,
                               tooltip="The world's architecture. SD1.5: one CLIP-L text encoder. SDXL: CLIP-L + "
                                       "CLIP-G, whose pooled vector also enters the UNet (with size conditioning), "
                                       "as in SDXL. Each is trained once (minutes) and saved on its own."),
                io.Combo.Input("concepts", options=list(WORLDS), default="20 concepts", optional=True,
                               tooltip="Which world: the standard one of 20 concepts, or the mass world of 126 "
                                       "(names such as 'Thafan Rirkrudes' or 'nasster style'; the list is in "
                                       "concept_world/mass.py), where tens of concepts can be erased at once. The "
                                       "mass world trains once (about 29 minutes on one CPU thread) and is saved on "
                                       "its own. mosaic: 126 other concepts (concept_world/mosaic.py), each a grid "
                                       "of colour cells, which share fewer of their parts; it also trains once "
                                       "(about 27 minutes)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The world's SD1.5- or SDXL-architecture UNet (64x64 images, 8x8 latents)."),
                io.Clip.Output(tooltip="The world's text encoder: SD1 tokenizer with a small CLIP-L text model "
                                       "(SDXL: small CLIP-L and CLIP-G)."),
                io.Vae.Output(tooltip="The world's TAESD autoencoder (8x downscale)."),
            ],
        )

    @classmethod
    def execute(cls, seed, family="SD1.5", concepts="20 concepts") -> io.NodeOutput:
        if family not in FAMILIES:
            raise ValueError(f"MACE Concept World: family must be one of {', '.join(FAMILIES)}, got {family!r}")
        if concepts not in WORLDS:
            raise ValueError(f"MACE Concept World: concepts must be one of {', '.join(WORLDS)}, got {concepts!r}")
        fam, preset = FAMILIES[family], WORLDS[concepts]
        # the standard worlds are loaded exactly as before the options existed (same call, same file)
        options = ({} if fam == "sd15" else {"family": fam}) | ({} if preset == "full" else {"preset": preset})
        world = concept_world.load_or_train(int(seed), **options)
        return io.NodeOutput(world.model, world.clip, world.vae)


NODES = [MACEConceptWorld]
