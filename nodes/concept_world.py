"""MACE Concept World: a tiny SD1.5-architecture model that really knows 20 made-up concepts, for trying erasure."""

from comfy_api.latest import io

from ..concept_world import world as concept_world


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
                "load it."
            ),
            inputs=[
                # The frontend gives every INT named 'seed' a 'randomize after generate' control unless told not
                # to; here a new seed means minutes of training a new world, so the seed changes only by hand.
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Which world: every seed trains (once) a different but equally capable model."),
            ],
            outputs=[
                io.Model.Output(tooltip="The world's SD1.5-architecture UNet (64x64 images, 8x8 latents)."),
                io.Clip.Output(tooltip="The world's text encoder: SD1 tokenizer with a small CLIP-L text model."),
                io.Vae.Output(tooltip="The world's TAESD autoencoder (8x downscale)."),
            ],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        world = concept_world.load_or_train(int(seed))
        return io.NodeOutput(world.model, world.clip, world.vae)


NODES = [MACEConceptWorld]
