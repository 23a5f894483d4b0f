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


def test_feedback_block_is_appended_to_the_system_prompt_only():
    block = fg.render_previous_attempts(
        [fg.Attempt(1, 0.3, "Billing also needs last_4_ssn.")],
        mode="all",
        max_tokens=200,
        count_tokens=lambda s: len(s.split()),
    )
    guided = prompts.system_prompt(block)
    assert guided.startswith(prompts.SYSTEM_PROMPT) and guided.endswith(fg.CLOSE_TAG)
    assert prompts.system_prompt("") == prompts.system_prompt("  \n") == prompts.SYSTEM_PROMPT
    messages = prompts.task_messages("Hi, please call Acme for me.", block)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert fg.OPEN_TAG in messages[0]["content"] and fg.OPEN_TAG not in messages[1]["content"]
    assert prompts.system_prompt(block, base="Custom.") == "Custom.\n\n" + block
    with pytest.raises(ValueError, match="empty"):
        prompts.system_prompt(base=" ")


def test_chat_template_renders_the_tools_after_the_prompt():
    tokenizer = toys.tiny_tokenizer()
    conv = ConversationBuilder(tokenizer, tools.TOOL_SCHEMAS)
    ids = conv.start(prompts.system_prompt(), "Hi, please call Acme for me.")
    text = tokenizer.decode(ids)
    assert text.index(prompts.SYSTEM_PROMPT[:40]) < text.index("<tools>")
    for name in tools.TOOL_NAMES:
        assert f'"name": "{name}"' in text
