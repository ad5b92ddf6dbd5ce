"""Stage 2's loop: one fresh low-rank update per concept, trained by AdamW on a loss the host computes.

The host supplies, per concept, a task: the trainable tensors and a function giving the loss of one step (it draws
its image, prompt, timestep and noise from the generator it is handed). Everything random comes from one generator
per concept seeded from (seed, concept index), so the same seed gives the same LoRAs on the same device.
"""

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .concepts import PRESETS, format_lr
from .errors import MaceInputError


class ConceptTask(Protocol):
    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (leaf tensors with requires_grad)."""

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one training step."""


# Sane bounds, one source for the node's widgets and for direct callers. With Adam each step moves a factor by about
# the learning rate whatever the gradient's size, and the down matrix starts at unit scale (init_lora), so above 0.1
# a rank-1 update leaves the weights' scale within a few steps; below 1e-7 fifty steps change nothing measurable.
STEPS_MIN, STEPS_MAX = 1, 10000
LEARNING_RATE_MIN, LEARNING_RATE_MAX = 1e-7, 0.1


def check_steps(steps, input_name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not STEPS_MIN <= steps <= STEPS_MAX:
        raise MaceInputError(input_name, f"must be a whole number from {STEPS_MIN} to {STEPS_MAX}, got {steps!r}.",
                             "The paper trains 50 steps per concept (120 for explicit content).")
    return steps


def check_learning_rate(lr, input_name: str = "learning_rate") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or \
            not LEARNING_RATE_MIN <= lr <= LEARNING_RATE_MAX:
        raise MaceInputError(input_name, f"must be between {LEARNING_RATE_MIN:g} and {LEARNING_RATE_MAX:g}, "
                                         f"got {lr!r}.",
                             "The paper uses 1e-4 (celebrities, styles) or 1e-5 (objects, explicit content).")
    return float(lr)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50
    learning_rate: float = 1e-4
    seed: int = 0
    weight_decay: float = 1e-2  # the paper's AdamW setting (and AdamW's usual default)
    max_grad_norm: float = 1.0  # the paper's; a rank-1 update can take one wild step on an outlier timestep

    def check(self):
        check_steps(self.steps)
        check_learning_rate(self.learning_rate)


# The Train node's choice between the paper's settings for each concept's type and the inputs as typed.
PER_TYPE, CUSTOM = "per type (paper)", "custom"
SETTINGS = (PER_TYPE, CUSTOM)
# The node's defaults for the settings a preset supplies (the celebrity preset, which they always were). With
# per-type settings an input left at its default takes the concept's type's value; any other value is the user's
# and wins, so a preset never overrides what someone typed.
DEFAULT_STEPS, DEFAULT_LEARNING_RATE, DEFAULT_TIMESTEPS = 50, 1e-4, "importance"


@dataclass(frozen=True)
class ConceptSettings:
    """What one concept trains with, and where each value came from ('paper <type>' or 'input')."""
    steps: int
    learning_rate: float
    timestep_sampling: str
    source: dict

    def describe(self) -> str:
        return (f"lr {format_lr(self.learning_rate)} ({self.source['learning_rate']}), {self.steps} steps "
                f"({self.source['steps']}), {self.timestep_sampling} timesteps ({self.source['timestep_sampling']})")


def check_settings(settings: str, input_name: str = "settings") -> str:
    if settings not in SETTINGS:
        raise MaceInputError(input_name, f"unknown value '{settings}'.", f"Use one of: {', '.join(SETTINGS)}.")
    return settings


def concept_settings(concept_type: str, settings: str, steps: int = DEFAULT_STEPS,
                     learning_rate: float = DEFAULT_LEARNING_RATE,
                     timestep_sampling: str = DEFAULT_TIMESTEPS) -> ConceptSettings:
    """Steps, learning rate and timestep sampling for one concept of `concept_type`. custom: the inputs as given, for
    every concept. per type (paper): the type's preset (concepts.PRESETS), except an input changed from its default."""
    check_settings(settings)
    given = {"steps": check_steps(steps), "learning_rate": check_learning_rate(learning_rate),
             "timestep_sampling": timestep_sampling}
    default = {"steps": DEFAULT_STEPS, "learning_rate": DEFAULT_LEARNING_RATE, "timestep_sampling": DEFAULT_TIMESTEPS}
    preset = PRESETS[concept_type]
    values, source = {}, {}
    for name, value in given.items():
        at_default = math.isclose(value, default[name], rel_tol=1e-6) if name == "learning_rate" else \
            value == default[name]  # a widget may hand back 1e-4 as 0.00010000000000000002
        if settings == PER_TYPE and at_default:
            values[name], source[name] = getattr(preset, name), f"paper {concept_type}"
        else:
            values[name], source[name] = value, "input"
    return ConceptSettings(values["steps"], values["learning_rate"], values["timestep_sampling"], source)


def concept_generator(seed: int, index: int) -> torch.Generator:
    """Independent stream per concept: adding a concept to the list does not change the others' LoRAs."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * index) % (2**63 - 1))


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator,
              device=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fresh LoRA factors per weight key, as the paper's training code starts them (diffusers' LoRA layer of its time;
    peft calls it the "gaussian" init): down ~ N(0, (1/r)^2), up zero, applied with scale 1 (no alpha/r). The zero up
    matrix makes training start exactly at the incoming weights. The down matrix's scale is what sets the step size:
    Adam moves the up matrix by about lr per element per step whatever the gradient's size, so the weight moves by
    about lr x |down|. A Kaiming-uniform start (+-1/sqrt(in)) at the same lr moves it some 20-50x less at 768 wide
    (bench/bench_lora_step.py). float32 leaves with requires_grad; r is rank capped by the matrix's sides."""
    if rank < 1:
        raise MaceInputError("rank", f"must be at least 1, got {rank}.")
    up, down = {}, {}
    for key in sorted(shapes):
        out_dim, in_dim = shapes[key]
        r = min(rank, out_dim, in_dim)
        d = torch.randn((r, in_dim), generator=generator, dtype=torch.float32) / r
        down[key] = d.to(device).requires_grad_(True)
        up[key] = torch.zeros((out_dim, r), dtype=torch.float32, device=device).requires_grad_(True)
    return up, down


def train_task(task: ConceptTask, cfg: TrainConfig, generator: torch.Generator,
               progress: Callable[[], None] | None = None) -> list[float]:
    """Runs cfg.steps AdamW steps on one task; returns the loss of every step. `progress` is called after each step
    and may raise to cancel (the partly trained tensors are then simply dropped by the caller)."""
    params = list(task.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    losses = []
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(step, generator)
        if not torch.isfinite(loss):
            if step == 0:  # nothing has been learnt yet: the model, its sampling or the data give this, not the lr
                raise FloatingPointError(f"MACE training loss is {loss.item()} at the first step, before any update: "
                                         "the model or its inputs give non-finite attention (check the model's "
                                         "sampling type, dtype and the training latents).")
            losses_so_far = ", ".join(f"{v:.3g}" for v in losses[-3:])
            raise FloatingPointError(f"MACE training loss became {loss.item()} at step {step} (last losses "
                                     f"{losses_so_far}); the updates diverged: lower the learning rate.")
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress()
    return losses


class BatchTask(Protocol):
    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors, every one stacked over the batch's concepts (dimension 0 is the concept)."""

    def losses(self, step: int, generators: list[torch.Generator]) -> torch.Tensor:
        """(K,) each concept's loss of one step; concept k draws its randomness from generators[k] and its loss
        depends on its own slice of the parameters only."""


def same_optimiser(a: TrainConfig, b: TrainConfig) -> bool:
    """Concepts that can share one stacked optimiser: AdamW is elementwise, so one AdamW over stacked factors is
    one AdamW per concept exactly when their steps and hyperparameters agree (the seed is per concept anyway)."""
    return (a.steps, a.learning_rate, a.weight_decay, a.max_grad_norm) == \
        (b.steps, b.learning_rate, b.weight_decay, b.max_grad_norm)


def clip_per_concept(params: list[torch.Tensor], max_norm: float):
    """clip_grad_norm_ per concept on stacked parameters: concept k's gradients (slice k of every tensor) are scaled
    by min(1, max_norm / (their joint norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ scales one concept's alone."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # (tensors, K)
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))


def train_batch(task: BatchTask, cfg: TrainConfig, generators: list[torch.Generator],
                progress: Callable[[int], None] | None = None, names: list[str] | None = None) -> list[list[float]]:
    """train_task for K concepts at once: the same cfg.steps AdamW steps, each concept on its own loss, with its own
    optimiser state (slice k of one AdamW's elementwise state) and its own gradient clipping. The losses are summed
    for one backward pass: each concept's loss depends on its own parameters only, so each gets exactly the gradient
    it would get alone. Returns every concept's losses; `progress(K)` after each step (it may raise to cancel)."""
    params = list(task.parameters())
    k = len(generators)
    names = names or [f"concept {i + 1}" for i in range(k)]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    losses: list[list[float]] = [[] for _ in range(k)]
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        loss = task.losses(step, generators)
        finite = torch.isfinite(loss)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            if step == 0:  # nothing has been learnt yet: the model, its sampling or the data give this, not the lr
                raise FloatingPointError(f"MACE training loss of '{names[bad]}' is {loss[bad].item()} at the first "
                                         "step, before any update: the model or its inputs give non-finite "
                                         "attention (check the model's sampling type, dtype and the training "
                                         "latents).")
            so_far = ", ".join(f"{v:.3g}" for v in losses[bad][-3:])
            raise FloatingPointError(f"MACE training loss of '{names[bad]}' became {loss[bad].item()} at step {step} "
                                     f"(last losses {so_far}); the updates diverged: lower the learning rate.")
        loss.sum().backward()
        if cfg.max_grad_norm > 0:
            clip_per_concept(params, cfg.max_grad_norm)
        opt.step()
        for i, v in enumerate(loss.detach().cpu().tolist()):
            losses[i].append(float(v))
        if progress:
            progress(k)
    return losses


def train_concepts(count: int, make_task: Callable[[int, torch.Generator], ConceptTask], cfg: TrainConfig,
                   progress: Callable[[], None] | None = None) -> list[tuple[ConceptTask, list[float]]]:
    """Trains one task per concept index in order; make_task(index, generator) builds it (its fresh LoRA factors
    drawn from the same generator the steps then use). Returns (task, losses) per concept."""
    cfg.check()
    out = []
    for i in range(count):
        gen = concept_generator(cfg.seed, i)
        task = make_task(i, gen)
        out.append((task, train_task(task, cfg, gen, progress)))
    return out
