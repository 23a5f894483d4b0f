"""Multi-turn episodes for many tasks at once, in one engine session.

Every row of the batch is one episode: a `ConversationBuilder` (ids and loss mask,
token-in/token-out), an `Environment`, and for feedback-guided rows a second builder
under the plain system prompt. Each round, the engine samples one assistant turn for
every running row, continuing from its cache with only the new ids; then each row's
turn is decoded and parsed with `parse_tool_calls(text, TOOL_SCHEMAS)`:

- valid tool calls run in the environment in order; their results go back as one tool
  turn (`append_tools`);
- no call: the text is a message to the user (`respond`); the user's reply goes back as
  a user turn;
- a call that could not be parsed or validated counts as a parse failure. The
  environment records it as a malformed call (an action named `MALFORMED_ACTION`,
  which it answers as an unknown tool: the reward then applies the malformed-call
  penalty and failure type), and the model is shown the parser's error in a tool turn.
  Valid calls of the same turn still run first.

A row stops when the environment ends the episode (the user ends the conversation or
hangs up, or the turn limit), or when its next turn would not fit in
`max_total_tokens`: then it is scored on what it did (`compute_score_with_feedback`
on the environment's episode) and marked truncated. Finished rows sit out later rounds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ctu.rollout.engine import RolloutEngine
from ctu.rollout.records import (
    TOKEN_LIMIT,
    EpisodeSpec,
    RolloutRecord,
    RunnerSettings,
    RunStats,
)
from ctu.sampling import LENGTH
from ctu.text import ConversationBuilder, parse_tool_calls
from ctu.world import data, reward, tools
from ctu.world.env import Action, Environment

# Name of the action that records a malformed call in the environment; no tool has it,
# so the environment logs an `Invalid` step (the reward's malformed-call penalty).
MALFORMED_ACTION = "malformed_tool_call"
CALL_FORMAT_HINT = (
    'Write each call as <tool_call>\n{"name": <tool name>, "arguments": {...}}\n</tool_call> '
    "with one of: " + ", ".join(tools.TOOL_NAMES) + "; or write plain text to answer the user."
)


def malformed_observation(error: str) -> str:
    """What the model is told about a tool call that could not be used."""
    return f"Error: your tool call could not be used: {error}. {CALL_FORMAT_HINT}"


@dataclasses.dataclass
class _Row:
    """Mutable state of one running episode."""

    spec: EpisodeSpec
    env: Environment
    conv: ConversationBuilder
    original: ConversationBuilder | None
    logprobs: list
    prompt_length: int
    original_prompt_length: int
    num_turns: int = 0
    num_tool_calls: int = 0
    num_parse_failures: int = 0
    generation_s: float = 0.0
    env_s: float = 0.0
    feedback_s: float = 0.0
    kept_length: int | None = None  # tokens kept when the episode stopped at the limit
    turn_starts: list = dataclasses.field(default_factory=list)  # env steps before each turn


def run_episodes(
    engine: RolloutEngine,
    specs: Sequence[EpisodeSpec],
    *,
    world: data.World,
    tokenizer: Any,
    rng: jax.Array,
    settings: RunnerSettings | None = None,
    feedback_enhancer=None,
) -> tuple[list[RolloutRecord], RunStats]:
    """Plays every episode of `specs` to its end in one engine session.

    Args:
      engine: samples token ids (JaxEngine, VllmEngine, ...); its `SamplingConfig` must
        stop on the chat template's end-of-turn token.
      specs: one per episode (row of the batch).
      world: the world the tasks come from.
      tokenizer: the policy's tokenizer (Hugging Face, with the chat template).
      rng: PRNG key; round `i` samples with `fold_in(rng, i)`.
      settings: token and turn limits (default `RunnerSettings()`).
      feedback_enhancer: optional `ctu.world.feedback.LLMFeedback` that rewrites the
        critique of failed episodes.

    Returns:
      (records in the order of `specs`, RunStats).
    """
    settings = settings or RunnerSettings()
    if not specs:
        return [], RunStats(0, 0, 0, 0.0, 0.0, 0.0)
    start = time.perf_counter()
    rows = [_start_row(spec, world, tokenizer, settings) for spec in specs]
    end_of_turn = rows[0].conv.end_of_turn_id
    if end_of_turn not in engine.sampling.stop_token_ids:
        raise ValueError(
            f"the engine's SamplingConfig.stop_token_ids {engine.sampling.stop_token_ids} lack "
            f"the end-of-turn id {end_of_turn}: every turn would run to max_new_tokens; add "
            "tokenizer.convert_tokens_to_ids('<|im_end|>') to stop_token_ids."
        )
    session = engine.session(len(rows), settings.max_total_tokens - 1)
    records: list[RolloutRecord | None] = [None] * len(rows)
    appends: list[list[int] | None] = []
    for i, row in enumerate(rows):
        prompt = row.conv.tokens()
        if len(prompt) >= settings.max_total_tokens:  # not even one token fits
            row.kept_length = len(prompt)
            records[i] = _finish_truncated(row, world, feedback_enhancer)
            appends.append(None)
        else:
            appends.append(prompt)

    calls = sampled = 0
    generation_s = 0.0
    while any(a is not None for a in appends):
        t0 = time.perf_counter()
        out = session.generate(appends, jax.random.fold_in(rng, calls))
        dt = time.perf_counter() - t0
        calls += 1
        generation_s += dt
        next_appends: list[list[int] | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if appends[i] is None:
                continue
            row.generation_s += dt
            ids = out.row_tokens(i)
            sampled += len(ids)
            result = _take_turn(
                row,
                ids,
                out.row_logprobs(i),
                out.stop_reasons[i],
                tokenizer,
                settings,
            )
            if isinstance(result, dict):
                records[i] = _finish(row, world, result, feedback_enhancer)
            elif result is None:
                records[i] = _finish_truncated(row, world, feedback_enhancer)
            else:
                next_appends[i] = result
        appends = next_appends

    stats = RunStats(
        episodes=len(rows),
        generate_calls=calls,
        sampled_tokens=sampled,
        generation_s=generation_s,
        env_s=sum(r.env_s for r in rows),
        wall_s=time.perf_counter() - start,
        feedback_s=sum(r.feedback_s for r in rows),
    )
    return list(records), stats


def _start_row(
    spec: EpisodeSpec, world: data.World, tokenizer: Any, settings: RunnerSettings
) -> _Row:
    t0 = time.perf_counter()
    env = Environment(world, max_turns=settings.max_turns, seed=spec.env_seed)
    opening = env.reset(spec.task_id)
    env_s = time.perf_counter() - t0
    conv = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    prompt = conv.start(spec.system_prompt, opening, feedback=spec.feedback_block or None)
    original = None
    original_length = len(prompt)
    if spec.feedback_block:
        original = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
        original_length = len(original.start(spec.system_prompt, opening))
    return _Row(
        spec=spec,
        env=env,
        conv=conv,
        original=original,
        logprobs=[0.0] * len(prompt),
        prompt_length=len(prompt),
        original_prompt_length=original_length,
        env_s=env_s,
    )


def _take_turn(row: _Row, ids, logprobs, stop_reason, tokenizer, settings: RunnerSettings):
    """Applies one sampled turn. Returns the ids to append next (list), the environment's
    final info (dict) when the episode ended, or None when it hit the token limit."""
    limit = settings.max_total_tokens
    if not ids:  # the append did not fit (the runner checks first, so only by accident)
        row.kept_length = len(row.conv)
        return None
    row.num_turns += 1
    row.turn_starts.append(len(row.env.episode.steps))
    for conv in filter(None, (row.conv, row.original)):
        conv.append_assistant(ids)
    row.logprobs.extend(float(x) for x in logprobs)
    if stop_reason == LENGTH and len(row.conv) >= limit:
        row.kept_length = len(row.conv)  # cut mid-turn by the limit: nothing to execute
        return None

    t0 = time.perf_counter()
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    parsed = parse_tool_calls(text, tools.TOOL_SCHEMAS)
    observations: list[str] = []
    step = None
    if parsed.calls or parsed.error:
        for call in parsed.calls:
            step = row.env.step(Action(call.name, call.arguments))
            row.num_tool_calls += 1
            observations.append(step.observation)
            if step.done:
                break
        if parsed.error is not None and not (step and step.done):
            row.num_parse_failures += 1
            step = row.env.step(Action(MALFORMED_ACTION, {}))
            observations.append(
                step.observation if step.done else malformed_observation(parsed.error)
            )
        kind = "tools"
    else:
        step = row.env.step(Action(tools.RESPOND, {"content": parsed.content}))
        observations.append(step.observation)
        kind = "user"
    row.env_s += time.perf_counter() - t0
    if step.done:
        return step.info

    kept = len(row.conv)
    new_ids = _append_environment(row.conv, kind, observations)
    if row.original is not None:
        _append_environment(row.original, kind, observations)
    row.logprobs.extend([0.0] * len(new_ids))
    if len(row.conv) >= limit:  # no room left to sample even one token
        row.kept_length = kept
        return None
    return new_ids


def _append_environment(conv: ConversationBuilder, kind: str, observations: list[str]):
    if kind == "tools":
        return conv.append_tools(observations)
    return conv.append_user(observations[0])


def _finish(row: _Row, world: data.World, info: dict, enhancer) -> RolloutRecord:
    score = reward.ScoreResult(
        score=float(info["score"]),
        prediction=info["prediction"],
        feedback=info["feedback"],
        partial_scores=info["partial_scores"],
        failure_type=info["failure_type"],
    )
    if enhancer is not None and score.score < 1.0:
        t0 = time.perf_counter()
        score = reward.compute_score_with_feedback(
            row.env.episode.task, world, row.env.episode, enhancer=enhancer
        )
        row.feedback_s += time.perf_counter() - t0
    return _record(row, score, ended_by=info["ended_by"], truncated=False)


def _finish_truncated(row: _Row, world: data.World, enhancer) -> RolloutRecord:
    t0 = time.perf_counter()
    score = reward.compute_score_with_feedback(
        row.env.episode.task, world, row.env.episode, enhancer=enhancer
    )
    elapsed = time.perf_counter() - t0
    if enhancer is None:
        row.env_s += elapsed
    else:  # scoring takes microseconds (tests/test_world_reward.py); the rewrite, the rest
        row.feedback_s += elapsed
    return _record(row, score, ended_by=TOKEN_LIMIT, truncated=True)


def _record(row: _Row, score, *, ended_by: str, truncated: bool) -> RolloutRecord:
    n = len(row.conv) if row.kept_length is None else row.kept_length
    tokens = np.asarray(row.conv.tokens()[:n], np.int32)
    mask = np.asarray(row.conv.loss_mask()[:n], np.int32)
    logprobs = np.asarray(row.logprobs[:n], np.float32)
    if row.original is None:
        original = (tokens, mask, logprobs)
    else:
        original = _original_variant(row, tokens, mask, logprobs)
    return RolloutRecord(
        task_id=row.spec.task_id,
        group=row.spec.group,
        rollout=row.spec.rollout,
        tokens=tokens,
        loss_mask=mask,
        logprobs=logprobs,
        prompt_length=row.prompt_length,
        original_tokens=original[0],
        original_loss_mask=original[1],
        original_logprobs=original[2],
        original_prompt_length=row.original_prompt_length,
        feedback_block=row.spec.feedback_block,
        reward=float(score.score),
        partial_scores=dict(score.partial_scores),
        feedback=score.feedback,
        failure_type=score.failure_type,
        ended_by=ended_by,
        truncated=truncated,
        num_turns=row.num_turns,
        num_tool_calls=row.num_tool_calls,
        num_parse_failures=row.num_parse_failures,
        steps=tuple(row.env.episode.steps),
        turn_scores=_turn_scores(row),
        turn_steps=tuple(row.turn_starts),
        generation_s=row.generation_s,
        env_s=row.env_s,
    )


def _turn_scores(row: _Row) -> tuple[float, ...]:
    """The score of the episode as it stood when each assistant turn began (its steps so
    far, no final report): the progress a turn starts from, for per-turn credit."""
    episode = row.env.episode
    return tuple(
        reward.compute_score_with_feedback(
            episode.task,
            episode.world,
            dataclasses.replace(episode, steps=episode.steps[:n], final_message=None),
        ).score
        for n in row.turn_starts
    )


def _original_variant(row: _Row, tokens, mask, logprobs):
    """The continuation under the plain prompt, from the second builder, checked to be the
    same ids and mask as the sampled one (it is for any prefix-stable chat template)."""
    p, q = row.prompt_length, row.original_prompt_length
    n = q + len(tokens) - p
    ids = np.asarray(row.original.tokens()[:n], np.int32)
    original_mask = np.asarray(row.original.loss_mask()[:n], np.int32)
    if not (np.array_equal(ids[q:], tokens[p:]) and np.array_equal(original_mask[q:], mask[p:])):
        raise RuntimeError(
            "the continuation differs under the plain system prompt: the chat template "
            "renders later turns differently depending on the system turn, so the "
            "original-context variant cannot reuse the sampled ids."
        )
    original_logprobs = np.concatenate([np.zeros(q, np.float32), logprobs[p:]])
    return ids, original_mask, original_logprobs
