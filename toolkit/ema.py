"""Exponential moving average of a model's weights, the weights diffusion models are sampled with."""

from __future__ import annotations

import torch
from torch import nn

from dtk.runtime.errors import DtkError


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ after each optimizer step, with d = min(decay, (1 + n) / (10 + n)).

    The warm-up in d lets the average follow the fast early changes, so short runs get a useful EMA too.
    The average is kept in float32 whatever the training precision."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise DtkError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()
        }

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        state = model.state_dict()
        for name, shadow in self.shadow.items():
            shadow.lerp_(state[name].detach().float(), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights in the model's state-dict layout (CPU tensors), loadable into the model directly."""
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, weights: dict, num_updates: int) -> None:
        for name, shadow in self.shadow.items():
            shadow.copy_(weights[name])
        self.num_updates = num_updates
