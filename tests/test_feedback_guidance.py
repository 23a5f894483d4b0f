"""The <previous_attempts> block: content per mode and the token budget."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctu import feedback_guidance as fg
from tests import toys


def count_words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated piece."""
    return len(text.split())


def count_chunks(text: str) -> int:
    """A finer stand-in tokenizer: one token per 3 characters."""
    return -(-len(text) // 3)


ATTEMPTS = [
    fg.Attempt(1, 0.3, "Billing also needs last_4_ssn.", "missing_auth"),
    fg.Attempt(2, 1.0, "Solved.", ""),
    fg.Attempt(3, 0.5, "Call Fraud (555-0101) before Billing.", "wrong_order"),
    fg.Attempt(4, 0.3, "Billing also needs last_4_ssn.", "missing_auth"),
]


def test_no_failures_gives_no_block():
    assert (
        fg.render_previous_attempts(
            [fg.Attempt(1, 1.0, "ok")], mode="all", max_tokens=500, count_tokens=count_words
        )
        == ""
    )


def test_all_mode_lists_every_failure_in_order_and_skips_successes():
    block = fg.render_previous_attempts(
        ATTEMPTS, mode="all", max_tokens=500, count_tokens=count_words
    )
    assert block.startswith(fg.OPEN_TAG) and block.endswith(fg.CLOSE_TAG)
    assert re.findall(r"Attempt (\d+)", block) == ["1", "3", "4"]
    assert "Solved." not in block


def test_last_mode_keeps_only_the_most_recent_failure():
    block = fg.render_previous_attempts(
        ATTEMPTS, mode="last", max_tokens=500, count_tokens=count_words
    )
    assert re.findall(r"Attempt (\d+)", block) == ["4"]


def test_summary_mode_counts_distinct_critiques():
    block = fg.render_previous_attempts(
        ATTEMPTS, mode="summary", max_tokens=500, count_tokens=count_words
    )
    assert "(2x) Billing also needs last_4_ssn." in block
    assert "(1x) Call Fraud (555-0101) before Billing." in block
    assert "3 earlier attempts failed (best score 0.50)" in block
    # The most frequent critique comes first.
    assert block.index("(2x)") < block.index("(1x)")


def test_budget_drops_oldest_attempts_first():
    attempts = [fg.Attempt(i, 0.2, f"critique number {i} " + "word " * 10) for i in range(1, 6)]
    full = fg.render_previous_attempts(
        attempts, mode="all", max_tokens=10_000, count_tokens=count_words
    )
    budget = count_words(full) - 5
    block = fg.render_previous_attempts(
        attempts, mode="all", max_tokens=budget, count_tokens=count_words
    )
    kept = [int(i) for i in re.findall(r"Attempt (\d+)", block)]
    assert kept == list(range(2, 6))


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="accumulation mode"):
        fg.render_previous_attempts(ATTEMPTS, mode="every", max_tokens=50, count_tokens=len)


@settings(max_examples=200, deadline=None)
@given(
    feedbacks=st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=8),
    scores=st.lists(st.floats(0.0, 0.99), min_size=8, max_size=8),
    mode=st.sampled_from(fg.ACCUMULATION_MODES),
    max_tokens=st.integers(16, 200),
    counter=st.sampled_from([count_words, count_chunks]),
)
def test_block_always_fits_the_token_budget(feedbacks, scores, mode, max_tokens, counter):
    attempts = [fg.Attempt(i + 1, scores[i], f) for i, f in enumerate(feedbacks)]
    block = fg.render_previous_attempts(
        attempts, mode=mode, max_tokens=max_tokens, count_tokens=counter
    )
    assert counter(block) <= max_tokens
    if block:
        assert block.startswith(fg.OPEN_TAG) and block.endswith(fg.CLOSE_TAG)
    if max_tokens >= 64 and any(a.score < 1.0 for a in attempts):
        assert block, "a generous budget must keep at least part of a critique"


@pytest.fixture(scope="module")
def real_critiques():
    """Rule-based critiques of the heuristic's failures on shipped train tasks."""
    from ctu.world import agents
    from ctu.world.env import Environment

    world = toys.shipped_world()
    env, critiques = Environment(world, seed=0), []
    for i, task in enumerate(world.split("train")[:60]):
        policy, obs = agents.Heuristic(seed=i), env.reset(task.task_id)
        policy.reset(task.task_id, obs)
        while not (step := env.step(policy.act(obs))).done:
            obs = step.observation
        if step.info["score"] < 1:
            critiques.append(
                fg.Attempt(len(critiques) + 1, step.info["score"], step.info["feedback"])
            )
    assert len(critiques) >= 3
    return critiques[:3]


@pytest.mark.parametrize("mode", fg.ACCUMULATION_MODES)
def test_real_critiques_under_a_bpe_tokenizer_are_cut_not_dropped(real_critiques, mode):
    """With a BPE tokenizer a line's tokens depend on the newline before it ("\\n\\n" is
    one token, "\\n" + "A" two): every budget that holds a block gets one within budget,
    a larger budget never loses it, and it always holds part of a critique (in
    "summary", not the header alone)."""
    tokenizer = toys.tiny_tokenizer()

    def count(text):
        return len(tokenizer.encode(text, add_special_tokens=False))

    first_word = {a.feedback.split()[0] for a in real_critiques}
    had_block = False
    for budget in range(40, 2 + count("".join(a.feedback for a in real_critiques)) * 2, 7):
        block = fg.render_previous_attempts(
            real_critiques, mode=mode, max_tokens=budget, count_tokens=count
        )
        assert count(block) <= budget
        assert block or not had_block, f"budget {budget} lost the block a smaller one had"
        if block:
            had_block = True
            body = block.split("\n")[-2]  # the last line before the closing tag
            assert any(body.split(" ", 3)[-1].startswith(w) or w in body for w in first_word), body
    assert had_block


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("start_rollout", 0, "start_rollout"),
        ("accumulation_mode", "most", "accumulation_mode"),
        ("mix", 1.5, "mix"),
        ("training_context", "both", "training_context"),
        ("max_feedback_tokens", 3, "max_feedback_tokens"),
    ],
)
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        fg.FeedbackGuidanceConfig(**{field: value})


_LLM = {"use_llm_enhancement": True, "llm_base_url": "http://localhost:8000/v1", "llm_model": "m"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"llm_base_url": ""}, "llm_base_url"),
        ({"llm_base_url": "localhost:8000/v1"}, "llm_base_url"),
        ({"llm_model": ""}, "llm_model"),
        ({"llm_api_key_env": "CTU_TEST_UNSET_KEY"}, "CTU_TEST_UNSET_KEY"),
        ({"llm_timeout_s": 0.0}, "llm_timeout_s"),
    ],
)
def test_llm_enhancement_needs_an_endpoint_and_model(overrides, match, monkeypatch):
    monkeypatch.delenv("CTU_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match=match):
        fg.FeedbackGuidanceConfig(**{**_LLM, **overrides})
    # The same settings with the rewriting off are not checked: nothing will call it.
    fg.FeedbackGuidanceConfig(**{**_LLM, **overrides, "use_llm_enhancement": False})


def test_make_enhancer_only_when_guidance_rewrites_and_the_key_comes_from_the_env(
    tmp_path, monkeypatch
):
    cache = str(tmp_path / "cache")
    assert fg.FeedbackGuidanceConfig().make_enhancer(cache) is None
    assert fg.FeedbackGuidanceConfig(**_LLM, enable=False).make_enhancer(cache) is None
    monkeypatch.setenv("CTU_TEST_KEY", "secret")
    enhancer = fg.FeedbackGuidanceConfig(
        **_LLM, llm_api_key_env="CTU_TEST_KEY", llm_timeout_s=5.0
    ).make_enhancer(cache)
    assert enhancer.url == "http://localhost:8000/v1/chat/completions"
    assert (enhancer.model, enhancer.api_key, enhancer.timeout_s) == ("m", "secret", 5.0)
    assert enhancer.cache_dir == cache
    assert fg.FeedbackGuidanceConfig(**_LLM).make_enhancer(cache).api_key is None
