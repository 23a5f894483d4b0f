"""Tests for ctu.text.conversation: token-in/token-out ids and the loss mask."""

import hypothesis
import pytest
from hypothesis import strategies as st

from ctu import text
from tests import toys

TOOLS = toys.text_tool_schemas()
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tiny_tokenizer()


def _template_ids(tokenizer, messages, generation_prompt):
    encoded = tokenizer.apply_chat_template(
        messages, tools=TOOLS, tokenize=True, add_generation_prompt=generation_prompt
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _sample(tokenizer, message):
    """The ids a sampler would produce for an assistant message, canonically tokenised."""
    completion = text.assistant_completion(tokenizer, message, TOOLS)
    return tokenizer.encode(completion, add_special_tokens=False)


def _build(tokenizer, messages):
    """Replays `messages` through a ConversationBuilder; returns it and the assistant ids."""
    conv = text.ConversationBuilder(tokenizer, TOOLS)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    conv.start(system, rest[0]["content"])
    sampled, i = [], 1
    while i < len(rest):
        message = rest[i]
        if message["role"] == "assistant":
            sampled.append(_sample(tokenizer, message))
            conv.append_assistant(sampled[-1])
            i += 1
        elif message["role"] == "tool":
            j = i
            while j < len(rest) and rest[j]["role"] == "tool":
                j += 1
            conv.append_tools([m["content"] for m in rest[i:j]])
            i = j
        else:
            conv.append_user(message["content"])
            i += 1
    return conv, sampled


# Assistant text that starts with a non-space character tokenises the same on its own as
# after `<|im_start|>assistant\n` (the pre-tokeniser splits after the newline).
_any_text = st.text(max_size=30)
_content = st.one_of(
    st.just(""),
    st.builds(
        str.__add__,
        st.characters(categories=["L", "N", "P", "S"]),
        st.text(max_size=30),
    ),
)
_arguments = st.dictionaries(
    st.text(min_size=1, max_size=8), st.text(max_size=12) | st.integers(), max_size=2
)
_tool_call = st.builds(
    lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}},
    st.sampled_from(TOOL_NAMES),
    _arguments,
)


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_any_text)})
    messages.append({"role": "user", "content": draw(_any_text)})
    for _ in range(draw(st.integers(1, 3))):
        calls = draw(st.lists(_tool_call, max_size=2))
        message = {"role": "assistant", "content": draw(_content)}
        if calls:
            message["tool_calls"] = calls
        messages.append(message)
        if calls:
            messages += [{"role": "tool", "content": draw(_any_text)} for _ in calls]
        else:
            messages.append({"role": "user", "content": draw(_any_text)})
    return messages


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(messages=conversations())
def test_incremental_ids_equal_the_chat_template(tokenizer, messages):
    conv, sampled = _build(tokenizer, messages)
    assert conv.tokens() == _template_ids(tokenizer, messages, generation_prompt=True)

    # The mask is 1 exactly on the sampled ids, in order.
    mask = conv.loss_mask()
    assert len(mask) == len(conv.tokens())
    policy_ids = [t for t, m in zip(conv.tokens(), mask, strict=True) if m]
    assert policy_ids == [t for ids in sampled for t in ids]
    assert mask[0] == 0 and mask[-1] == 0


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(messages=conversations())
def test_episode_ending_on_an_assistant_turn(tokenizer, messages):
    """Without the final environment turn the ids are the template's, minus the newline
    after the last `<|im_end|>` (scaffolding the policy never sampled)."""
    while messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    conv, _ = _build(tokenizer, messages)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert conv.tokens() + newline == _template_ids(tokenizer, messages, generation_prompt=False)
    assert conv.tokens()[-1] == conv.end_of_turn_id and conv.loss_mask()[-1] == 1


def test_returned_ids_are_what_was_appended(tokenizer):
    conv = text.ConversationBuilder(tokenizer, TOOLS)
    prompt = conv.start("system prompt", "I need Acme Bank.")
    assert conv.tokens() == prompt and set(conv.loss_mask()) == {0}
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    conv.append_assistant([5, 6, conv.end_of_turn_id])
    tool_ids = conv.append_tool("Billing: 555-0100")
    assert conv.tokens()[-len(tool_ids) :] == tool_ids
    assert tokenizer.decode(tool_ids) == (
        "\n<|im_start|>user\n<tool_response>\nBilling: 555-0100\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    user_ids = (conv.append_assistant([conv.end_of_turn_id]), conv.append_user("thanks"))[1]
    assert tokenizer.decode(user_ids) == (
        "\n<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(conv) == len(prompt) + 3 + len(tool_ids) + 1 + len(user_ids)


def test_sampled_ids_are_kept_verbatim_even_when_not_canonical(tokenizer):
    """A sampler may emit a valid but non-canonical split of a text; training must see
    the ids it sampled, not a re-tokenisation."""
    reply = "I found the department."
    canonical = tokenizer.encode(reply, add_special_tokens=False)
    byte_by_byte = [tokenizer.convert_tokens_to_ids(c) for c in reply.replace(" ", "Ġ")]
    assert byte_by_byte != canonical and tokenizer.decode(byte_by_byte) == reply
    sampled = byte_by_byte + [tokenizer.convert_tokens_to_ids(text.END_OF_TURN)]

    conv = text.ConversationBuilder(tokenizer, TOOLS)
    prompt = conv.start(None, "hello")
    conv.append_assistant(sampled)
    after = conv.append_user("ok")
    assert conv.tokens() == prompt + sampled + after
    assert conv.loss_mask() == [0] * len(prompt) + [1] * len(sampled) + [0] * len(after)


def test_a_turn_cut_by_the_length_limit_is_closed_without_loss(tokenizer):
    conv = text.ConversationBuilder(tokenizer, TOOLS)
    prompt = conv.start(None, "hello")
    truncated = tokenizer.encode('<tool_call>\n{"name": "sea', add_special_tokens=False)
    conv.append_assistant(truncated)
    appended = conv.append_tool("error: could not parse the tool call")
    assert appended[0] == conv.end_of_turn_id
    assert conv.tokens() == prompt + truncated + appended
    assert conv.loss_mask() == [0] * len(prompt) + [1] * len(truncated) + [0] * len(appended)


def test_turn_order_is_enforced(tokenizer):
    conv = text.ConversationBuilder(tokenizer, TOOLS)
    with pytest.raises(ValueError, match="expects 'start'"):
        conv.append_assistant([1])
    conv.start(None, "hi")
    with pytest.raises(ValueError, match="expects 'assistant'"):
        conv.append_tool("x")
    with pytest.raises(ValueError, match="expects 'assistant'"):
        conv.start(None, "again")
    conv.append_assistant([conv.end_of_turn_id])
    with pytest.raises(ValueError, match="at least one tool result"):
        conv.append_tools([])


def test_rejects_a_tokenizer_without_a_single_end_of_turn_token(tokenizer):
    with pytest.raises(ValueError, match="not one token"):
        text.ConversationBuilder(tokenizer, TOOLS, end_of_turn="<|not_a_token|>")


@hypothesis.given(st.lists(st.integers(0, 1), max_size=40))
def test_agent_spans_are_the_maximal_runs_of_the_mask(mask):
    from ctu.text.conversation import agent_spans

    spans = agent_spans(mask)
    rebuilt = [0] * len(mask)
    for start, end in spans:
        assert 0 <= start < end <= len(mask)
        rebuilt[start:end] = [1] * (end - start)
    assert rebuilt == mask
    # Maximal: a zero (or an edge) on each side, so no two spans touch.
    assert all(a_end < b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    assert all(start == 0 or mask[start - 1] == 0 for start, _ in spans)
