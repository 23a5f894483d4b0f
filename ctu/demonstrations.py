"""Demonstrations: episodes of a scripted agent as token ids with a loss mask.

The warm start (ctu.sft) imitates the heuristic scripted agent
(ctu.world.agents.Heuristic). Some of its demonstrations read a `<previous_attempts>`
block and act on it: the prompt carries critiques of earlier failed attempts at the
task (the heuristic's own, and the random policy's, whose malformed calls, unknown
companies and missing fields are the failures a weak RL policy makes), and the
heuristic follows what they say (the company, the fields to ask for, add or drop, the
department to reach first).

Episodes are built token-in/token-out with the conversation builder, so the loss mask
is 1 exactly on the agent's turns.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ctu import feedback_guidance as fg
from ctu import prompts
from ctu.text.conversation import ConversationBuilder, assistant_completion
from ctu.world import agents, data, tools
from ctu.world.env import Action, Environment

if TYPE_CHECKING:
    from ctu.sft import WarmStartConfig


@dataclasses.dataclass(frozen=True)
class Demonstration:
    task_id: str
    tokens: tuple[int, ...]
    loss_mask: tuple[int, ...]
    score: float
    with_feedback: bool
    context_start: int  # first token after the system turns: the user's request on
    turn_tools: tuple[str, ...] = ()  # the tool each agent turn calls, in order


def action_message(action: Action, thought: str = "") -> dict:
    """The assistant message that performs `action` in the chat format, after a
    `<think>` block with `thought` when there is one (the tool-call parser drops it)."""
    reasoning = f"<think>{thought}</think>" if thought else ""
    if action.name == tools.RESPOND:
        return {"role": "assistant", "content": reasoning + action.kwargs["content"]}
    call = {"type": "function", "function": {"name": action.name, "arguments": action.kwargs}}
    return {"role": "assistant", "content": reasoning, "tool_calls": [call]}


def record_episode(
    env: Environment,
    policy: agents.Policy,
    task_id: str,
    tokenizer,
    *,
    system: str,
    feedback: str | None = None,
    thoughts: bool = False,
) -> tuple[ConversationBuilder, dict]:
    """Plays one episode with a scripted policy; returns its conversation and final info.

    `feedback` is the `<previous_attempts>` block the policy reads before it starts;
    the model reads it in a system turn of its own after `system`. With `thoughts`,
    each turn opens with the policy's `thought` for it, in a `<think>` block."""
    builder = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    observation = env.reset(task_id)
    policy.reset(task_id, observation, feedback)
    builder.start(system, observation, feedback=feedback)
    while True:
        action = policy.act(observation)
        thought = getattr(policy, "thought", "") if thoughts else ""
        message = action_message(action, thought)
        text = assistant_completion(tokenizer, message, tools.TOOL_SCHEMAS)
        builder.append_assistant(tokenizer.encode(text, add_special_tokens=False))
        step = env.step(action)
        if step.done:
            return builder, step.info
        observation = step.observation
        if action.name == tools.RESPOND:
            builder.append_user(observation)
        else:
            builder.append_tool(observation)


def _demo(task_id, builder, info, with_feedback, actions) -> Demonstration:
    return Demonstration(
        task_id,
        tuple(builder.tokens()),
        tuple(builder.loss_mask()),
        info["score"],
        with_feedback,
        builder.system_end,
        tuple(action.name for action in actions),
    )


def heuristic_demonstrations(
    world: data.World,
    tasks: Sequence[data.Task],
    tokenizer,
    config: WarmStartConfig,
    guidance: fg.FeedbackGuidanceConfig,
    *,
    seed: int = 0,
) -> list[Demonstration]:
    """Heuristic episodes on `tasks`, plus feedback-reading attempts.

    For a `feedback_demo_fraction` of tasks, a second heuristic attempt reads a
    `<previous_attempts>` block with the critiques of 1 to `feedback_demo_attempts`
    earlier failed attempts (the number drawn uniformly): the heuristic's own first
    attempt when it failed, the last, after random-policy attempts
    (`agents.RandomPolicy`), so a block looks like what RL's guided rollouts read.
    The heuristic acts on what they say (`agents.FeedbackHints`); its attempt is kept
    only when it scores higher than every earlier one. Episodes longer than `max_len`
    tokens are left out.
    """
    rng = random.Random(seed)

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def play(env, policy, task_id, feedback=None):
        return record_episode(
            env,
            policy,
            task_id,
            tokenizer,
            system=prompts.system_prompt(),
            feedback=feedback,
            thoughts=config.thoughts,
        )

    heuristic = agents.Recorder(
        agents.Heuristic(
            cite_feedback=config.feedback_thoughts, call_fields=config.call_fields_thoughts
        )
    )

    demos = []
    for repeat in range(config.demos_per_task):
        env = Environment(world, tasks, seed=seed + repeat)
        for task in tasks:
            builder, info = play(env, heuristic, task.task_id)
            demos.append(_demo(task.task_id, builder, info, False, heuristic.actions))
            if rng.random() >= config.feedback_demo_fraction:
                continue
            wanted = rng.randint(1, config.feedback_demo_attempts)
            earlier = [] if info["score"] >= 1.0 else [info]
            # Random attempts that happen to succeed are skipped; a few tries suffice.
            for trial in range(4 * wanted):
                if len(earlier) == wanted:
                    break
                policy = agents.RandomPolicy(seed=f"{seed}:{repeat}:{trial}")
                _, failed = play(env, policy, task.task_id)
                if failed["score"] < 1.0:
                    earlier.insert(0, failed)
            attempts = [
                fg.Attempt(k + 1, a["score"], a["feedback"], a["failure_type"])
                for k, a in enumerate(earlier)
            ]
            block = fg.render_previous_attempts(
                attempts,
                mode=guidance.accumulation_mode,
                max_tokens=guidance.max_feedback_tokens,
                count_tokens=count_tokens,
            )
            if not block:
                continue
            builder2, info2 = play(env, heuristic, task.task_id, feedback=block)
            if info2["score"] > max(a.score for a in attempts):
                demos.append(_demo(task.task_id, builder2, info2, True, heuristic.actions))
    return [d for d in demos if len(d.tokens) <= config.max_len]
