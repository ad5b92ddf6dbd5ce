"""Stage 2's loop: one fresh low-rank update per concept, trained by AdamW on a loss the host computes.

The host supplies, per concept, a task: the trainable tensors and a function giving the loss of one step (it draws
its image, prompt, timestep and noise from the generator it is handed). Everything random comes from one generator
per concept seeded from (seed, concept index), so the same seed gives the same LoRAs on the same device.
"""

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import MaceInputError


class ConceptTask(Protocol):
    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (leaf tensors with requires_grad)."""

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one training step."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50
    learning_rate: float = 1e-4
    seed: int = 0
    weight_decay: float = 1e-2  # AdamW's usual default
    max_grad_norm: float = 1.0  # a rank-1 update can take one wild step on an outlier timestep; clipping bounds it

    def check(self):
        if self.steps < 1:
            raise MaceInputError("steps", f"must be at least 1, got {self.steps}.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise MaceInputError("learning_rate", f"must be a positive number, got {self.learning_rate}.")


def concept_generator(seed: int, index: int) -> torch.Generator:
    """Independent stream per concept: adding a concept to the list does not change the others' LoRAs."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * index) % (2**63 - 1))


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator,
              device=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fresh LoRA factors per weight key: down uniform in +-1/sqrt(in) (the usual Kaiming-uniform bound for
    a=sqrt(5)), up zero, so training starts exactly at the incoming weights. float32 leaves with requires_grad."""
    if rank < 1:
        raise MaceInputError("rank", f"must be at least 1, got {rank}.")
    up, down = {}, {}
    for key in sorted(shapes):
        out_dim, in_dim = shapes[key]
        r = min(rank, out_dim, in_dim)
        bound = 1.0 / math.sqrt(in_dim)
        d = (torch.rand((r, in_dim), generator=generator, dtype=torch.float32) * 2 - 1) * bound
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
