"""Evaluate a model with the rollout runner: cold start, or one failure then a retry.

The same runner that produces training rollouts plays evaluation episodes, so the
numbers measure exactly the policy the learner trains (prompt, chat template, parser,
limits). Results are `ctu.world.evaluation.EpisodeResult`s and the metrics dict is
`ctu.world.evaluation.summarize`'s, so they compare with the scripted policies'.

Trial `t` runs every task with environment seed `seed + t` (as `evaluation.run_episodes`
does) and the sampler key `fold_in(rng, t)`.

Modes (SPEC, Evaluation):
- "cold": one episode per task and trial, plain system prompt.
- "feedback": the cold episode; every task that failed gets a retry whose prompt
  carries the critique of that failure (`<previous_attempts>`, last-attempt mode). The
  with-feedback outcome of a task is the retry's when there was one, else the first's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from ctu import prompts
from ctu.feedback_guidance import Attempt, render_previous_attempts
from ctu.rollout.engine import RolloutEngine
from ctu.rollout.records import EpisodeSpec, RolloutRecord, RunnerSettings
from ctu.rollout.runner import run_episodes
from ctu.world import data, evaluation

MODES = ("cold", "feedback")
# Token budget of the critique block in a feedback-mode retry (the training default).
DEFAULT_MAX_FEEDBACK_TOKENS = 500


def episode_result(
    record: RolloutRecord, world: data.World, trial: int
) -> evaluation.EpisodeResult:
    """A model episode as an EpisodeResult, behaviour fields included."""
    task = world.tasks[record.task_id]
    return evaluation.EpisodeResult(
        task_id=record.task_id,
        level=task.level,
        held_out_company=task.held_out_company,
        trial=trial,
        score=record.reward,
        failure_type=record.failure_type,
        num_actions=len(record.steps),
        ended_by=record.ended_by,
        feedback=record.feedback,
        **evaluation.behaviour_fields(world, task, record.steps, record.partial_scores),
    )


def run_model_episodes(
    engine: RolloutEngine,
    world: data.World,
    tasks: Sequence[data.Task],
    *,
    tokenizer: Any,
    rng: jax.Array,
    mode: str = "cold",
    trials: int = 1,
    seed: int = 0,
    batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
    runner: RunnerSettings | None = None,
    base_prompt: str = prompts.SYSTEM_PROMPT,
    max_feedback_tokens: int = DEFAULT_MAX_FEEDBACK_TOKENS,
    feedback_enhancer=None,
) -> dict[str, list]:
    """Plays every (trial, task) episode. Returns {"first_try": [EpisodeResult], and in
    feedback mode "with_feedback": [EpisodeResult], "retries": [RolloutRecord]}, plus
    "records": the first-try RolloutRecords; lists in (trial, task) order. In feedback
    mode `feedback_enhancer` (`LLMFeedback`) rewrites the critiques the retries read."""
    if mode not in MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {MODES}")
    if trials < 1 or batch_size < 1:
        raise ValueError(f"trials and batch_size must be >= 1, got {trials}, {batch_size}")

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    out = {"first_try": [], "records": []}
    if mode == "feedback":
        out.update(with_feedback=[], retries=[])
    for trial in range(trials):
        key = jax.random.fold_in(rng, trial)
        specs = [
            EpisodeSpec(
                task.task_id,
                prompts.system_prompt(base=base_prompt),
                group=i,
                env_seed=seed + trial,
            )
            for i, task in enumerate(tasks)
        ]
        rewrite = feedback_enhancer if mode == "feedback" else None
        first = _run_batched(engine, specs, world, tokenizer, key, runner, batch_size, 0, rewrite)
        out["records"] += first
        out["first_try"] += [episode_result(r, world, trial) for r in first]
        if mode == "cold":
            continue
        retry_specs = []
        for record in first:
            if record.success:
                continue
            attempt = Attempt(1, record.reward, record.feedback, record.failure_type)
            block = render_previous_attempts(
                [attempt], mode="last", max_tokens=max_feedback_tokens, count_tokens=count_tokens
            )
            retry_specs.append(
                EpisodeSpec(
                    record.task_id,
                    prompts.system_prompt(base=base_prompt),
                    group=record.group,
                    rollout=2,
                    env_seed=seed + trial,
                    feedback_block=block,
                )
            )
        retries = _run_batched(engine, retry_specs, world, tokenizer, key, runner, batch_size, 1)
        out["retries"] += retries
        by_group = {r.group: r for r in retries}
        out["with_feedback"] += [
            episode_result(by_group.get(r.group, r), world, trial) for r in first
        ]
    return out


def _run_batched(engine, specs, world, tokenizer, key, runner, batch_size, salt, enhancer=None):
    records = []
    for start in range(0, len(specs), batch_size):
        chunk, _ = run_episodes(
            engine,
            specs[start : start + batch_size],
            world=world,
            tokenizer=tokenizer,
            rng=jax.random.fold_in(key, 2 * start + salt),
            settings=runner,
            feedback_enhancer=enhancer,
        )
        records += chunk
    return records


def behaviour_metrics(records: Sequence[RolloutRecord]) -> dict:
    """Parse-failure rate (per assistant turn), truncation rate, mean turns and tokens."""
    turns = sum(r.num_turns for r in records)
    n = max(len(records), 1)
    return {
        "parse_failure_rate": sum(r.num_parse_failures for r in records) / max(turns, 1),
        "truncated_rate": sum(r.truncated for r in records) / n,
        "mean_turns": turns / n,
        "mean_sampled_tokens": sum(r.num_sampled_tokens for r in records) / n,
    }


def evaluate_model(
    engine: RolloutEngine,
    world: data.World,
    split: str,
    *,
    tokenizer: Any,
    rng: jax.Array,
    mode: str = "cold",
    trials: int = 1,
    seed: int = 0,
    batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
    runner: RunnerSettings | None = None,
    base_prompt: str = prompts.SYSTEM_PROMPT,
    max_feedback_tokens: int = DEFAULT_MAX_FEEDBACK_TOKENS,
    tasks: Sequence[data.Task] | None = None,
) -> dict:
    """The metrics dict of a model on a split (or on `tasks`), as `evaluation.evaluate`
    reports a scripted policy; in feedback mode the top level is the with-feedback
    outcome and "first_try" holds the cold one."""
    tasks = list(tasks) if tasks is not None else evaluation.split_tasks(world, split)
    results = run_model_episodes(
        engine,
        world,
        tasks,
        tokenizer=tokenizer,
        rng=rng,
        mode=mode,
        trials=trials,
        seed=seed,
        batch_size=batch_size,
        runner=runner,
        base_prompt=base_prompt,
        max_feedback_tokens=max_feedback_tokens,
    )
    first = evaluation.summarize(results["first_try"], trials)
    first.update(behaviour_metrics(results["records"]))
    if mode == "cold":
        metrics = first
    else:
        metrics = evaluation.summarize(results["with_feedback"], trials)
        metrics["first_try"] = first
        metrics["retries"] = len(results["retries"])
        metrics["retry_success_rate"] = (
            sum(r.success for r in results["retries"]) / len(results["retries"])
            if results["retries"]
            else None
        )
    metrics["per_level_success"] = {
        level: m["success_rate"] for level, m in metrics["by_level"].items()
    }
    metrics.update(mode=mode, split=split, seed=seed)
    return metrics
