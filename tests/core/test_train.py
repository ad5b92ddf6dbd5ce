"""Stage 2's start and settings on plain tensors: the paper's LoRA start, its per-type presets, and input bounds."""

import math

import pytest
import torch

from mace_core.attention_loss import TIMESTEP_KINDS
from mace_core.concept_files import concept_list
from mace_core.concepts import CONCEPT_TYPES, EXPLICIT_TERMS, PRESETS, describe_presets, format_lr, parse_concepts
from mace_core.errors import MaceInputError
from mace_core.train import (
    CUSTOM,
    PER_TYPE,
    TrainConfig,
    concept_settings,
    init_lora,
    train_concepts,
)

SD15 = {f"l{i}.attn2.to_{kv}.weight": (w, 768) for i, w in enumerate([320, 640, 1280, 1280]) for kv in "kv"}


def _excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    z = (x - x.mean()) / x.std()
    return float(z.pow(4).mean() - 3)


@pytest.mark.parametrize("rank", [1, 4])
def test_init_is_the_papers_normal_down_with_std_one_over_rank_and_zero_up(rank):
    up, down = init_lora(SD15, rank, torch.Generator().manual_seed(0))
    pooled = torch.cat([down[k].detach().flatten() for k in SD15])  # 8 x 768 x rank draws
    assert abs(float(pooled.mean())) < 0.05 / rank
    assert float(pooled.std()) == pytest.approx(1 / rank, rel=0.05)
    # normal, not uniform: a uniform start has excess kurtosis -1.2 and no value beyond its bound
    assert abs(_excess_kurtosis(pooled)) < 0.3
    assert float(pooled.abs().max()) > 3 / rank
    for k, (out_dim, in_dim) in SD15.items():
        assert up[k].shape == (out_dim, rank) and down[k].shape == (rank, in_dim)
        assert not up[k].any() and up[k].requires_grad and down[k].requires_grad
        assert up[k].dtype == down[k].dtype == torch.float32


def test_init_is_seeded_caps_rank_and_names_a_bad_rank():
    shapes = {"a.to_k.weight": (8, 6), "a.to_v.weight": (4, 3)}
    up, down = init_lora(shapes, 5, torch.Generator().manual_seed(1))
    _, down2 = init_lora(shapes, 5, torch.Generator().manual_seed(1))
    _, down3 = init_lora(shapes, 5, torch.Generator().manual_seed(2))
    assert all(torch.equal(down[k], down2[k]) for k in shapes)
    assert not any(torch.equal(down[k], down3[k]) for k in shapes)
    assert down["a.to_v.weight"].shape == (3, 3) and up["a.to_v.weight"].shape == (4, 3), "rank capped by the sides"
    with pytest.raises(MaceInputError, match="'rank'"):
        init_lora(shapes, 0, torch.Generator())


PEFT_PROBE = """
import json, torch, peft
torch.manual_seed(0)
net = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(768, 640, bias=False)),
                          peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["0"]))
layer = net.base_model.model[0]
down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
print(json.dumps({"down": list(down.shape), "up": list(up.shape), "up_zero": not up.any().item(),
                  "scaling": layer.scaling["default"], "std": down.std().item()}))
"""


def test_init_matches_peft_gaussian_statistics():
    """peft's "gaussian" LoRA init is the paper's one; ours must draw from the same distribution. peft runs in a
    fresh interpreter: the host tests' torchvision stand-in (ComfyUI imports torchvision) would break the
    transformers import that peft pulls in."""
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed (scripts/requirements-dev.txt)")
    # through peft's public API: its layer classes' signatures change by release
    out = subprocess.run([sys.executable, "-c", PEFT_PROBE], capture_output=True, text=True, check=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    up, down = init_lora({"k": (640, 768)}, 4, torch.Generator().manual_seed(0))
    assert theirs["down"] == list(down["k"].shape) and theirs["up"] == list(up["k"].shape)
    assert theirs["up_zero"] and theirs["scaling"] == 1.0
    assert float(down["k"].detach().std()) == pytest.approx(theirs["std"], rel=0.1)


def test_first_adam_step_moves_the_weight_by_lr_times_the_down_scale():
    """Why the start matters: Adam's first step moves each up entry by lr, so |dW| = lr * |down| * sqrt(out); the
    paper's lr means the paper's step only with the paper's down scale."""
    torch.manual_seed(0)
    w = torch.randn(320, 768) / 768**0.5
    x = torch.randn(768, 16)

    class Task:
        def __init__(self, gen):
            self.up, self.down = init_lora({"k": (320, 768)}, 1, gen)

        def parameters(self):
            return [self.up["k"], self.down["k"]]

        def loss(self, step, gen):
            return ((w + self.up["k"] @ self.down["k"]) @ x).square().mean()

    lr = 1e-4
    (task, _), = train_concepts(1, lambda i, g: Task(g), TrainConfig(steps=1, learning_rate=lr))
    moved = float((task.up["k"] @ task.down["k"]).detach().norm())
    expected = lr * float(task.down["k"].detach().norm()) * 320**0.5
    assert moved == pytest.approx(expected, rel=0.1)
    uniform_down_norm = (768 * (1 / 768) / 3) ** 0.5  # +-1/sqrt(in) uniform: variance 1/(3 in) per entry
    assert moved > 20 * lr * uniform_down_norm * 320**0.5, "far above a +-1/sqrt(in) start's first step"


PAPER = {  # the paper's configs (MACE @057e7a6 configs/): lr, steps, timesteps; styles on the whole image
    "celebrity": (1e-4, 50, "importance", "attention"),
    "style": (1e-4, 50, "importance", "whole image"),
    "object": (1e-5, 50, "importance", "attention"),
    "explicit": (1e-5, 120, "uniform", "attention"),
}


def test_presets_are_the_papers_for_every_type():
    assert set(PRESETS) == set(CONCEPT_TYPES) == set(PAPER)
    for concept_type, (lr, steps, kind, mask) in PAPER.items():
        p = PRESETS[concept_type]
        assert (p.learning_rate, p.steps, p.timestep_sampling, p.mask_source) == (lr, steps, kind, mask), concept_type
        assert p.timestep_sampling in TIMESTEP_KINDS
        s = concept_settings(concept_type, PER_TYPE)
        assert (s.learning_rate, s.steps, s.timestep_sampling) == (lr, steps, kind)
        assert set(s.source.values()) == {f"paper {concept_type}"}
    text = describe_presets()
    assert "explicit: lr 1e-5, 120 steps, uniform timesteps" in text and "whole-image masks" in text
    assert (format_lr(1e-4), format_lr(1.5e-2), format_lr(0.1)) == ("1e-4", "1.5e-2", "1e-1")


def test_custom_wins_over_the_preset():
    # a value changed from the node's default is the user's: it wins in per-type mode, and says so
    s = concept_settings("explicit", PER_TYPE, steps=7, learning_rate=1e-2)
    assert (s.steps, s.learning_rate, s.timestep_sampling) == (7, 1e-2, "uniform")
    assert s.source == {"steps": "input", "learning_rate": "input", "timestep_sampling": "paper explicit"}
    s = concept_settings("explicit", PER_TYPE, timestep_sampling="uniform")
    assert s.timestep_sampling == "uniform" and s.source["timestep_sampling"] == "input"
    # custom: the inputs for every concept, defaults included
    s = concept_settings("explicit", CUSTOM)
    assert (s.steps, s.learning_rate, s.timestep_sampling) == (50, 1e-4, "importance")
    assert set(s.source.values()) == {"input"}
    assert "lr 1e-4 (input), 50 steps (input)" in s.describe()
    # a widget's float noise around the default still counts as the default
    assert concept_settings("object", PER_TYPE, learning_rate=0.00010000000000000002).learning_rate == 1e-5


@pytest.mark.parametrize("kwargs,input_name", [
    (dict(steps=0), "steps"),
    (dict(steps=10001), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=-1e-4), "learning_rate"),
    (dict(learning_rate=0.5), "learning_rate"),
    (dict(learning_rate=1e-9), "learning_rate"),
    (dict(learning_rate=math.nan), "learning_rate"),
    (dict(learning_rate=math.inf), "learning_rate"),
    (dict(settings="paper"), "settings"),
])
def test_out_of_bounds_settings_name_the_input(kwargs, input_name):
    args = dict(concept_type="celebrity", settings=PER_TYPE)
    args.update(kwargs)
    with pytest.raises(MaceInputError) as e:
        concept_settings(**args)
    assert e.value.input_name == input_name and f"'{input_name}'" in str(e.value)
    if input_name != "settings":
        with pytest.raises(MaceInputError, match=f"'{input_name}'"):
            TrainConfig(**kwargs).check()


def test_explicit_without_names_is_the_papers_list():
    for parse in (lambda t, f, a="": parse_concepts(t, f, a), lambda t, f, a="": concept_list(t, f, a)):
        cs = parse("", "explicit")
        assert [c.name for c in cs] == list(EXPLICIT_TERMS) == ["nudity", "naked", "erotic", "sexual"]
        assert {c.anchor for c in cs} == {"a person wearing clothes"} and {c.concept_type for c in cs} == {"explicit"}
        assert {c.anchor for c in parse("  \n# none\n", "explicit", "a dressed person")} == {"a dressed person"}
        assert [c.name for c in parse("gore", "explicit")] == ["gore"], "names given: only those"
        for concept_type in ("celebrity", "style", "object"):
            with pytest.raises(MaceInputError, match="no concepts"):
                parse("", concept_type)


# ---------------------------------------------------------------- many concepts in one step (issue 18)

class _Lone:
    """One concept's toy task: its LoRA should cancel a fixed projection; large targets make clipping act."""

    def __init__(self, index, gen, scale):
        self.w = torch.randn(5, 3, generator=torch.Generator().manual_seed(100 + index)) * scale
        self.up, self.down = init_lora({"a": (5, 3), "b": (2, 3)}, 1, gen)

    def parameters(self):
        return [self.up["a"], self.up["b"], self.down["a"], self.down["b"]]

    def loss(self, step, gen):
        x = torch.randn(3, 4, generator=gen)
        return ((self.w + self.up["a"] @ self.down["a"]) @ x).square().mean() + \
            (self.up["b"] @ self.down["b"] @ x - 1).square().mean()


class _Stacked:
    """The same concepts as one batch task: stacked factors, each concept's loss from its own slice and generator."""

    def __init__(self, lone):
        self.lone = lone
        self.up = {k: torch.stack([t.up[k].detach() for t in lone]).requires_grad_(True) for k in "ab"}
        self.down = {k: torch.stack([t.down[k].detach() for t in lone]).requires_grad_(True) for k in "ab"}

    def parameters(self):
        return [self.up["a"], self.up["b"], self.down["a"], self.down["b"]]

    def losses(self, step, gens):
        out = []
        for i, (t, g) in enumerate(zip(self.lone, gens)):
            x = torch.randn(3, 4, generator=g)
            out.append(((t.w + self.up["a"][i] @ self.down["a"][i]) @ x).square().mean() +
                       (self.up["b"][i] @ self.down["b"][i] @ x - 1).square().mean())
        return torch.stack(out)


def test_a_batch_trains_each_concept_as_it_trains_alone():
    """train_batch = train_task per concept: own generator, own AdamW state (slices of one elementwise AdamW), own
    gradient clipping (scales differ, so clipping bites on some concepts and not on others)."""
    from mace_core.train import concept_generator, train_batch, train_task

    cfg = TrainConfig(steps=25, learning_rate=3e-2, seed=2)
    scales = [0.1, 1.0, 30.0]
    alone = []
    for i, s in enumerate(scales):
        gen = concept_generator(cfg.seed, i)
        task = _Lone(i, gen, s)
        alone.append((task, train_task(task, cfg, gen)))
    gens = [concept_generator(cfg.seed, i) for i in range(3)]
    lone = [_Lone(i, g, s) for i, (g, s) in enumerate(zip(gens, scales))]
    stacked = _Stacked(lone)
    calls = []
    curves = train_batch(stacked, cfg, gens, calls.append)
    assert calls == [3] * 25, "progress counts one unit per concept and step"
    for i, (task, losses) in enumerate(alone):
        assert curves[i] == pytest.approx(losses, rel=1e-5, abs=1e-7)
        for k in "ab":
            assert torch.allclose(stacked.up[k][i], task.up[k], atol=1e-6, rtol=1e-5), (i, k)
            assert torch.allclose(stacked.down[k][i], task.down[k], atol=1e-6, rtol=1e-5), (i, k)
    assert curves[2][-1] < curves[2][0]
