"""DAPO dynamic sampling (arXiv 2503.14476, sec. 3.2 and Algorithm 1), as a small driver.

A group (the n rollouts of one prompt) whose rewards are all equal has zero
group-relative advantage and so no policy gradient. Dynamic sampling drops such
groups and keeps sampling until the batch holds `target_groups` groups with
signal, within `max_rounds` calls to the sampler:

    round 1:  sample ceil(target_groups * oversample) groups
    round k:  sample ceil((target_groups - kept) * oversample) groups
    stop when kept >= target_groups or after max_rounds rounds

Groups kept beyond `target_groups` are discarded (they were sampled under the
current policy and would be stale next step; carrying them over would be hidden
state). If the bound is hit with fewer groups, a warning is logged and
`on_shortfall` decides:
  * "return" (default): return the groups with signal only, possibly fewer
    than `target_groups`. The token-mean loss then averages over exactly the
    groups that carry gradient; a trainer with static shapes pads with rows
    whose loss mask is all zero, which every ctu loss ignores.
  * "pad": fill up with dropped (all-equal) groups, most recent first. Their
    advantages are zero, so they add no policy gradient, but they do count in a
    token-mean's denominator and so scale the step down.

The driver is pure Python: the trainer passes `sample_groups(n) -> list[Group]`
(its rollout engine) and, if its groups do not have a `.rewards` attribute, a
`rewards_of(group)` accessor.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from absl import logging

Group = TypeVar("Group")

SHORTFALL_POLICIES = ("return", "pad")


@dataclasses.dataclass(frozen=True)
class DynamicSamplingSettings:
    """target_groups: groups with signal wanted per batch; max_rounds: sampler
    calls at most; oversample (>= 1): factor on the number of groups requested
    per round; on_shortfall: "return" or "pad" (module docstring)."""

    target_groups: int
    max_rounds: int = 3
    oversample: float = 1.0
    on_shortfall: str = "return"

    def __post_init__(self):
        if self.target_groups < 1:
            raise ValueError(f"target_groups must be >= 1, got {self.target_groups}.")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}.")
        if self.oversample < 1.0:
            raise ValueError(f"oversample must be >= 1.0, got {self.oversample}.")
        if self.on_shortfall not in SHORTFALL_POLICIES:
            raise ValueError(
                f"on_shortfall must be one of {SHORTFALL_POLICIES}, got {self.on_shortfall!r}."
            )


def has_signal(rewards: Sequence[float]) -> bool:
    """True if the group's rewards are not all equal (a group of one never is)."""
    rewards = np.asarray(rewards, np.float64)
    return rewards.size > 1 and bool(np.any(rewards != rewards.flat[0]))


def dynamic_sample(
    sample_groups: Callable[[int], Sequence[Group]],
    *,
    target_groups: int,
    max_rounds: int = 3,
    oversample: float = 1.0,
    on_shortfall: str = "return",
    rewards_of: Callable[[Group], Sequence[float]] = operator.attrgetter("rewards"),
) -> tuple[list[Group], dict[str, float]]:
    """Samples groups until `target_groups` have non-constant rewards (bounded rounds).

    Returns:
      (groups, stats): the kept groups in sampling order (then padding, with
      "pad") and the stats `dynamic_sampling/{generated, kept, dropped, rounds,
      surplus, shortfall, padded}` and `frac_reward_zero_std` (dropped /
      generated over all rounds).
    """
    settings = DynamicSamplingSettings(
        target_groups=target_groups,
        max_rounds=max_rounds,
        oversample=oversample,
        on_shortfall=on_shortfall,
    )
    kept: list[Group] = []
    dropped: list[Group] = []
    rounds = 0
    while len(kept) < settings.target_groups and rounds < settings.max_rounds:
        request = math.ceil((settings.target_groups - len(kept)) * settings.oversample)
        rounds += 1
        for group in sample_groups(request):
            (kept if has_signal(rewards_of(group)) else dropped).append(group)

    generated = len(kept) + len(dropped)
    surplus = max(0, len(kept) - settings.target_groups)
    kept = kept[: settings.target_groups]
    shortfall = settings.target_groups - len(kept)
    padding = dropped[::-1][:shortfall] if settings.on_shortfall == "pad" else []
    if shortfall:
        logging.warning(
            "Dynamic sampling: %d of %d groups with signal after %d rounds (%d generated, "
            "%d with equal rewards); %s.",
            len(kept),
            settings.target_groups,
            rounds,
            generated,
            len(dropped),
            f"padding with {len(padding)} dropped groups" if padding else "returning fewer",
        )
    stats = {
        "dynamic_sampling/generated": float(generated),
        "dynamic_sampling/kept": float(len(kept)),
        "dynamic_sampling/dropped": float(len(dropped)),
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/surplus": float(surplus),
        "dynamic_sampling/shortfall": float(shortfall),
        "dynamic_sampling/padded": float(len(padding)),
        "frac_reward_zero_std": len(dropped) / generated if generated else 0.0,
    }
    return kept + padding, stats
