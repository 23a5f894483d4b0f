"""The policy optimizer: AdamW with a warmup schedule and global-norm clipping, over
every parameter or those whose path matches `trainable` (`trainable_filter`)."""

from __future__ import annotations

import dataclasses
import re

import jax
import optax
from flax import nnx

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
      trainable: a regular expression searched in each parameter's dotted path
        (`param_path`: "embed", "layers.0.attn.q_proj", "final_norm.scale"); only the
        parameters it matches get gradients and are updated, clipped and decayed;
        the others stay as they are and have no optimizer state. "" trains every
        parameter.
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
    trainable: str = ""

    def __post_init__(self):
        try:
            re.compile(self.trainable)
        except re.error as error:
            raise ValueError(
                f"optim.trainable={self.trainable!r} is not a regular expression ({error}); "
                "write one that matches parameter paths such as 'layers.0.attn.q_proj'"
            ) from None
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


def param_path(path) -> str:
    """A parameter's dotted path in the model ("layers.0.mlp.up_proj"), from its nnx
    path (a tuple of attribute names and layer indices)."""
    return ".".join(str(part) for part in path)


def trainable_filter(config: OptimConfig):
    """The nnx filter of the parameters to train: every `nnx.Param`, or with
    `config.trainable` those whose `param_path` it matches."""
    if not config.trainable:
        return nnx.Param
    pattern = re.compile(config.trainable)
    return nnx.All(nnx.Param, lambda path, _: bool(pattern.search(param_path(path))))


def check_trainable(config: OptimConfig, model: nnx.Module) -> None:
    """A `config.trainable` that matches none of `model`'s parameters is an error that
    lists the paths there are."""
    if jax.tree.leaves(nnx.state(model, trainable_filter(config))):
        return
    paths = [param_path(p) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]
    raise ValueError(
        f"optim.trainable={config.trainable!r} matches none of the model's parameters, so "
        f"nothing would be trained; its paths: {', '.join(paths[:12])}"
        f"{', ...' if len(paths) > 12 else ''}"
    )


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm, then AdamW on the scheduled learning rate (over the
    parameters `trainable_filter` selects: build the `nnx.Optimizer` with it as `wrt`)."""
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
