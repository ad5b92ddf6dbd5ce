"""The MACE_LORAS bundle: one low-rank update per erased concept, on the cross-attention key/value matrices.

Keys are the model's own weight keys (e.g. 'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight');
a concept's update of that weight is  scale * up @ down  with up (out, rank) and down (rank, in).
"""

from dataclasses import dataclass, field

import torch


@dataclass
class ConceptLoRA:
    concept: str
    anchor: str
    concept_type: str
    rank: int
    steps: int
    up: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]
    alpha: float | None = None  # kohya convention: scale = alpha / rank; None means scale 1
    meta: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def keys(self) -> list[str]:
        return sorted(self.up)

    def delta(self, key: str, dtype=torch.float32) -> torch.Tensor:
        return (self.up[key].to(dtype) @ self.down[key].to(dtype)) * self.scale


@dataclass
class LoRABundle:
    loras: list[ConceptLoRA]
    base: str = ""  # fingerprint of the base model's cross-attention weights ('' when unknown)
    meta: dict = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return sorted({k for lora in self.loras for k in lora.up})

    @property
    def concepts(self) -> list[str]:
        return [lora.concept for lora in self.loras]

    def summed_delta(self, key: str) -> torch.Tensor | None:
        """Naive sum of every concept's update (what the closed-form fusion improves on)."""
        parts = [lora.delta(key) for lora in self.loras if key in lora.up]
        return torch.stack(parts).sum(0) if parts else None
