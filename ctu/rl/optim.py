"""The policy optimizer: AdamW with a warmup schedule and global-norm clipping."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0 over this many optimizer updates.
      schedule: after warmup, "constant" or "cosine" decay to
        `learning_rate * final_lr_fraction` at `decay_steps`.
      decay_steps: total optimizer updates of the cosine schedule (warmup included).
      final_lr_fraction: the cosine schedule's end value as a fraction of the peak.
      b1, b2, eps, weight_decay: AdamW's (decoupled weight decay).
      max_grad_norm: clip the global gradient norm to this (optax.clip_by_global_norm).
    """

    learning_rate: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int = 0
    final_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: use one of {SCHEDULES}")
        if self.schedule == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"optim.decay_steps={self.decay_steps} must exceed warmup_steps="
                f"{self.warmup_steps} for the cosine schedule (total optimizer updates)"
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"optim.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}"
            )
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"optim.b1/b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("optim.eps must be > 0 and optim.weight_decay >= 0")
        if self.max_grad_norm <= 0:
            raise ValueError(
                f"optim.max_grad_norm must be > 0, got {self.max_grad_norm} "
                "(use a large value such as 1e9 to turn clipping off)"
            )


def learning_rate_schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then constant or cosine decay."""
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=config.learning_rate,
            warmup_steps=config.warmup_steps,
            decay_steps=config.decay_steps,
            end_value=config.learning_rate * config.final_lr_fraction,
        )
    if config.warmup_steps == 0:
        return optax.constant_schedule(config.learning_rate)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
            optax.constant_schedule(config.learning_rate),
        ],
        boundaries=[config.warmup_steps],
    )


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm, then AdamW on the scheduled learning rate."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(
            learning_rate=learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )
