"""The `<previous_attempts>` block of feedback-guided DAPO.

From rollout index `start_rollout` on, a group's prompt carries the critiques of
the group's earlier failed rollouts. The block is a system turn of its own after the
instructions and tool schemas (ctu.prompts.task_messages), which the policy reads
and the user simulator never sees, and it is never trained on (system turns carry
no loss).

Lengths are counted in tokens with the caller's tokenizer; when the block would
exceed `max_feedback_tokens` the oldest attempts are dropped first, and a single
critique that is too long on its own is cut at a token boundary.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence

from ctu.world.feedback import LLMFeedback

ACCUMULATION_MODES = ("all", "last", "summary")
TRAINING_CONTEXTS = ("augmented", "original")

FEEDBACK_CACHE_DIR = "feedback_cache"  # a run's (or evaluation's) LLM critique rewrites
OPEN_TAG = "<previous_attempts>"
CLOSE_TAG = "</previous_attempts>"
_INTRO = "Earlier attempts at this task failed. Learn from their feedback:"


@dataclasses.dataclass(frozen=True)
class FeedbackGuidanceConfig:
    """`algorithm.feedback_guidance` of a config, validated."""

    enable: bool = True
    start_rollout: int = 2
    accumulation_mode: str = "all"
    max_feedback_tokens: int = 500
    use_llm_enhancement: bool = False
    mix: float = 1.0
    training_context: str = "augmented"
    shaping_gamma: float = 0.0
    # The OpenAI-compatible endpoint that rewrites failed rollouts' critiques when
    # `use_llm_enhancement` (ctu.world.feedback.LLMFeedback): its base URL (".../v1"),
    # the model it serves, the environment variable holding its API key ("" for none:
    # a key never sits in a config file), and the seconds one request may take.
    llm_base_url: str = ""
    llm_model: str = ""
    llm_api_key_env: str = ""
    llm_timeout_s: float = 30.0

    def __post_init__(self):
        if self.start_rollout < 1:
            raise ValueError(
                f"feedback_guidance.start_rollout={self.start_rollout}: rollouts are numbered "
                "from 1 and rollout 1 has no earlier attempt; use a value >= 2."
            )
        if self.accumulation_mode not in ACCUMULATION_MODES:
            raise ValueError(
                f"feedback_guidance.accumulation_mode={self.accumulation_mode!r}: "
                f"choose one of {ACCUMULATION_MODES}."
            )
        if self.max_feedback_tokens < 16:
            raise ValueError(
                f"feedback_guidance.max_feedback_tokens={self.max_feedback_tokens}: too small "
                "to hold even one critique; use at least 16."
            )
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"feedback_guidance.mix={self.mix}: a fraction in [0, 1].")
        if self.training_context not in TRAINING_CONTEXTS:
            raise ValueError(
                f"feedback_guidance.training_context={self.training_context!r}: "
                f"choose one of {TRAINING_CONTEXTS}."
            )
        if self.shaping_gamma < 0:
            raise ValueError(f"feedback_guidance.shaping_gamma={self.shaping_gamma}: must be >= 0.")
        if self.use_llm_enhancement:
            self._check_llm()

    def _check_llm(self):
        prefix = "feedback_guidance.use_llm_enhancement=True"
        if not self.llm_base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"{prefix} needs the endpoint: set feedback_guidance.llm_base_url to an "
                f"OpenAI-compatible base URL such as http://localhost:8000/v1 (got "
                f"{self.llm_base_url!r}), or turn the enhancement off."
            )
        if not self.llm_model:
            raise ValueError(
                f"{prefix} needs feedback_guidance.llm_model, the model name the endpoint "
                "serves (what its /v1/models lists)."
            )
        if self.llm_api_key_env and not os.environ.get(self.llm_api_key_env):
            raise ValueError(
                f"feedback_guidance.llm_api_key_env={self.llm_api_key_env!r} names an "
                f"environment variable that is not set: export {self.llm_api_key_env}=KEY, or "
                "set llm_api_key_env='' for an endpoint without a key."
            )
        if not self.llm_timeout_s > 0:
            raise ValueError(
                f"feedback_guidance.llm_timeout_s={self.llm_timeout_s}: seconds, must be > 0."
            )

    def make_enhancer(self, cache_dir: str):
        """The critique rewriter of a feedback-guided run (`ctu.world.feedback.LLMFeedback`,
        caching its replies in `cache_dir`), or None when guidance or the rewriting is off."""
        if not (self.enable and self.use_llm_enhancement):
            return None
        return LLMFeedback(
            self.llm_base_url,
            self.llm_model,
            cache_dir=cache_dir,
            api_key=os.environ[self.llm_api_key_env] if self.llm_api_key_env else None,
            timeout_s=self.llm_timeout_s,
        )


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One finished rollout of a group, as later rollouts see it."""

    index: int  # 1-based position in the group
    score: float
    feedback: str
    failure_type: str = ""


def failed_attempts(attempts: Sequence[Attempt]) -> list[Attempt]:
    """Attempts that did not fully succeed, in order."""
    return [a for a in attempts if a.score < 1.0]


def _attempt_text(attempt: Attempt) -> str:
    return f"Attempt {attempt.index} (score {attempt.score:.2f}): {attempt.feedback.strip()}"


def _summary_lines(attempts: Sequence[Attempt]) -> list[str]:
    """One line per distinct critique, most frequent first, with its count."""
    counts = collections.Counter(a.feedback.strip() for a in attempts)
    best = max(a.score for a in attempts)
    lines = [f"{len(attempts)} earlier attempts failed (best score {best:.2f})."]
    for feedback, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"- ({n}x) {feedback}")
    return lines


def _truncate_to_tokens(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of whole words of `text` that fits in `max_tokens`."""
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:  # binary search on the number of words kept
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid]) + " ...") <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]) + " ..." if lo < len(words) else text


def render_previous_attempts(
    attempts: Sequence[Attempt],
    *,
    mode: str,
    max_tokens: int,
    count_tokens: Callable[[str], int],
) -> str:
    """The `<previous_attempts>` block for `attempts`.

    Returns "" when no attempt failed or when `max_tokens` cannot hold the
    tags and any part of a critique.

    Args:
      attempts: the group's finished earlier rollouts, in order.
      mode: "all" (every failed attempt), "last" (the most recent failure) or
        "summary" (distinct critiques with their counts).
      max_tokens: budget for the whole block, tags included.
      count_tokens: the policy tokenizer's length function.
    """
    if mode not in ACCUMULATION_MODES:
        raise ValueError(f"accumulation mode {mode!r}: choose one of {ACCUMULATION_MODES}.")
    failed = failed_attempts(attempts)
    if not failed:
        return ""
    if mode == "last":
        lines = [_attempt_text(failed[-1])]
    elif mode == "summary":
        lines = _summary_lines(failed)
    else:
        lines = [_attempt_text(a) for a in failed]

    intro = [_INTRO]

    def block(body: Sequence[str]) -> str:
        return "\n".join([OPEN_TAG, *intro, *body, CLOSE_TAG])

    # Drop the oldest attempts (for "summary", the rarest critiques, which sort last,
    # keeping its header and one critique) until the block fits; then, if the last line
    # left is too long alone, cut it.
    keep = 2 if mode == "summary" else 1
    while len(lines) > keep and count_tokens(block(lines)) > max_tokens:
        lines = lines[:-1] if mode == "summary" else lines[1:]
    if count_tokens(block(lines)) > max_tokens and count_tokens(block([""])) > max_tokens // 2:
        intro = []  # a tight budget is better spent on the critique than on the preamble
    if count_tokens(block(lines)) > max_tokens:
        # The room a line has depends on how its tokens join the newline before it: cut
        # to the room measured with an empty line, then by whatever the cut overshoots.
        room = max_tokens - count_tokens(block([*lines[:-1], ""]))
        while room >= 1:
            cut = _truncate_to_tokens(lines[-1], room, count_tokens)
            over = count_tokens(block([*lines[:-1], cut])) - max_tokens
            if over <= 0:
                # The line's label ("Attempt 2 (score 0.30):", "- (3x)") and at least
                # one word of the critique, or nothing.
                label_words = 2 if mode == "summary" else 4
                if len(cut.split(" ")) <= label_words + 1:  # "..." is the last word
                    break
                return block([*lines[:-1], cut])
            room -= over
        return ""  # the tags and any part of a critique do not fit together
    return block(lines)
