"""MACE Erase: the whole method in one node (refine; or refine, train and fuse), with one progress bar."""

import logging
import time
from types import SimpleNamespace

import comfy.utils
from comfy_api.latest import io

from ..mace_core.errors import MaceInputError
from ..mace_core.train import PER_TYPE, concept_settings
from . import fuse, host, inputs, refine, sampling, train
from .inputs import concept_list_input, stage_list

log = logging.getLogger("MACE")

QUICK = "quick"
FULL = "full"
MODES = (QUICK, FULL)


class MACEErase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MACEErase",
            display_name="MACE Erase",
            category="MACE",
            description="Erases the listed concepts in one node. quick: closed-form refinement of the cross-attention "
                        "only (MACE stage 1, seconds). full: refinement, one attention-suppressing LoRA per concept "
                        "trained on images the original model draws, then closed-form fusion of the LoRAs (all three "
                        "stages, minutes per concept), with the paper's settings for each concept's type. Returns a "
                        "patched copy of the model; the input model is not changed, also when the run is cancelled.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to erase concepts from (SD1.x, SD2.x or SDXL "
                                                "UNet)."),
                io.Clip.Input("clip", tooltip="The text encoder loaded with this model; its features are the context "
                                              "the cross-attention reads."),
                *inputs.concept_inputs(),
                io.Combo.Input("mode", options=list(MODES), default=FULL,
                               tooltip="full: MACE's three stages (refine, train a LoRA per concept, fuse), minutes "
                                       "per concept, the strongest erasure. quick: refinement only, seconds; it "
                                       "already removes most of a concept."),
                *inputs.preserve_inputs("the original", "edit"),
                # stated, not left to the frontend: it adds a control widget to any 'seed' anyway, and the workflow
                # generator must know it is there (else saved widget values shift by one after the seed)
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="full mode: seeds the training images, the LoRAs' start and every training "
                                     "step; the same seed gives the same erased model. Not used by quick mode."),
                inputs.concept_file_input(),
                concept_list_input(),
                # new inputs go last: saved workflows keep their widget order and their links
                *sampling.image_sampling_inputs("Not used by quick mode."),
            ],
            outputs=[io.Model.Output(tooltip="The erased model, ready for KSampler, MACE Erasure Check or MACE Save "
                                             "Erasure.")],
        )

    @classmethod
    def fingerprint_inputs(cls, concept_file="", **kwargs):
        return inputs.concept_file_fingerprint(concept_file)

    @classmethod
    def execute(cls, model, clip, concepts, concept_type, anchor, mode, preserve, preservation_strength, lambda_,
                seed, concept_file="", concept_list=None, image_steps=None, image_cfg=None, image_sampler=None,
                image_scheduler=None):
        return io.NodeOutput(erase_model(model, clip, concepts, concept_type, anchor, mode, preserve,
                                         preservation_strength, lambda_, seed, concept_file or "", concept_list,
                                         image_steps, image_cfg, image_sampler, image_scheduler))


class StageProgress:
    """One progress bar across stages that each make their own comfy.utils.ProgressBar.

    refine_model, train_loras and fuse_model each report to a bar of their own length; while this is entered,
    ComfyUI's progress hook receives their reports mapped into one bar whose stages are weighted by `units` (each
    stage's expected ticks), so the user sees one bar fill once instead of three bars each filling from zero. The
    previous hook is restored on exit, also when a stage raises (cancel)."""

    def __init__(self, units: list[int]):
        self.units = [max(1, int(u)) for u in units]
        self.total = sum(self.units)
        self.stage, self.done = -1, 0.0

    def __enter__(self):
        self.prev = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)
        return self

    def __exit__(self, *exc):
        comfy.utils.set_progress_bar_global_hook(self.prev)
        return False

    def next(self):
        """Start the next stage: the bar stands at the sum of the stages before it; a cancel stops here."""
        host.check_cancel()
        self.stage += 1
        self._report(float(sum(self.units[:self.stage])), None)

    def _hook(self, value, total, preview, *args, **kwargs):
        stage = max(0, self.stage)
        frac = min(1.0, float(value) / max(1, float(total or 1)))
        self._report(sum(self.units[:stage]) + frac * self.units[stage], preview, *args, **kwargs)

    def _report(self, done, preview, *args, **kwargs):
        self.done = max(self.done, done)  # never backwards: a stage's bar starts at zero
        if self.prev is not None:
            self.prev(int(round(self.done)), self.total, preview, *args, **kwargs)


def _check_mode(mode):
    if mode not in MODES:
        raise MaceInputError("mode", f"unknown mode '{mode}'.", f"Use one of: {', '.join(MODES)}.")


def _record(model, items):
    """Quick mode: record what the clone erases, as Fuse does, so MACE Save Erasure and Erasure Check know it."""
    fuse.record_erased(model, [SimpleNamespace(concept=c.name, anchor=c.anchor, concept_type=c.concept_type)
                               for c in items])


def erase_model(model, clip, concepts, concept_type="celebrity", anchor="", mode=FULL, preserve="",
                preservation_strength=1.0, lambda_=0.01, seed=0, concept_file="", concept_list=None,
                image_steps=None, image_cfg=None, image_sampler=None, image_scheduler=None):
    """quick: refine_model. full: refine, train on the refined model with images and masks from the original model
    (at the model's usual picture size, made as the image_* settings say), fuse onto the refined model: as the
    separate nodes with their defaults. Every stage returns a clone, so the input MODEL is never changed, whatever
    stage a cancel or an error stops."""
    _check_mode(mode)
    images = sampling.image_sampling(image_steps, image_cfg, image_sampler, image_scheduler)
    if mode == FULL:  # before any stage runs: nothing is half-done when a setting is wrong
        sampling.check_image_sampling(images)
    # bad lists fail before any work; every stage then reads this one list (its boxes are not passed on)
    cl = stage_list(concept_list, "MACE Erase", concepts, concept_type, anchor, concept_file, preserve)
    items = list(cl.concepts)
    t0 = time.perf_counter()
    n = len(items)
    kept = len(cl.preserve)
    if mode == QUICK:
        units = [refine.progress_units(n, kept)]
    else:
        per = [concept_settings(c.concept_type, PER_TYPE) for c in items]
        units = [refine.progress_units(n, kept), sum(p.steps + images.steps + 1 for p in per),
                 fuse.progress_units(n, kept, preservation_strength)]
    with StageProgress(units) as bar:
        bar.next()
        refined = refine.refine_model(model, clip, "", cl.concept_type, "", "", preservation_strength, lambda_,
                                      concept_list=cl)
        if mode == QUICK:
            _record(refined, items)
            log.info("MACE erase (quick): %d concepts in %.1fs", n, time.perf_counter() - t0)
            return refined
        bar.next()
        req = train.TrainRequest(concept_type=cl.concept_type, seed=seed, image_size=sampling.native_size(model),
                                 image_model=model, concept_list=cl, sampling=images)
        bundle, _, _ = train.train_loras(refined, clip, req)
        bar.next()
        out = fuse.fuse_model(refined, clip, bundle, "", preservation_strength, lambda_, concept_list=cl)
    log.info("MACE erase (full): %d concepts in %.1fs", n, time.perf_counter() - t0)
    return out


NODES = [MACEErase]
