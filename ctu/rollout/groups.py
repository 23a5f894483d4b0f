"""Groups of n rollouts per task, feedback-guided, generated in waves across all groups.

Feedback-guided DAPO (SPEC): from rollout `start_rollout` on, a group's prompt
carries a `<previous_attempts>` block with the critiques of the group's earlier failed
rollouts. Rollouts that depend on earlier ones cannot be sampled in the same batch as
them, so a round of groups is generated in waves, each wave one `run_episodes` call
over every group at once (the batch stays as wide as the number of groups allows):

- wave 1: rollouts 1..start_rollout-1 of every group (no feedback can exist yet), plus
  all n rollouts of the groups that get no feedback (`mix` < 1);
- later waves: rollouts start_rollout..n of the feedback groups, `wave_size` at a time;
  every rollout of a wave sees the critiques of the failed rollouts of all earlier waves
  of its group (rendered by `ctu.feedback_guidance.render_previous_attempts`), never
  those of its own wave.

`wave_size` trades fidelity for speed. `wave_size=1` is the strict sequential
definition: rollout k sees every failure among rollouts 1..k-1, but a round costs
1 + (n - start_rollout + 1) waves of G rows each. A larger wave keeps the batch wider
(G * wave_size rows) and needs fewer waves (fewer rounds of weight-stationary
sampling, better accelerator use), at the price that rollouts in the same wave share
the same critiques and cannot learn from each other. `wave_size >= n` gives two waves.

A rollout whose group has no failure yet (every earlier attempt succeeded) gets the
plain prompt. Baseline (feedback disabled) is one wave of all n rollouts of all groups.
The user simulator never sees the block: it lives only in the system turn, which the
environment never receives.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ctu import prompts
from ctu.feedback_guidance import Attempt, FeedbackGuidanceConfig, render_previous_attempts
from ctu.rollout.engine import RolloutEngine
from ctu.rollout.records import EpisodeSpec, RolloutRecord, RunnerSettings, RunStats
from ctu.rollout.runner import run_episodes
from ctu.world import data


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    """How a round of groups is generated.

    Attributes:
      num_rollouts: n, rollouts per task.
      wave_size: feedback-guided rollouts per group per wave after the first wave.
      seed: chooses the feedback groups (`mix`) and seeds the environments.
    """

    num_rollouts: int = 8
    wave_size: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.num_rollouts < 1:
            raise ValueError(f"num_rollouts={self.num_rollouts}: must be >= 1.")
        if self.wave_size < 1:
            raise ValueError(
                f"wave_size={self.wave_size}: must be >= 1 (1 = strictly sequential feedback)."
            )


@dataclasses.dataclass(frozen=True)
class WaveStats:
    rollouts: tuple[int, ...]  # rollout positions sampled in this wave (any group)
    rows: int
    guided_rows: int  # rows whose prompt carried a critique
    seconds: float
    run: RunStats
    render_s: float = 0.0  # building this wave's <previous_attempts> blocks

    @property
    def feedback_s(self) -> float:
        """Time on feedback: the blocks, and the enhancer's rewrites of critiques."""
        return self.render_s + self.run.feedback_s


@dataclasses.dataclass(frozen=True)
class GroupsResult:
    """`groups[g]` are task g's records in rollout order 1..n."""

    groups: list[list[RolloutRecord]]
    feedback_groups: frozenset[int]  # groups that were eligible for feedback (mix)
    waves: tuple[WaveStats, ...]

    @property
    def records(self) -> list[RolloutRecord]:
        return [r for group in self.groups for r in group]

    def stats(self) -> dict:
        """Flat numbers for metric writers."""
        return {
            "waves": len(self.waves),
            "rows_per_wave": [w.rows for w in self.waves],
            "guided_rows_per_wave": [w.guided_rows for w in self.waves],
            "seconds_per_wave": [round(w.seconds, 4) for w in self.waves],
            "feedback_seconds_per_wave": [round(w.feedback_s, 4) for w in self.waves],
            "feedback_groups": len(self.feedback_groups),
        }


def choose_feedback_groups(num_groups: int, mix: float, seed: int) -> frozenset[int]:
    """round(mix * num_groups) groups, chosen by a seeded permutation."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix={mix}: a fraction in [0, 1].")
    count = math.floor(mix * num_groups + 0.5)
    order = np.random.default_rng(seed).permutation(num_groups)
    return frozenset(int(g) for g in order[:count])


def plan_waves(num_rollouts: int, start_rollout: int, wave_size: int) -> list[list[int]]:
    """Rollout positions (1-based) per wave for a feedback group."""
    first = list(range(1, min(start_rollout, num_rollouts + 1)))
    rest = list(range(max(start_rollout, 1), num_rollouts + 1))
    waves = [first] if first else []
    waves += [rest[i : i + wave_size] for i in range(0, len(rest), wave_size)]
    return waves


def run_groups(
    engine: RolloutEngine,
    tasks: Sequence[str | data.Task],
    *,
    world: data.World,
    tokenizer: Any,
    rng: jax.Array,
    settings: GroupSettings | None = None,
    feedback: FeedbackGuidanceConfig | None = None,
    runner: RunnerSettings | None = None,
    base_prompt: str = prompts.SYSTEM_PROMPT,
    feedback_enhancer=None,
) -> GroupsResult:
    """n rollouts for every task (one group per entry of `tasks`), in waves.

    Args:
      engine: the rollout engine.
      tasks: task ids (or tasks), one group each; a task may appear twice.
      world, tokenizer: the world and the policy's tokenizer.
      rng: PRNG key; wave w samples with `fold_in(rng, w)`.
      settings: n, wave size, seed.
      feedback: `algorithm.feedback_guidance`; `enable=False` (the default) is the
        baseline.
      runner: token and turn limits (default `RunnerSettings()`).
      base_prompt: the plain system prompt.
      feedback_enhancer: optional LLM feedback enhancer for failed rollouts'
        critiques (`feedback.use_llm_enhancement`).
    """
    settings = settings or GroupSettings()
    feedback = feedback or FeedbackGuidanceConfig(enable=False)
    task_ids = [t if isinstance(t, str) else t.task_id for t in tasks]
    n = settings.num_rollouts
    guided = (
        choose_feedback_groups(len(task_ids), feedback.mix, settings.seed)
        if feedback.enable
        else frozenset()
    )
    feedback_plan = plan_waves(n, feedback.start_rollout, settings.wave_size)
    plans = {
        g: feedback_plan if g in guided else [list(range(1, n + 1))] for g in range(len(task_ids))
    }
    num_waves = max((len(p) for p in plans.values()), default=0)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    done: dict[int, list[RolloutRecord]] = {g: [] for g in range(len(task_ids))}
    waves = []
    for w in range(num_waves):
        t0 = time.perf_counter()
        render_s = 0.0
        specs = []
        for g, task_id in enumerate(task_ids):
            if w >= len(plans[g]):
                continue
            block = ""
            if g in guided:
                render_start = time.perf_counter()
                attempts = [
                    Attempt(r.rollout, r.reward, r.feedback, r.failure_type) for r in done[g]
                ]
                block = render_previous_attempts(
                    attempts,
                    mode=feedback.accumulation_mode,
                    max_tokens=feedback.max_feedback_tokens,
                    count_tokens=count_tokens,
                )
                render_s += time.perf_counter() - render_start
            for k in plans[g][w]:
                specs.append(
                    EpisodeSpec(
                        task_id=task_id,
                        system_prompt=prompts.system_prompt(base=base_prompt),
                        group=g,
                        rollout=k,
                        env_seed=settings.seed,
                        feedback_block=block,
                    )
                )
        records, run_stats = run_episodes(
            engine,
            specs,
            world=world,
            tokenizer=tokenizer,
            rng=jax.random.fold_in(rng, w),
            settings=runner,
            feedback_enhancer=feedback_enhancer,
        )
        for record in records:
            done[record.group].append(record)
        waves.append(
            WaveStats(
                rollouts=tuple(sorted({s.rollout for s in specs})),
                rows=len(specs),
                guided_rows=sum(bool(s.feedback_block) for s in specs),
                seconds=time.perf_counter() - t0,
                run=run_stats,
                render_s=render_s,
            )
        )
    groups = [sorted(done[g], key=lambda r: r.rollout) for g in range(len(task_ids))]
    return GroupsResult(groups=groups, feedback_groups=guided, waves=tuple(waves))
