"""The World: a trained concept world as ComfyUI objects, plus generation and judging helpers.

    world = load_or_train(seed=0)                 # trains once (minutes), then loads from the models folder
    ids = world.predict(["a photo of red lantern"], seeds=range(8), model=erased_model)   # (1, 8) class ids

`predict` samples with ComfyUI's own sampler (comfy.sample.sample), decodes with the world's VAE and asks the
classifier; any MODEL (e.g. a patched clone of world.model) and CLIP can be passed in.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from . import classifier as classifier_mod
from . import nets, segment, spec, store
from .spec import STANDARD, WorldSpec

log = logging.getLogger(__name__)

LATENT_SHAPE = (4, 8, 8)  # 64 x 64 pixels


@dataclass
class SamplerSettings:
    steps: int = 20
    cfg: float = 3.0  # the toy model oversaturates colours at higher guidance
    sampler_name: str = "euler"
    scheduler: str = "normal"
    negative: str = ""
    batch_size: int = 128


@dataclass
class World:
    seed: int
    preset: str
    path: str
    model: object  # comfy.model_patcher.ModelPatcher (SD1.5 or SDXL UNet)
    clip: object  # comfy.sd.CLIP (SD1 tokenizer, toy CLIP-L; SDXL: toy CLIP-L + CLIP-G)
    vae: object  # comfy.sd.VAE (TAESD)
    classifier: classifier_mod.Classifier
    metrics: dict = field(default_factory=dict)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    family: str = "sd15"  # "sd15" or "sdxl" (architecture of model and clip)
    # concepts, concept types, synonyms, templates, anchors, class names (a spec.WorldSpec: standard or mass)
    spec: WorldSpec = STANDARD

    # --- text -----------------------------------------------------------------------------------------------
    def encode(self, prompts, clip=None):
        """[(cond (1, 77, dim), pooled (1, dim))] per prompt, exactly as CLIPTextEncode computes them."""
        clip = self.clip if clip is None else clip
        return [clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in prompts]

    # --- images ---------------------------------------------------------------------------------------------
    def sample(self, prompts, seeds, model=None, clip=None, **settings):
        """ComfyUI latents (len(prompts) * len(seeds), 4, 8, 8), prompt-major; noise depends only on each seed."""
        seeds = [int(x) for x in seeds]
        return self.sample_pairs([p for p in prompts for _ in seeds], seeds * len(prompts), model, clip, **settings)

    def sample_pairs(self, prompts, seeds, model=None, clip=None, **settings):
        """ComfyUI latents (N, 4, 8, 8) for N (prompt, seed) pairs, sampled in batches with comfy.sample.sample."""
        import comfy.sample

        assert len(prompts) == len(seeds)
        s = SamplerSettings(**{**self.sampler.__dict__, **settings})
        model = self.model if model is None else model
        uniq = sorted(set(prompts))
        with torch.no_grad():
            conds = dict(zip(uniq, self.encode(uniq, clip)))
            neg_c, neg_p = self.encode([s.negative], clip)[0]
            items = list(zip(prompts, [int(x) for x in seeds]))
            out = []
            for start in range(0, len(items), s.batch_size):
                chunk = items[start:start + s.batch_size]
                # same noise as comfy.sample.prepare_noise(latent, seed) gives a one-image batch
                noise = torch.cat([torch.randn((1,) + LATENT_SHAPE, generator=torch.Generator().manual_seed(sd))
                                   for _, sd in chunk])
                positive = [[torch.cat([conds[p][0] for p, _ in chunk]),
                             {"pooled_output": torch.cat([conds[p][1] for p, _ in chunk])}]]
                negative = [[neg_c, {"pooled_output": neg_p}]]
                out.append(comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler_name, s.scheduler, positive,
                                               negative, torch.zeros_like(noise), seed=chunk[0][1],
                                               disable_pbar=True))
        return torch.cat(out) if out else torch.zeros((0,) + LATENT_SHAPE)

    def decode(self, latents):
        """ComfyUI IMAGE (N, 64, 64, 3) in [0, 1]."""
        with torch.no_grad():
            return self.vae.decode(latents).reshape(-1, 64, 64, 3)

    def generate(self, prompts, seeds, model=None, clip=None, **settings):
        """Images (len(prompts), len(seeds), 64, 64, 3)."""
        seeds = list(seeds)
        images = self.decode(self.sample(prompts, seeds, model, clip, **settings))
        return images.reshape(len(prompts), len(seeds), *images.shape[1:])

    def classify(self, images):
        """Class ids (index into spec.CLASS_NAMES; spec.NONE for no concept) of IMAGE tensors (..., H, W, 3)."""
        flat = images.reshape(-1, *images.shape[-3:])
        return self.classifier.predict(flat).reshape(images.shape[:-3])

    def predict(self, prompts, seeds, model=None, clip=None, **settings):
        """Class ids (len(prompts), len(seeds)) of what `model` draws for each prompt and seed."""
        return self.classify(self.generate(prompts, seeds, model, clip, **settings))

    def predict_pairs(self, prompts, seeds, model=None, clip=None, **settings):
        """Class ids (N,) for N (prompt, seed) pairs."""
        return self.classify(self.decode(self.sample_pairs(prompts, seeds, model, clip, **settings)))

    def concept_masks(self, images, concept):
        """Where a concept is in images (..., H, W, 3): foreground for objects/people, everything for styles."""
        index = self.spec.concept_index(concept) if isinstance(concept, str) else int(concept)
        if self.spec.CONCEPTS[index].concept_type == "style":
            return torch.ones(images.shape[:-1])
        return segment.foreground(images)


_cache = {}


def _assemble(groups, meta, seed, preset, path):
    import comfy.sd

    # a file carries its own networks' configs (worlds of other text widths load the same way)
    base = nets.new_base_model(meta.get("unet_config"))
    base.diffusion_model.load_state_dict(groups["unet"], strict=True)
    clip = nets.new_clip(meta.get("clip_config"))
    missing, _ = clip.load_sd(groups["clip"], full_model=True)
    if missing:
        raise ValueError(f"{path}: text encoder keys missing: {missing[:4]}")
    vae_sd = groups["vae"]
    family = nets.family_of(meta.get("unet_config"))
    if family == "sdxl":
        # the decoder was trained on the UNet's own latents; ComfyUI hands a VAE latents divided by the family's
        # scale factor (SDXL 0.13025, not SD1.5's 0.18215), so the TAESD's own scale must be that one
        vae_sd = dict(vae_sd, vae_scale=torch.tensor(float(base.latent_format.scale_factor)))
    vae = comfy.sd.VAE(sd=vae_sd)
    sp = spec.named(meta.get("world", "standard"))  # files from before the mass world hold the standard one
    cls = classifier_mod.Classifier(len(sp.CLASS_NAMES))
    cls.load_state_dict(groups["classifier"])
    cls.eval().requires_grad_(False)
    model = nets.patcher(base)
    model.model_options["transformer_options"]["optimized_attention_override"] = nets.sdpa_override
    # how the world is meant to be sampled, for the pack's nodes that pick a picture size (nodes/host.py):
    # its 64 px, not SD1.5's 512, which is 64x the pixels and off everything it learned
    from ..nodes.host import SAMPLING_HINT  # the entry host.default_image_size reads

    model.model_options[SAMPLING_HINT] = {"image_size": LATENT_SHAPE[-1] * 8}
    return World(seed=seed, preset=preset, path=path, model=model, clip=clip, vae=vae, classifier=cls,
                 metrics=meta.get("metrics", {}), family=family, spec=sp)


def load(path, seed=0, preset="full", current_only=False):
    """A world file as a World. current_only: a ValueError, like a stale version's, when the file was trained with
    other trial options than today's code uses (load_or_train then retrains it); trial files load without it."""
    groups, meta = store.load(path)
    if current_only:
        from . import train

        trained = meta.get("training", train.OPTIONS_OFF)
        if trained != train.training_options():
            raise ValueError(f"{path}: trained with options {trained}, not today's {train.training_options()}")
        if meta.get("spec") != spec.named(meta.get("world", "standard")).as_dict():
            raise ValueError(f"{path}: trained on other concepts than today's {meta.get('world', 'standard')} world")
        stored = meta.get("metrics", {}).get("preset") or {}
        now = train.PRESETS.get(stored.get("name"))
        # a recipe changed since (the mass world's 4000 diffusion steps became 3000) is another world for the same
        # seed; keys a file predates (world, text_width) are named by its file name and spec, checked above
        changed = [k for k in train.RECIPE_KEYS if k in stored and stored[k] != getattr(now, k)] if now else []
        if changed:
            raise ValueError(f"{path}: trained with {', '.join(f'{k} {stored[k]}' for k in changed)}, not today's "
                             f"{', '.join(f'{k} {getattr(now, k)}' for k in changed)}")
    return _assemble(groups, meta, meta.get("seed", seed), meta.get("preset", preset), path)


def load_or_train(seed: int = 0, preset: str = "full", cache_dir=None, evaluate=None, text_width=None,
                  family: str = "sd15") -> World:
    """The world for a seed: loaded from <models>/mace_world/ when there, else trained (minutes) and saved.

    preset "full" is the real world; "smoke" trains for seconds and only proves the plumbing; "mass" is the world of
    126 concepts (mass.py, about 29 minutes of training on one CPU thread) and "mass_smoke" its smoke version. cache_dir
    overrides the folder (tests use a temporary one for smoke worlds). evaluate (default: full preset only)
    measures how often the trained model draws the right concept and stores it in world.metrics. text_width (default:
    the preset's, else nets.TEXT_WIDTH, 64) sets the text encoder's and the UNet's context width, to see what the
    world's width does to erasure; a file of another width than 64 says so in its name.
    family "sdxl" is the same world in SDXL's architecture (nets.sdxl_configs: CLIP-L + CLIP-G, pooled vector and size
    conditioning), saved under its own file name.
    """
    from . import evaluate as evaluate_mod
    from . import train

    if family not in nets.FAMILIES:
        raise ValueError(f"unknown world family {family!r}; one of {', '.join(nets.FAMILIES)}")
    if preset not in train.PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; one of {', '.join(train.PRESETS)}")
    if family == "sdxl":
        if text_width is not None:
            raise ValueError("text_width is for the SD1.5 world; the SDXL world has its own widths")
        configs = nets.sdxl_configs()
        path = store.world_path(seed, preset, cache_dir, None, family)
    else:
        configs = nets.configs(train.PRESETS[preset].text_width if text_width is None else text_width)
        width = configs[1]["hidden_size"]
        path = store.world_path(seed, preset, cache_dir, None if width == nets.TEXT_WIDTH else width)
    key = (path, os.path.getmtime(path) if os.path.exists(path) else None)
    if key[1] is not None and key in _cache:
        return _cache[key]
    with store.locked(path):
        if os.path.exists(path):
            try:
                world = load(path, seed, preset, current_only=True)
                log.info("concept world: loaded %s", path)
            except ValueError as e:
                log.warning("concept world: retraining, %s", e)
                world = None
        else:
            world = None
        if world is None:
            log.info("concept world: training seed %d preset %s (saved to %s)", seed, preset, path)
            taesd, base, clip, cls, metrics = train.train_world(seed, train.PRESETS[preset], configs)
            groups = {"unet": store.state_dict_f32(base.diffusion_model),
                      "clip": store.state_dict_f32(clip.cond_stage_model),
                      "vae": store.state_dict_f32(taesd), "classifier": store.state_dict_f32(cls)}
            sp = train.PRESETS[preset].spec
            meta = {"seed": seed, "preset": preset, "family": family, "world": sp.name, "spec": sp.as_dict(),
                    "unet_config": configs[0], "clip_config": configs[1], "prediction": "v",
                    "sampler": SamplerSettings().__dict__, "metrics": metrics, "training": train.training_options()}
            world = _assemble(groups, meta, seed, preset, path)
            if (not preset.endswith("smoke")) if evaluate is None else evaluate:
                world.metrics["generation"] = evaluate_mod.draw_accuracy(world)
                log.info("concept world: draws the right concept for %s", world.metrics["generation"])
            meta["metrics"] = world.metrics
            store.save(path, groups, meta)
    _cache.clear()  # one world in memory at a time
    _cache[(path, os.path.getmtime(path))] = world
    return world
