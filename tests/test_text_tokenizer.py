"""Tests for ctu.text.tokenizer and the chat template."""

import json
import os
import re
import subprocess
import sys

import hypothesis
import pytest
from hypothesis import strategies as st

from ctu import text
from tests import toys

TOOLS = toys.text_tool_schemas()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tiny_tokenizer()


def test_special_tokens_are_single_tokens_with_fixed_ids(tokenizer):
    for token_id, token in enumerate(text.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(f"ab{token}cd", add_special_tokens=False).count(token_id) == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    # Control tokens are dropped by skip_special_tokens; tool/think markup is kept for parsing.
    ids = tokenizer.encode("<|im_start|>x<tool_call>y</tool_call><|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<tool_call>y</tool_call>"


def test_vocabulary_is_learned_and_bounded(tokenizer):
    assert 256 + len(text.SPECIAL_TOKENS) < len(tokenizer) <= 1024
    # Learned merges: a world word costs fewer tokens than its bytes.
    assert len(tokenizer.encode("department", add_special_tokens=False)) < len("department")


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(sample=st.text(max_size=80))
def test_byte_level_round_trip(tokenizer, sample):
    ids = tokenizer.encode(sample, add_special_tokens=False)
    assert tokenizer.decode(ids) == sample


def test_build_is_deterministic(tmp_path):
    texts = toys.text_training_texts()
    built = text.build_tokenizer(texts, str(tmp_path / "a"), vocab_size=600)
    assert len(built) == 600  # enough text to fill the vocabulary exactly
    text.build_tokenizer(texts, str(tmp_path / "b"), vocab_size=600)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == text.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_bad_arguments_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        text.build_tokenizer(["a"], str(tmp_path), vocab_size=100)
    with pytest.raises(ValueError, match="at least one training text"):
        text.build_tokenizer([], str(tmp_path), vocab_size=1000)
    with pytest.raises(FileNotFoundError, match="make_tokenizer"):
        text.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="make_data"):
        text.world_texts(str(tmp_path))


def _write_tiny_world(path):
    company = {
        "company_id": "C000",
        "name": "Zorblax Mutual",
        "industry": "insurance",
        "aliases": ["Zorblax"],
        "departments": [
            {
                "department_id": "C000-billing",
                "type": "billing",
                "name": "Billing",
                "phone_number": "555-0101",
                "description": "Premium payments and refunds.",
                "handles": ["refund"],
                "auth_fields": ["name", "account_number"],
                "alternate_auth_fields": [],
                "prerequisites": [],
            }
        ],
    }
    profile = {"user_id": "U0000", "name": "Quillon Parr", "address": "1 Elm St", "phone": None}
    task = {"task_id": "T0", "user_request": "I want a refund from Zorblax for my premium."}
    path.mkdir()
    (path / "companies.json").write_text(json.dumps([company]))
    (path / "user_profiles.json").write_text(json.dumps([profile]))
    (path / "train_tasks.jsonl").write_text(json.dumps(task) + "\n")


def test_world_texts_collects_the_world(tmp_path):
    _write_tiny_world(tmp_path / "world")
    texts = text.world_texts(str(tmp_path / "world"), tools=TOOLS)
    for expected in (
        "Zorblax Mutual",
        "Premium payments and refunds.",
        "555-0101",
        "Quillon Parr",
        "I want a refund from Zorblax for my premium.",
        json.dumps(TOOLS[0]),
    ):
        assert expected in texts
    assert "" not in texts and text.world_texts(str(tmp_path / "world"), tools=TOOLS) == texts


def test_make_tokenizer_entry_point(tmp_path):
    """The CLI works, and a build in another process (parallel training, other hash seeds)
    is byte-identical to one made here."""
    tools_module = pytest.importorskip("ctu.world.tools")
    world = tmp_path / "world"
    _write_tiny_world(world)
    out = tmp_path / "tok"
    subprocess.run(
        [sys.executable, "-m", "launch.make_tokenizer", f"--data={world}", f"--out={out}"]
        + ["--vocab_size=400", "--episodes=0"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true"},
    )
    loaded = text.load_tokenizer(str(out))
    assert loaded.chat_template == text.CHAT_TEMPLATE
    assert loaded.convert_tokens_to_ids("<tool_call>") == 3
    here = tmp_path / "here"
    text.make_world_tokenizer(str(world), str(here), 400, tools=tools_module.TOOL_SCHEMAS)
    assert (here / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_episode_texts_hold_tool_outputs():
    pytest.importorskip("ctu.world.env")
    world_dir = os.path.join(REPO_ROOT, "data", "world")
    texts = text.episode_texts(world_dir, num_episodes=2)
    assert any("Departments:" in t for t in texts)  # a search_company result
    assert any(t.startswith('{"fields": [') for t in texts)  # an auth_info_form call
    assert text.episode_texts(world_dir, num_episodes=2) == texts


CONVERSATION = [
    {"role": "system", "content": "You help people call companies."},
    {"role": "user", "content": "Dispute a charge at Acme Bank."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "search_company", "arguments": {"company_name": "Acme Bank"}},
            }
        ],
    },
    {"role": "tool", "content": "Billing: 555-0100"},
    {
        "role": "assistant",
        "content": "I need your details.",
        "tool_calls": [
            {"function": {"name": "auth_info_form", "arguments": '{"fields": ["name"]}'}},
            {"function": {"name": "search_company", "arguments": {"company_name": "Zé"}}},
        ],
    },
    {"role": "tool", "content": "name: Jane"},
    {"role": "tool", "content": "no match"},
    {"role": "assistant", "content": "Done."},
    {"role": "user", "content": "Thanks!"},
]

EXPECTED = (
    "<|im_start|>system\nYou help people call companies.\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in TOOLS)
    + "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\nDispute a charge at Acme Bank.<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "search_company", "arguments": {"company_name": "Acme Bank"}}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nBilling: 555-0100\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nI need your details.\n<tool_call>\n"
    '{"name": "auth_info_form", "arguments": {"fields": ["name"]}}\n</tool_call>\n<tool_call>\n'
    '{"name": "search_company", "arguments": {"company_name": "Zé"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\nname: Jane\n</tool_response>\n"
    "<tool_response>\nno match\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\nDone.<|im_end|>\n"
    "<|im_start|>user\nThanks!<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_chat_template_renders_tools_calls_and_results(tokenizer):
    rendered = tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert rendered == EXPECTED
    no_prompt = tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    assert no_prompt == EXPECTED[: -len(text.GENERATION_PROMPT)]


def test_chat_template_without_tools_or_system(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False)
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "S"}] + messages
    assert tokenizer.apply_chat_template(with_system, tokenize=False).startswith(
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
    )


def test_chat_template_rejects_bad_roles(tokenizer):
    with pytest.raises(Exception, match="unknown message role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_chat_template_renders_a_later_system_message_as_its_own_turn(tokenizer):
    """As Qwen2.5's template does: the tools stay in the first system turn."""
    messages = [
        {"role": "system", "content": "S"},
        {"role": "system", "content": "critique"},
        {"role": "user", "content": "x"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    plain = tokenizer.apply_chat_template([messages[0], messages[2]], tools=TOOLS, tokenize=False)
    head, user = plain.split("<|im_start|>user\n")
    assert rendered == head + "<|im_start|>system\ncritique<|im_end|>\n<|im_start|>user\n" + user


def test_rendered_tool_calls_parse_back(tokenizer):
    completion = text.assistant_completion(tokenizer, CONVERSATION[4], TOOLS)
    result = text.parse_tool_calls(completion, TOOLS)
    assert result.error is None and result.method == "hermes"
    assert result.content == "I need your details."
    assert [(c.name, c.arguments) for c in result.calls] == [
        ("auth_info_form", {"fields": ["name"]}),
        ("search_company", {"company_name": "Zé"}),
    ]


def test_numbers_split_into_pieces_of_at_most_max_digits(tmp_path):
    texts = toys.text_training_texts() + ["+1-866-777-8856 account 3629562800"] * 50
    for max_digits in (1, 3):
        tok = text.build_tokenizer(
            texts, str(tmp_path / str(max_digits)), vocab_size=700, max_digits=max_digits
        )
        sample = "call +1-866-777-8856 for 3629562800, born 1967-03-04"
        pieces = [tok.convert_tokens_to_string([p]) for p in tok.tokenize(sample)]
        digit_runs = [run for p in pieces for run in re.findall(r"\d+", p)]
        assert max(map(len, digit_runs)) == max_digits
        assert "".join(digit_runs) == re.sub(r"\D", "", sample)  # no piece spans a non-digit
        assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    with pytest.raises(ValueError, match="max_digits"):
        text.build_tokenizer(["a"], str(tmp_path / "bad"), vocab_size=700, max_digits=0)


def test_capitalised_words_tokenize_alike_in_prose_and_json(tmp_path):
    """A name the user writes ("with Ironwood Care") and the same name inside a tool
    call's JSON string are the same tokens, so copying it is copying tokens."""
    texts = toys.text_training_texts() + ['call Ironwood Care {"company_name": "x"}'] * 50
    tok = text.build_tokenizer(texts, str(tmp_path), vocab_size=700)
    for name in ("Ironwood Care", "Paul Reyes", "O'Neil Smith-Jones"):
        in_prose = tok.encode(f"please call {name}.", add_special_tokens=False)
        in_json = tok.encode(json.dumps({"company_name": name}), add_special_tokens=False)
        name_ids = tok.encode(name, add_special_tokens=False)
        assert _contains(in_prose, name_ids) and _contains(in_json, name_ids), name


def _contains(ids, part):
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))
