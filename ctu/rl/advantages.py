"""Group-relative advantage estimators, registered by name.

Rewards come either as `[num_groups, group_size]` (one row per prompt) or flat
`[n]` with integer `group_ids` in [0, num_groups) (groups may then differ in
size and be in any order); the advantages have the shape of the rewards. A
group whose rewards are all equal carries no signal: its advantages are exactly
zero for every estimator (never NaN, whatever the float rounding of its mean).

    "grpo"     A_i = (r_i - mean(r)) / (std(r) + eps)        DeepSeekMath sec. 4.1.2
    "dr_grpo"  A_i = r_i - mean(r)                           Dr. GRPO, arXiv 2503.20783
    "rloo"     A_i = r_i - 1/(n-1) sum_{j != i} r_j          RLOO, Ahmadian et al. 2024

DAPO uses the "grpo" estimator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StdSettings:
    """eps: added to the std; ddof: std divides by n - ddof (0 = population std)."""

    eps: float = 1e-6
    ddof: int = 0

    def __post_init__(self):
        if self.eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {self.eps}.")
        if self.ddof not in (0, 1):
            raise ValueError(f"ddof must be 0 or 1, got {self.ddof}.")


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """This estimator has no settings."""


@dataclasses.dataclass(frozen=True)
class Groups:
    """Group membership of flat rewards; per-element group statistics."""

    ids: Array  # [n] int, in [0, num_groups)
    num_groups: int

    def sum(self, x: Array) -> Array:
        """sum_{j in group(i)} x_j, for every element i."""
        return jax.ops.segment_sum(x, self.ids, num_segments=self.num_groups)[self.ids]

    def count(self) -> Array:
        return self.sum(jnp.ones(self.ids.shape, jnp.float32))

    def mean(self, x: Array) -> Array:
        return self.sum(x) / self.count()

    def all_equal(self, x: Array) -> Array:
        """Whether every element of i's group has the same value as x_i."""
        high = jax.ops.segment_max(x, self.ids, num_segments=self.num_groups)[self.ids]
        low = jax.ops.segment_min(x, self.ids, num_segments=self.num_groups)[self.ids]
        return high == low


Estimator = Callable[[Array, Groups, Any], Array]


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    fn: Estimator
    settings_cls: type


_ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(name: str, settings_cls: type) -> Callable[[Estimator], Estimator]:
    def decorator(fn: Estimator) -> Estimator:
        if name in _ESTIMATORS:
            raise ValueError(f"Advantage estimator {name!r} is already registered.")
        _ESTIMATORS[name] = EstimatorSpec(fn=fn, settings_cls=settings_cls)
        return fn

    return decorator


def available_estimators() -> tuple[str, ...]:
    return tuple(sorted(_ESTIMATORS))


@register_estimator("grpo", StdSettings)
def grpo_advantages(rewards: Array, groups: Groups, settings: StdSettings) -> Array:
    """A_i = (r_i - mean) / (std + eps), std = sqrt(sum_j (r_j - mean)^2 / (n - ddof))."""
    centred = rewards - groups.mean(rewards)
    dof = jnp.maximum(groups.count() - settings.ddof, 1.0)
    return centred / (jnp.sqrt(groups.sum(centred**2) / dof) + settings.eps)


@register_estimator("dr_grpo", NoSettings)
def dr_grpo_advantages(rewards: Array, groups: Groups, settings: NoSettings) -> Array:
    """A_i = r_i - mean (no std normalisation: Dr. GRPO's fix of the difficulty bias)."""
    del settings
    return rewards - groups.mean(rewards)


@register_estimator("rloo", NoSettings)
def rloo_advantages(rewards: Array, groups: Groups, settings: NoSettings) -> Array:
    """A_i = r_i - (sum_j r_j - r_i) / (n - 1) = n / (n - 1) (r_i - mean)."""
    del settings
    return rewards - (groups.sum(rewards) - rewards) / jnp.maximum(groups.count() - 1.0, 1.0)


def make_settings(name: str, **settings):
    """Validated settings of estimator `name`; unknown names or settings raise ValueError."""
    if name not in _ESTIMATORS:
        raise ValueError(
            f"Unknown advantage estimator {name!r}; valid estimators: {available_estimators()}."
        )
    cls = _ESTIMATORS[name].settings_cls
    valid = tuple(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {unknown} for advantage estimator {name!r}; "
            f"valid settings: {valid}."
        )
    return cls(**settings)


def group_advantages(
    name: str,
    rewards: Array,
    *,
    group_ids: Array | None = None,
    num_groups: int | None = None,
    **settings,
) -> Array:
    """Advantages of estimator `name` ("grpo" | "dr_grpo" | "rloo").

    Args:
      rewards: [num_groups, group_size], or flat [n] together with `group_ids`.
      group_ids: [n] int group index of each flat reward.
      num_groups: number of groups for flat rewards; required under jit
        (static), otherwise max(group_ids) + 1 by default.
      **settings: fields of the estimator's settings ("grpo": eps=1e-6, ddof=0).

    Returns:
      Advantages shaped like `rewards`, float32; exactly 0 in all-equal groups.
    """
    config = make_settings(name, **settings)
    rewards = jnp.asarray(rewards, jnp.float32)
    if group_ids is None:
        chex.assert_rank(rewards, 2)
        num_groups, group_size = rewards.shape
        ids = jnp.repeat(jnp.arange(num_groups), group_size)
        flat = rewards.reshape(-1)
    else:
        chex.assert_rank([rewards, group_ids], 1)
        chex.assert_equal_shape([rewards, group_ids])
        chex.assert_type(group_ids, int)
        if num_groups is None:
            if isinstance(group_ids, jax.core.Tracer):
                raise ValueError("Under jit, pass num_groups (static) together with group_ids.")
            num_groups = int(np.max(group_ids)) + 1 if np.size(group_ids) else 0
        elif not isinstance(group_ids, jax.core.Tracer) and np.size(group_ids):
            low, high = int(np.min(group_ids)), int(np.max(group_ids))
            if low < 0 or high >= num_groups:
                raise ValueError(
                    f"group_ids span {low}..{high} but num_groups={num_groups}: each id "
                    "must be in [0, num_groups) (a row outside would take another group's "
                    "statistics)"
                )
        ids, flat = jnp.asarray(group_ids), rewards
    groups = Groups(ids=ids, num_groups=num_groups)
    advantages = _ESTIMATORS[name].fn(flat, groups, config)
    advantages = jnp.where(groups.all_equal(flat), 0.0, advantages)
    return advantages.reshape(rewards.shape)
