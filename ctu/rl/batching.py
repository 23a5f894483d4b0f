"""From groups of finished rollouts to the learner's `RolloutBatch`.

Per rollout: reward (the score or success alone, plus DAPO's overlong penalty on the
tokens it generated), a group-relative advantage (per rollout, or per turn with
`credit="progress"`: ctu.rl.credit), and the token ids it is trained on — the ids it was
sampled with (`augmented`), or for a feedback-guided rollout with
`training_context="original"` the same continuation under the plain prompt,
marked `guided` so the loss knows its behaviour log-probs came from another
context (pi_theta(y|x) / pi_old(y|x + critique)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctu.rl import advantages as advantages_lib
from ctu.rl import credit, shaping
from ctu.rl.train_step import RolloutBatch

# Padded lengths are multiples of this by default (TrainConfig.length_bucket), so the
# train step compiles a few shapes only.
LENGTH_BUCKET = 128


def trained_rewards(group: Sequence, *, reward: str) -> list[float]:
    """The reward the learner maximises for each rollout of `group`: the partial-credit
    score (`reward="score"`), or 1.0 for a completed task and 0.0 otherwise."""
    if reward == "success":
        return [float(r.success) for r in group]
    return [r.reward for r in group]


def shaped_rewards(groups: Sequence[Sequence], *, settings) -> np.ndarray:
    """`[G, n]` trained rewards, with the overlong penalty added when enabled."""
    rewards = np.array([trained_rewards(g, reward=settings.reward) for g in groups], np.float32)
    if settings.overlong:
        lengths = np.array([[r.num_sampled_tokens for r in g] for g in groups], np.float32)
        penalty = shaping.overlong_penalty(
            lengths.reshape(-1),
            max_length=settings.overlong_max_length,
            cache_length=settings.overlong_cache_length,
        )
        rewards = rewards + np.asarray(penalty).reshape(rewards.shape)
    return rewards


def _context(record, original: bool):
    if original and record.guided:
        return record.original_tokens, record.original_loss_mask, record.original_logprobs
    return record.tokens, record.loss_mask, record.logprobs


def _turn_advantages(groups, records, rewards: np.ndarray, settings) -> list[np.ndarray] | None:
    """Per rollout, the advantage of each of its turns, weighted by the kind of turn
    (`settings.turn_weights`); None when every token of a rollout shares one advantage
    (episode credit, every weight 1)."""
    weighted = any(w != 1.0 for w in settings.turn_weights.values())
    if settings.credit != "progress" and not weighted:
        return None
    if settings.credit == "progress":
        per_turn = [
            a
            for group, group_rewards in zip(groups, rewards, strict=True)
            for a in credit.turn_advantages(
                settings.advantage,
                group_rewards,
                [r.turn_scores for r in group],
                lam=settings.credit_lambda,
            )
        ]
    else:
        episode = np.asarray(advantages_lib.group_advantages(settings.advantage, rewards))
        per_turn = [
            np.full(len(r.turn_kinds()), a, np.float32)
            for r, a in zip(records, episode.reshape(-1), strict=True)
        ]
    if weighted:
        weights = settings.turn_weights
        per_turn = [
            a * np.array([weights[k] for k in r.turn_kinds()], np.float32)
            for r, a in zip(records, per_turn, strict=True)
        ]
    return per_turn


def build_batch(
    groups: Sequence[Sequence],
    *,
    settings,
    rows_multiple: int,
    pad_id: int,
    length_multiple: int = LENGTH_BUCKET,
) -> tuple[RolloutBatch, dict[str, float]]:
    """The training batch of `groups` (each a list of rollout records) and its stats.

    `settings` is the run's AlgorithmSettings. Rows are padded with all-masked rows
    to a multiple of `rows_multiple`, lengths to a multiple of `length_multiple`.
    """
    if not groups:
        raise ValueError("build_batch needs at least one group of rollouts")
    rewards = shaped_rewards(groups, settings=settings)
    records = [r for g in groups for r in g]
    per_turn = _turn_advantages(groups, records, rewards, settings)
    original = settings.feedback.enable and settings.feedback.training_context == "original"
    contexts = [_context(r, original) for r in records]
    longest = max(len(tokens) for tokens, _, _ in contexts)
    length = -(-longest // length_multiple) * length_multiple
    rows = -(-len(records) // rows_multiple) * rows_multiple

    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.float32)
    old_logp = np.zeros((rows, length), np.float32)
    guided = np.zeros((rows,), np.float32)
    if per_turn is None:  # per rollout, broadcast over its tokens by the loss
        flat_advantages = np.zeros((rows,), np.float32)
        flat_advantages[: len(records)] = np.asarray(
            advantages_lib.group_advantages(settings.advantage, rewards)
        ).reshape(-1)
    else:  # per token: each turn's own advantage
        flat_advantages = np.zeros((rows, length), np.float32)
    for row, (record, (ids, loss_mask, logp)) in enumerate(zip(records, contexts, strict=True)):
        tokens[row, : len(ids)] = ids
        keep = not (settings.mask_truncated and record.truncated)
        mask[row, : len(ids)] = loss_mask if keep else 0
        if per_turn is not None:
            flat_advantages[row, : len(ids)] = credit.token_advantages(
                per_turn[row], mask[row, : len(ids)]
            )
        old_logp[row, : len(ids)] = logp
        guided[row] = float(original and record.guided)
    batch = RolloutBatch(
        tokens=tokens,
        mask=mask,
        advantages=flat_advantages,
        old_logp=old_logp,
        guided=guided if original else None,
    )
    stats = {
        "reward/shaped_mean": float(rewards.mean()),
        "batch/rows": float(len(records)),
        "batch/padded_rows": float(rows - len(records)),
        "batch/length": float(length),
        "batch/trained_tokens": float(mask.sum()),
    }
    return batch, stats
