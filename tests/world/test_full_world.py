"""The full world (trained once, minutes, then cached in ComfyUI's models folder) must really know its concepts."""

import pytest
import torch
from world_support import pack_import

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(cw):
    return cw.load_or_train(seed=0)


def test_classifier_knows_the_pictures(world):
    render = pack_import("concept_world.render")
    targets = [t for t in range(render.N_TARGETS) for _ in range(4)]
    images, _ = render.render(targets, torch.Generator().manual_seed(12345))  # not seen in training
    labels = torch.tensor([render.class_of(t) for t in targets])
    acc = (world.classifier.predict(images) == labels).float().mean().item()
    assert acc >= 0.95, acc
    assert world.metrics["classifier"]["vae"] >= 0.9, world.metrics["classifier"]


def test_model_draws_the_concept_asked_for(world):
    evaluate = pack_import("concept_world.evaluate")
    spec = world.spec
    cids, pred = evaluate.hits(world, names="canonical", seeds=range(100, 104))  # seeds not used at training time
    acc = (cids == pred).float().mean().item()
    ok = (cids == pred).float()
    per_type = {f: ok[torch.tensor([spec.CONCEPTS[c].concept_type == f for c in cids.tolist()])].mean().item()
                for f in spec.CONCEPT_TYPES}
    assert acc >= 0.85, (acc, per_type)
    assert min(per_type.values()) >= 0.7, per_type
    cids, pred = evaluate.hits(world, names="synonyms", seeds=range(100, 102))
    assert (cids == pred).float().mean().item() >= 0.7


def test_anchors_draw_no_concept(world):
    spec = world.spec
    prompts = [spec.anchor_prompts(f)[0] for f in spec.CONCEPT_TYPES]
    pred = world.predict(prompts, seeds=range(3))
    assert (pred == spec.NONE).float().mean().item() >= 0.6, pred


def test_node_returns_the_cached_world(host, world):
    from comfy_api.internal import make_locked_method_func

    node = pack_import("nodes.concept_world").MACEConceptWorld
    f = make_locked_method_func(node, node.FUNCTION, node.PREPARE_CLASS_CLONE({}))
    with torch.inference_mode():
        out = f(seed=0)
    assert out.result[0].model is world.model.model
