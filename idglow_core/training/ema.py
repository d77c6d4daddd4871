"""Exponential moving average of the trainable parameters (optional, ``optim.ema_decay > 0``)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["EMA"]


class EMA:
    """Shadow copy ``s <- decay * s + (1 - decay) * p`` of named trainable parameters, kept in float32 on the
    parameters' device. ``swapped_in(named)`` temporarily loads the shadow into the model (for export)."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float):
        self.decay = float(decay)
        self.shadow = {k: p.detach().float().clone() for k, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.nn.Parameter]) -> None:
        for k, p in named.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.shadow = {k: state[k].float().to(self.shadow[k].device).clone() for k in self.shadow}

    @contextlib.contextmanager
    def swapped_in(self, named: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        saved = {k: p.detach().clone() for k, p in named.items()}
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(saved[k])
