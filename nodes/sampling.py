"""Seeded pictures with ComfyUI's own sampler, for the nodes that show what an erasure did (Erasure Check, Attention
Map), and the sampler inputs they share.

Each picture's starting noise depends only on its seed (the noise ComfyUI's KSampler draws for a one-image batch), so
the same seed on the original and on the erased model starts from the same noise and the two pictures differ only by
what the erasure changed.
"""

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io

from ..mace_core.errors import MaceInputError
from . import attention, host

DEFAULT_CFG = 7.0
MAX_STEPS = 200


def sampler_inputs(size_tooltip_extra: str = "") -> list:
    """steps, cfg, sampler_name, scheduler and image_size, as KSampler names them."""
    return [
        io.Int.Input("steps", default=20, min=1, max=MAX_STEPS, tooltip="Sampler steps of every picture."),
        io.Float.Input("cfg", default=DEFAULT_CFG, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale, as in KSampler: about 7 for Stable Diffusion "
                               "checkpoints; the MACE Concept World is made for 3 (it oversaturates at 7)."),
        io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                       tooltip="The sampler, as in KSampler."),
        io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                       tooltip="The noise schedule, as in KSampler."),
        io.Int.Input("image_size", default=0, min=0, max=4096, step=8,
                     tooltip="Side of the square pictures in pixels; 0 = the model's usual size (512 for SD1.x/SD2.x, "
                             "1024 for SDXL, 64 for the MACE Concept World)." + size_tooltip_extra),
    ]


def native_size(model) -> int:
    return attention.default_image_size(model)


def picture_size(model, image_size: int, input_name: str = "image_size") -> int:
    if image_size == 0:
        return native_size(model)
    ratio = latent_ratio(model)
    if image_size < ratio or image_size % ratio:
        raise MaceInputError(input_name, f"must be 0 (the model's usual size) or a multiple of {ratio}, got "
                                         f"{image_size}.")
    return int(image_size)


def latent_ratio(model) -> int:
    return int(getattr(model.model.latent_format, "spacial_downscale_ratio", 8))


SAMPLER_INPUTS = ("steps", "cfg", "sampler_name", "scheduler")
IMAGE_SAMPLING_INPUTS = ("image_steps", "image_cfg", "image_sampler", "image_scheduler")  # Train's, for its images


def check_sampler(steps, cfg, sampler_name, scheduler, names=SAMPLER_INPUTS):
    """The four sampler settings, each error naming its input (`names`, in the arguments' order)."""
    if steps < 1:
        raise MaceInputError(names[0], f"must be at least 1, got {steps}.")
    if cfg < 0:
        raise MaceInputError(names[1], f"must not be negative, got {cfg}.")
    if sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        raise MaceInputError(names[2], f"unknown sampler '{sampler_name}'.", "Pick one KSampler offers.")
    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise MaceInputError(names[3], f"unknown scheduler '{scheduler}'.", "Pick one KSampler offers.")


def image_sampling_inputs(unused: str) -> list:
    """Train's settings for the images it makes when no latents are given, as KSampler names them, prefixed; `unused`
    ends each tooltip: when the node does not make images."""
    d = attention.ImageSampling()
    return [
        io.Int.Input("image_steps", default=d.steps, min=1, max=MAX_STEPS, optional=True,
                     tooltip=f"Sampler steps of each generated training image (default: the paper's 30). Fewer make "
                             f"Train faster: the images are most of its time. {unused}"),
        io.Float.Input("image_cfg", default=d.cfg, min=0.0, max=30.0, step=0.1, round=0.01, optional=True,
                       tooltip="Classifier-free guidance of the generated training images, as in KSampler (default: "
                               "the paper's 7.5, right for Stable Diffusion checkpoints). 1-2 for Turbo, Lightning "
                               f"and LCM models; 3 for the MACE Concept World. {unused}"),
        io.Combo.Input("image_sampler", options=list(comfy.samplers.KSampler.SAMPLERS), default=d.sampler,
                       optional=True,
                       tooltip="The sampler of the generated training images, as in KSampler (default: the "
                               "paper's DPM-Solver++, dpmpp_2m). One that adds noise as it goes (ancestral, SDE, "
                               "lcm) makes each concept's images on their own, so they never depend on the batch. "
                               + unused),
        io.Combo.Input("image_scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default=d.scheduler,
                       optional=True,
                       tooltip=f"The noise schedule of the generated training images, as in KSampler. {unused}"),
    ]


def image_sampling(steps=None, cfg=None, sampler=None, scheduler=None) -> attention.ImageSampling:
    """Train's image_* inputs as one ImageSampling; None (an API graph leaving an optional input out, or a caller that
    does not set it) is the input's default."""
    d = attention.ImageSampling()
    return attention.ImageSampling(d.steps if steps is None else steps, d.cfg if cfg is None else cfg,
                                   sampler or d.sampler, scheduler or d.scheduler)


def check_image_sampling(s: attention.ImageSampling):
    """The image_* inputs' errors, each naming its input."""
    check_sampler(s.steps, s.cfg, s.sampler, s.scheduler, IMAGE_SAMPLING_INPUTS)


def seed_noise(latent: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Noise for a batch whose picture i starts from the noise KSampler gives seed i alone."""
    return torch.cat([comfy.sample.prepare_noise(latent[:1], int(s)) for s in seeds])


def encode(clip, text: str, literal: bool):
    """CLIPTextEncode's conditioning; literal: without ComfyUI's weight syntax (a concept name is text, and its '('
    would otherwise be read as emphasis)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text, disable_weights=literal))


class Sampler:
    """Pictures of prompts x seeds for one setting of the sampler inputs, conditioning encoded once per prompt."""

    def __init__(self, clip, steps=20, cfg=DEFAULT_CFG, sampler_name="euler", scheduler="normal", size=512,
                 negative="", on_step=None):
        check_sampler(steps, cfg, sampler_name, scheduler)
        self.clip, self.steps, self.cfg = clip, int(steps), float(cfg)
        self.sampler_name, self.scheduler, self.size = sampler_name, scheduler, int(size)
        self.negative = encode(clip, negative or "", literal=True)
        self.on_step = on_step or host.check_cancel
        self._conds = {}

    def cond(self, text: str, literal: bool = True):
        key = (text, literal)
        if key not in self._conds:
            self._conds[key] = encode(self.clip, text, literal)
        return self._conds[key]

    def latents(self, model, text: str, seeds: list[int], literal: bool = True) -> torch.Tensor:
        """LATENT samples (len(seeds), c, h, w) of one prompt, one picture per seed."""
        ratio = latent_ratio(model)
        empty = torch.zeros([len(seeds), 4, self.size // ratio, self.size // ratio])
        latent = comfy.sample.fix_empty_latent_channels(model, empty)
        noise = seed_noise(latent, seeds)
        return comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                   self.cond(text, literal), self.negative, latent, seed=int(seeds[0]),
                                   disable_pbar=True, callback=lambda *a: self.on_step())


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """IMAGE (b, H, W, 3) in [0, 1], as VAEDecode gives it."""
    images = vae.decode(latents)
    if images.ndim == 5:  # video VAEs add a frame axis
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().clamp(0, 1)

