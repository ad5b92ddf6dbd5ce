"""The full SDXL-architecture world (trained once, about 7 CPU-minutes on one thread, then cached under ComfyUI's
models folder) must really know its concepts, and erasure on it is measured as on the SD1.5 world
(bench/eval_world.py --family sdxl; figures in docs/sdxl_world.md)."""

import pytest
from world_support import pack_import

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(cw):
    return cw.load_or_train(seed=0, family="sdxl")


def test_sdxl_world_draws_the_concept_asked_for(world):
    evaluate = pack_import("concept_world.evaluate")
    assert world.family == "sdxl"
    cids, pred = evaluate.hits(world, names="canonical", seeds=range(100, 104))  # seeds not used at training time
    assert (cids == pred).float().mean().item() >= 0.85
    cids, pred = evaluate.hits(world, names="synonyms", seeds=range(100, 104))
    assert (cids == pred).float().mean().item() >= 0.85


def test_sdxl_world_depends_on_its_pooled_vector(world):
    """Its pooled road carries the concept: with the context of one prompt and the pooled vector of another, the
    world's UNet predicts something else than with both of one prompt (the road MACE's pooled editing closes)."""
    import torch

    (c1, p1), (_, p2) = world.encode(["a photo of red lantern", "a photo of an object"])
    unet = world.model.model.diffusion_model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([600.0])
    with torch.no_grad():
        own = unet(x, t, context=c1, y=world.model.model.encode_adm(pooled_output=p1, width=64, height=64))
        other = unet(x, t, context=c1, y=world.model.model.encode_adm(pooled_output=p2, width=64, height=64))
    assert (own - other).abs().mean() > 0.01 * own.abs().mean()


def test_eight_erased_on_the_sdxl_world_every_stage_counting(world):
    """Issue 15's goal on the SDXL world: erasing 8 (people, objects and styles mixed) at a LoRA rate of 3e-3 (as the
    SD1.5 world's test; at the defaults the LoRAs barely move a toy, docs/world_attention.md), the full pipeline scores
    a higher H than refinement alone, than refinement + LoRAs summed and than LoRAs fused without refinement. Measured
    on this release's CPU: MACE 0.87, refine only 0.74, summed 0.29, no refine 0.43 (docs/sdxl_world.md); the bound
    is the floor the SD1.5 world's test uses, since a seed trains another world on another kind of CPU."""
    import torch

    ee = pack_import("concept_world.erasure_eval")
    pipelines = (ee.REFINE, ee.SUMMED, ee.MACE, ee.NO_REFINE)
    with torch.inference_mode():
        got = ee.measure(world, ee.ORDER[:8], range(6), ee.Settings(lr=3e-3, edit_pooled=False), pipelines)
    h = {p: round(s["H"], 3) for p, s in got.items()}
    for ablation in (ee.REFINE, ee.SUMMED, ee.NO_REFINE):
        assert got[ee.MACE]["H"] > got[ablation]["H"], h
    assert got[ee.MACE]["H"] >= 0.80, (h, got[ee.MACE])
