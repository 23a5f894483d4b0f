"""Per-turn credit: each turn of a multi-turn episode judged by the return still to come.

An episode's reward R is the partial-credit score of its final state (plus DAPO's
overlong penalty). Phi_k, the score of the episode as it stood when turn k began
(`RolloutRecord.turn_scores`), depends only on what happened before turn k, so
subtracting it from R is a baseline for every token of turn k and the policy
gradient's expectation does not change (Williams, 1992). What does change is the
noise: a turn no longer carries the outcome of the turns before it, e.g. the final
report after a completed call sees 1.0 - 0.9 rather than 1.0.

    x[i, k] = R_i - Phi[i, k]   the return still to come when turn k of rollout i
                                began; 0 after rollout i has ended (nothing is to come)
                                (with `lam` < 1, later turns' gains are discounted by
                                lam per turn, as GAE(lam) with Phi as the value)
    A[i, k] = x[i, k] - b_k     b_k from the group's x[:, k], as the episode estimator:
        "grpo"     b_k = mean_j x[j, k], and A is divided by std(R) + eps, the group's
                   reward spread, as GRPO divides an episode's advantage
        "dr_grpo"  b_k = mean_j x[j, k]
        "rloo"     b_k = mean_{j != i} x[j, k] (no rollout in its own baseline: unbiased)

With Phi = 0 and rollouts of equal length this is the episode estimator exactly. With
"rloo" the expected update is exactly the gradient of the expected reward; "dr_grpo" is
(n - 1) / n of it (each rollout is 1/n of its own baseline). Under "grpo" a group whose
rewards are all equal gets zeros (no spread to divide by); under the others its turns
may still differ in what they gained (DAPO's dynamic sampling drops such groups).
These statements assume a group's rollouts are independent draws, as without feedback.
A feedback-guided rollout reads critiques of earlier rollouts of its group, so it is not
independent of the others in its baseline; there they hold only approximately (the same
holds for the episode estimators, `ctu.rl.advantages`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctu.rl import advantages as advantages_lib

CREDITS = ("episode", "progress")


def to_come(reward: float, scores: Sequence[float], lam: float = 1.0) -> np.ndarray:
    """Per turn, the return still to come when it began: sum_l lam^l delta_{k+l}, where
    delta_k = Phi_{k+1} - Phi_k is what turn k gained (the last turn's next Phi is the
    reward). lam = 1 gives reward - Phi_k."""
    phi = np.append(np.asarray(scores, np.float64), reward)
    gains = np.diff(phi)
    out = np.zeros(len(gains))
    running = 0.0
    for k in range(len(gains) - 1, -1, -1):
        running = gains[k] + lam * running
        out[k] = running
    return out


def turn_advantages(
    estimator: str,
    rewards: Sequence[float],
    turn_scores: Sequence[Sequence[float]],
    lam: float = 1.0,
) -> list[np.ndarray]:
    """Advantages of each turn of each rollout in one group.

    Args:
      estimator: "grpo" | "dr_grpo" | "rloo".
      rewards: [n] the rollouts' trained rewards.
      turn_scores: per rollout, the score when each of its turns began.
      lam: how much of what later turns gain a turn is credited with (`to_come`); below
        1 a turn is judged more by what it gained itself: less noise, but the update
        no longer follows the reward's gradient exactly.

    Returns:
      Per rollout, a float32 array with one advantage per turn.
    """
    rewards = np.asarray(rewards, np.float64)
    if len(rewards) != len(turn_scores):
        raise ValueError(f"{len(rewards)} rewards for {len(turn_scores)} rollouts")
    if len(rewards) < 2:
        raise ValueError("a group needs at least 2 rollouts to compare turns")
    turns = max(len(t) for t in turn_scores)
    if turns == 0:  # every rollout stopped before its first turn
        return [np.zeros(0, np.float32) for _ in turn_scores]
    x = np.zeros((turns, len(rewards)))  # a row per turn index, a column per rollout
    for i, scores in enumerate(turn_scores):
        x[: len(scores), i] = to_come(rewards[i], scores, lam)
    scale = 1.0
    if estimator == "grpo":
        if np.all(rewards == rewards[0]):  # no spread to divide by: no signal, as GRPO
            return [np.zeros(len(t), np.float32) for t in turn_scores]
        spread = np.sqrt(np.mean((rewards - rewards.mean()) ** 2))
        scale = 1.0 / (spread + advantages_lib.StdSettings().eps)
        estimator = "dr_grpo"
    centred = np.asarray(advantages_lib.group_advantages(estimator, x), np.float64)
    return [(centred[: len(t), i] * scale).astype(np.float32) for i, t in enumerate(turn_scores)]


def turn_spans(loss_mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) spans of the sampled turns: the runs of a loss mask's ones."""
    edges = np.diff(np.concatenate([[0], (np.asarray(loss_mask) > 0).astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def token_advantages(per_turn: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """`[T]` advantages: each sampled turn's tokens carry its turn's advantage; 0 off the
    mask. A mask with no sampled tokens (e.g. a masked truncated rollout) gives zeros."""
    out = np.zeros(len(loss_mask), np.float32)
    spans = turn_spans(loss_mask)
    if not spans:
        return out
    if len(spans) != len(per_turn):
        raise ValueError(
            f"the loss mask has {len(spans)} sampled turns but the rollout records "
            f"{len(per_turn)} turn scores; per-turn credit needs records from "
            "ctu.rollout.runner, which scores every turn (or set algorithm.credit=episode)"
        )
    for (start, end), advantage in zip(spans, per_turn, strict=True):
        out[start:end] = advantage
    return out
