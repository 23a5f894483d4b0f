"""The agent's system prompt and a task's opening messages."""

import pytest

from ctu import feedback_guidance as fg
from ctu import prompts
from ctu.text import ConversationBuilder
from ctu.world import tools
from tests import toys


def test_prompt_states_the_procedure_and_the_rules():
    text = prompts.SYSTEM_PROMPT
    for name in tools.TOOL_NAMES:
        assert name in text
    rules = (
        "once",
        "never ask for fields no department",
        "first",
        "final message",
        "not a question",
    )
    for rule in rules:
        assert rule in text
    assert prompts.system_prompt() == text


def test_feedback_block_is_a_second_system_message():
    block = fg.render_previous_attempts(
        [fg.Attempt(1, 0.3, "Billing also needs last_4_ssn.")],
        mode="all",
        max_tokens=200,
        count_tokens=lambda s: len(s.split()),
    )
    opening = "Hi, please call Acme for me."
    messages = prompts.task_messages(opening, block)
    assert [m["role"] for m in messages] == ["system", "system", "user"]
    assert messages[0]["content"] == prompts.SYSTEM_PROMPT
    assert messages[1]["content"] == block and messages[2]["content"] == opening
    for blank in ("", "  \n"):
        assert prompts.task_messages(opening, blank) == [messages[0], messages[2]]
    assert prompts.task_messages(opening, base="Custom.")[0]["content"] == "Custom."
    with pytest.raises(ValueError, match="empty"):
        prompts.system_prompt(base=" ")


def test_critique_turn_comes_after_the_whole_plain_system_turn():
    """Guided and plain prompts share the system turn with the tools, token for token."""
    tokenizer = toys.tiny_tokenizer()
    block = "<previous_attempts>\nAttempt 1 (score 0.3): Billing needs phone.\n</previous_attempts>"
    plain = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    plain_ids = plain.start(prompts.system_prompt(), "Hi.")
    guided = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    guided_ids = guided.start(prompts.system_prompt(), "Hi.", feedback=block)
    assert guided_ids[: plain.system_end] == plain_ids[: plain.system_end]
    assert guided_ids[guided.system_end :] == plain_ids[plain.system_end :]
    critique = tokenizer.decode(guided_ids[plain.system_end : guided.system_end])
    assert critique.strip() == f"<|im_start|>system\n{block}<|im_end|>"
    # The builder and the message list render the same prompt, blank blocks included.
    for feedback in (block, f"\n{block}\n", " \n", ""):
        conv = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
        ids = conv.start(prompts.system_prompt(), "Hi.", feedback=feedback)
        rendered = tokenizer.apply_chat_template(
            prompts.task_messages("Hi.", feedback),
            tools=tools.TOOL_SCHEMAS,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert tokenizer.decode(ids) == rendered
        assert (ids == plain_ids) == (not feedback.strip())


def test_chat_template_renders_the_tools_after_the_prompt():
    tokenizer = toys.tiny_tokenizer()
    conv = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    ids = conv.start(prompts.system_prompt(), "Hi, please call Acme for me.")
    text = tokenizer.decode(ids)
    assert text.index(prompts.SYSTEM_PROMPT[:40]) < text.index("<tools>")
    for name in tools.TOOL_NAMES:
        assert f'"name": "{name}"' in text
