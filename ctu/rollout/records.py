"""What the runner takes (EpisodeSpec, RunnerSettings) and returns (RolloutRecord, RunStats).

Per-token arrays follow the RL contract (docs/architecture.md): aligned with `tokens`,
the value at `t` is about token `t`; `loss_mask` is 1 exactly on the ids the policy
sampled (its `<|im_end|>` included) and `logprobs[t]` is the behaviour log-prob of
sampled token `t` (0 where the mask is 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctu.world import env as world_env
from ctu.world import tools

# What an assistant turn can have done (RolloutRecord.turn_kinds).
TURN_KINDS = (*tools.TOOL_NAMES, tools.RESPOND, "malformed", "cut")

# `ended_by` of an episode stopped by the runner's token limit (the env's own values
# are "user", "hang_up" and "turn_limit").
TOKEN_LIMIT = "token_limit"


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    """How the runner plays episodes.

    Attributes:
      max_total_tokens: longest episode, in tokens (prompt, every turn and every tool
        output). An episode that would exceed it stops, is scored on what it did and is
        marked truncated. The sampler's per-turn limit is `SamplingConfig.max_new_tokens`.
      max_turns: agent actions per episode (the environment's turn limit); every tool
        call, message to the user and malformed call is one action.
    """

    max_total_tokens: int = 4096
    max_turns: int = world_env.DEFAULT_MAX_TURNS

    def __post_init__(self):
        if self.max_total_tokens < 16:
            raise ValueError(
                f"max_total_tokens={self.max_total_tokens}: too small to hold a prompt and a "
                "turn; use the longest episode in tokens, e.g. 4096."
            )
        if self.max_turns < 1:
            raise ValueError(f"max_turns={self.max_turns}: must be >= 1.")


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """One episode to play.

    Attributes:
      task_id: the world task.
      system_prompt: the agent's instructions (the first system turn).
      group, rollout: the group's index in the batch and the 1-based position in it.
      env_seed: the environment's seed (the user simulator's wording and choices).
      feedback_block: the `<previous_attempts>` block, sampled with as a second system
        turn ("" if none). A feedback-guided record also holds the same continuation
        under the plain prompt (`original_tokens`).
    """

    task_id: str
    system_prompt: str
    group: int = 0
    rollout: int = 1
    env_seed: int = 0
    feedback_block: str = ""

    def __post_init__(self):
        if self.rollout < 1:
            raise ValueError(f"rollout={self.rollout}: rollouts are numbered from 1.")
        if self.feedback_block and not self.feedback_block.strip():
            raise ValueError('feedback_block is blank; pass "" for a prompt without one.')


@dataclasses.dataclass(frozen=True)
class RolloutRecord:
    """One finished episode: token ids exactly as fed and sampled, and its outcome.

    `tokens[:prompt_length]` is the prompt (system turn with the tools, the user's
    opening message, the generation prompt); the rest alternates sampled assistant
    turns (mask 1) and environment turns (tool results or the user's reply, mask 0).
    `original_*` is the same continuation under the plain system prompt (identical ids
    and mask after `original_prompt_length`); for a rollout without feedback they are
    the same arrays as `tokens`, `loss_mask`, `logprobs`.
    """

    task_id: str
    group: int
    rollout: int
    tokens: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    prompt_length: int
    original_tokens: np.ndarray
    original_loss_mask: np.ndarray
    original_logprobs: np.ndarray
    original_prompt_length: int
    feedback_block: str  # "" when the prompt carried no critique
    reward: float
    partial_scores: dict
    feedback: str
    failure_type: str
    ended_by: str  # "user" | "hang_up" | "turn_limit" | "token_limit"
    truncated: bool  # stopped by max_total_tokens
    num_turns: int  # assistant turns sampled
    num_tool_calls: int  # valid tool calls executed
    num_parse_failures: int  # assistant turns whose tool call could not be parsed or validated
    steps: tuple  # the environment's trajectory (ctu.world.tools.Step), for logs
    generation_s: float  # wall time of the generate calls this episode took part in
    env_s: float  # time in this episode's environment steps and scoring
    # Per assistant turn: the score of the episode as it stood when the turn began (its
    # steps so far, without a final report; 0.0 for the first), and the number of
    # environment steps taken before it.
    turn_scores: tuple = ()
    turn_steps: tuple = ()

    @property
    def guided(self) -> bool:
        """Whether the prompt carried a `<previous_attempts>` block."""
        return bool(self.feedback_block)

    @property
    def success(self) -> bool:
        return self.reward >= 1.0 - 1e-6

    @property
    def num_sampled_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def turn_kinds(self) -> tuple[str, ...]:
        """What each assistant turn did: the tool its first call named, "respond" (a
        message to the user), "malformed" (no usable call) or "cut" (stopped by the
        token limit before it was executed)."""
        known = (*tools.TOOL_NAMES, tools.RESPOND)
        ends = (*self.turn_steps[1:], len(self.steps))
        kinds = []
        for start, end in zip(self.turn_steps, ends, strict=True):
            if start >= end:
                kinds.append("cut")
            else:
                name = self.steps[start].name
                kinds.append(name if name in known else "malformed")
        return tuple(kinds)


@dataclasses.dataclass(frozen=True)
class RunStats:
    episodes: int
    generate_calls: int
    sampled_tokens: int
    generation_s: float
    env_s: float
    wall_s: float
    feedback_s: float = 0.0  # the feedback enhancer's rewrites of failed episodes' critiques
