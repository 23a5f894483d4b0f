"""A multi-turn conversation as token ids plus a loss mask, built token-in/token-out.

The sampler's ids are kept verbatim: an assistant turn is appended exactly as sampled,
even when decoding and re-encoding it would give other ids, and it is the only thing
that gets loss-mask 1. Everything else (system, user and tool turns and the template's
scaffolding such as `<|im_start|>assistant\\n`) is rendered by the tokenizer's own chat
template, one turn at a time, and gets mask 0. For assistant texts that tokenise
canonically the ids equal `tokenizer.apply_chat_template(messages, tools=...)` of the
whole conversation (tested in tests/test_text_conversation.py).

Loss mask decisions: the end-of-turn token `<|im_end|>` that the policy sampled carries
loss (the policy must learn to stop). If a turn was cut by the length limit, the
builder closes it with an `<|im_end|>` of its own before the next turn, with mask 0.
"""

from collections.abc import Sequence
from typing import Any

from ctu.text import chat_template

# Placeholder turns that put the template in the state "an assistant turn just ended";
# the scaffolding of the next turn is the difference between two renderings.
_CONTEXT = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer: Any, messages: list[dict], tools: Any, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_completion(
    tokenizer: Any,
    message: dict,
    tools: Sequence[dict] | None = None,
    *,
    end_of_turn: str = chat_template.END_OF_TURN,
) -> str:
    """The text a policy emits for an assistant message: what the template renders after
    the generation prompt, up to and including the end-of-turn token."""
    prompt = _render(tokenizer, _CONTEXT[:1], tools, True)
    full = _render(tokenizer, _CONTEXT[:1] + [message], tools, False)
    if not full.startswith(prompt) or end_of_turn not in full[len(prompt) :]:
        raise ValueError(
            "the chat template does not render an assistant turn as generation prompt + "
            f"completion ending in {end_of_turn!r}; ctu needs that to train on sampled ids."
        )
    completion = full[len(prompt) :]
    return completion[: completion.rindex(end_of_turn) + len(end_of_turn)]


def agent_spans(loss_mask: Sequence[int]) -> list[tuple[int, int]]:
    """`[start, end)` of each run of loss-mask 1: one per assistant turn."""
    spans, start = [], None
    for i, bit in enumerate((*loss_mask, 0)):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


class ConversationBuilder:
    """Token ids and loss mask of one episode.

    >>> conv = ConversationBuilder(tokenizer, tools)
    >>> prompt_ids = conv.start(system_prompt, user_request)   # feed to the sampler
    >>> # (start(..., feedback=block) adds a <previous_attempts> system turn)
    >>> conv.append_assistant(sampled_ids)                     # mask 1, ids verbatim
    >>> next_ids = conv.append_tool(result_text)               # feed, then sample again
    >>> conv.tokens(), conv.loss_mask()

    Turns must alternate: start, then assistant, then tool result(s) or a user message,
    then assistant, ... `append_tools` takes all results of one assistant turn (the
    template groups them into one turn).
    """

    def __init__(
        self,
        tokenizer: Any,
        tools: Sequence[dict] | None = None,
        *,
        end_of_turn: str = chat_template.END_OF_TURN,
    ):
        self._tokenizer = tokenizer
        self._tools = list(tools) if tools else None
        end_ids = _encode(tokenizer, end_of_turn)
        if len(end_ids) != 1:
            raise ValueError(
                f"end-of-turn {end_of_turn!r} is not one token in this tokenizer ({end_ids}); "
                "use a tokenizer built by ctu.text.build_tokenizer or a Qwen chat tokenizer."
            )
        self._end_of_turn = end_of_turn
        self._end_of_turn_id = end_ids[0]
        self._system: list[dict] = []
        self._context_prefix = ""
        self._system_end = 0
        self._ids: list[int] = []
        self._mask: list[int] = []
        self._expect = "start"

    @property
    def end_of_turn_id(self) -> int:
        return self._end_of_turn_id

    def _check_turn(self, expected: str, what: str) -> None:
        if self._expect != expected:
            raise ValueError(
                f"cannot {what} now: the conversation expects {self._expect!r} next "
                "(order: start, assistant, tool results or user, assistant, ...)."
            )

    def _extend(self, ids: Sequence[int], mask_value: int) -> None:
        self._ids.extend(ids)
        self._mask.extend([mask_value] * len(ids))

    def start(self, system: str | None, user: str, *, feedback: str | None = None) -> list[int]:
        """The prompt ids: system turn (with the tools), the `feedback` text (a
        `<previous_attempts>` block) as a second system turn when given, the user's
        message and the generation prompt. Mask 0."""
        self._check_turn("start", "start")
        feedback = feedback if feedback and feedback.strip() else None
        if feedback and not system:
            raise ValueError("a feedback turn needs a system prompt before it.")
        self._system = [{"role": "system", "content": system}] if system else []
        if feedback:
            self._system.append({"role": "system", "content": feedback})
        messages = self._system + [{"role": "user", "content": user}]
        ids = _encode(self._tokenizer, _render(self._tokenizer, messages, self._tools, True))
        context = _render(self._tokenizer, self._system + _CONTEXT, self._tools, False)
        if self._end_of_turn not in context:
            raise ValueError(f"the chat template never renders {self._end_of_turn!r}.")
        self._context_prefix = context[: context.rindex(self._end_of_turn) + len(self._end_of_turn)]
        # The template gives the tool schemas a system turn even without a system prompt.
        system_turns = max(len(self._system), 1 if self._tools else 0)
        ends = [i for i, t in enumerate(ids) if t == self._end_of_turn_id]
        self._system_end = ends[system_turns - 1] + 1 if system_turns else 0
        self._extend(ids, 0)
        self._expect = "assistant"
        return ids

    @property
    def system_end(self) -> int:
        """Where the system turns end: the index just past their last end-of-turn token
        (0 without a system turn). The user's opening message starts after it."""
        return self._system_end

    def append_assistant(self, sampled_ids: Sequence[int]) -> None:
        """The policy's sampled ids, verbatim (including the `<|im_end|>` it sampled). Mask 1."""
        self._check_turn("assistant", "append an assistant turn")
        self._extend([int(i) for i in sampled_ids], 1)
        self._expect = "environment"

    def append_tools(self, results: Sequence[str]) -> list[int]:
        """All tool results of the last assistant turn, in call order, plus the next
        generation prompt. Returns the ids appended (mask 0)."""
        if not results:
            raise ValueError("append_tools needs at least one tool result.")
        return self._append_environment([{"role": "tool", "content": r} for r in results])

    def append_tool(self, result: str) -> list[int]:
        """One tool result plus the next generation prompt; see `append_tools`."""
        return self.append_tools([result])

    def append_user(self, text: str) -> list[int]:
        """A user message plus the next generation prompt. Returns the ids appended."""
        return self._append_environment([{"role": "user", "content": text}])

    def _append_environment(self, messages: list[dict]) -> list[int]:
        self._check_turn("environment", "append a tool result or user message")
        full = _render(self._tokenizer, self._system + _CONTEXT + messages, self._tools, True)
        if not full.startswith(self._context_prefix):
            raise ValueError(
                "the chat template re-renders earlier turns when a turn is added, so turns "
                "cannot be appended token-in/token-out; use a prefix-stable template."
            )
        ids = _encode(self._tokenizer, full[len(self._context_prefix) :])
        if not self._ids or self._ids[-1] != self._end_of_turn_id:
            ids = [self._end_of_turn_id] + ids  # the turn hit the length limit: close it
        self._extend(ids, 0)
        self._expect = "assistant"
        return ids

    def tokens(self) -> list[int]:
        return list(self._ids)

    def loss_mask(self) -> list[int]:
        return list(self._mask)

    def __len__(self) -> int:
        return len(self._ids)
