"""Warm start: demonstrations (token-in/token-out, feedback-reading retries) and batching."""

import itertools
import re

import numpy as np
import pytest

from ctu import demonstrations, sft
from ctu import feedback_guidance as fg
from ctu.text.chat_template import END_OF_TURN
from ctu.text.conversation import agent_spans
from ctu.world import tools
from tests import toys


@pytest.fixture(scope="module")
def demos_and_tokenizer():
    world = toys.shipped_world()
    tokenizer = toys.tiny_tokenizer()
    # Level-3 tasks fail often for the heuristic, level 1 never: blocks hold the
    # heuristic's critique or the random policy's only.
    tasks = [t for t in world.split("train") if t.level == 3][:8]
    tasks += [t for t in world.split("train") if t.level == 1][:4]
    config = sft.WarmStartConfig(
        max_len=100_000, feedback_demo_fraction=1.0, feedback_demo_attempts=3
    )
    demos = demonstrations.heuristic_demonstrations(
        world, tasks, tokenizer, config, fg.FeedbackGuidanceConfig(), seed=0
    )
    return demos, tokenizer


def test_loss_mask_covers_exactly_the_agent_turns(demos_and_tokenizer):
    demos, tokenizer = demos_and_tokenizer
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for demo in demos:
        tokens, mask = np.array(demo.tokens), np.array(demo.loss_mask)
        assert mask[0] == 0 and mask.any()
        # Each run of mask-1 tokens is one agent turn ending with its end-of-turn token,
        # and decodes to a tool call or a message (never a user or tool turn).
        starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate([mask, [0]])) == -1)
        for start, end in zip(starts, ends, strict=True):
            assert tokens[end] == eot
            text = tokenizer.decode(tokens[start : end + 1].tolist())
            assert "<tool_response>" not in text and "<|im_start|>" not in text


def test_feedback_demos_carry_the_critique_and_do_better(demos_and_tokenizer):
    demos, tokenizer = demos_and_tokenizer
    by_task = {}
    for demo in demos:
        by_task.setdefault(demo.task_id, []).append(demo)
    retried = [pair for pair in by_task.values() if len(pair) == 2]
    assert len(retried) >= 6, "too few tasks gave a feedback-reading attempt"
    counts = set()
    for first, second in retried:
        assert not first.with_feedback and second.with_feedback
        prompt = tokenizer.decode(list(second.tokens[: second.loss_mask.index(1)]))
        assert fg.OPEN_TAG in prompt and fg.OPEN_TAG not in tokenizer.decode(list(first.tokens))
        block = prompt[prompt.index(fg.OPEN_TAG) :]
        scores = [float(s) for s in re.findall(r"Attempt \d+ \(score ([0-9.]+)\)", block)]
        counts.add(len(scores))
        # 1 to feedback_demo_attempts earlier failures, each beaten by the demonstration.
        assert 1 <= len(scores) <= 3 and max(scores) < 1.0
        assert second.score > max(scores)
        if first.score < 1.0:  # the heuristic's own failure is the last attempt shown
            assert scores[-1] == pytest.approx(first.score, abs=0.01)
    assert len(counts) > 1, f"every block held {counts} attempts"
    # Tasks the heuristic solves get blocks too, from random-policy failures.
    assert any(first.score >= 1.0 for first, _ in retried)


def test_action_message_renders_tool_calls_the_parser_reads_back(demos_and_tokenizer):
    from ctu.text import conversation, parse_tool_calls

    _, tokenizer = demos_and_tokenizer
    action = demonstrations.Action("auth_info_form", {"fields": ["name", "phone"]})
    text = conversation.assistant_completion(
        tokenizer, demonstrations.action_message(action), tools.TOOL_SCHEMAS
    )
    parsed = parse_tool_calls(text, tools.TOOL_SCHEMAS)
    assert parsed.error is None
    assert [(c.name, c.arguments) for c in parsed.calls] == [(action.name, action.kwargs)]


def test_thoughts_open_the_turns_and_leave_the_calls_unchanged(demos_and_tokenizer):
    """With warm_start.thoughts each form and call turn opens with a <think> block;
    the tool-call parser drops it and reads back the very calls of the plain turns."""
    from ctu.text import parse_tool_calls

    plain, tokenizer = demos_and_tokenizer
    world = toys.shipped_world()
    tasks = [t for t in world.split("train") if t.level == 3][:8]
    tasks += [t for t in world.split("train") if t.level == 1][:4]
    config = sft.WarmStartConfig(
        max_len=100_000, feedback_demo_fraction=1.0, feedback_demo_attempts=3, thoughts=True
    )
    thinking = demonstrations.heuristic_demonstrations(
        world, tasks, tokenizer, config, fg.FeedbackGuidanceConfig(), seed=0
    )
    assert [d.task_id for d in thinking] == [d.task_id for d in plain]

    def turns(demo):
        tokens = list(demo.tokens)
        return [tokenizer.decode(tokens[s:e]) for s, e in agent_spans(demo.loss_mask)]

    thoughts = 0
    for with_thoughts, without in zip(thinking, plain, strict=True):
        assert with_thoughts.turn_tools == without.turn_tools
        for text, bare, tool in zip(
            turns(with_thoughts), turns(without), with_thoughts.turn_tools, strict=True
        ):
            assert "<think>" not in bare
            if tool == "make_phone_call":
                assert re.match(r"<think>Call [A-Za-z ]+: \+[-\d]+\.</think>\n<tool_call>", text), (
                    text
                )
            if tool in ("search_company", "respond"):
                assert "<think>" not in text, text
            thoughts += "<think>" in text
            got = parse_tool_calls(text, tools.TOOL_SCHEMAS)
            want = parse_tool_calls(bare, tools.TOOL_SCHEMAS)
            assert (got.calls, got.content, got.error) == (want.calls, want.content, want.error)
    assert thoughts > 2 * len(thinking)


def _fake_demos(n=40):
    rng = np.random.default_rng(0)
    return [
        demonstrations.Demonstration(
            f"t{i}", tuple(range(int(rng.integers(5, 50)))), (0,), 0.5, i % 5 == 0, 0
        )
        for i in range(n)
    ]


def test_batches_group_kinds_and_cover_every_demo():
    demos = _fake_demos()  # 8 of 40 carry a critique
    first_epoch = list(itertools.islice(sft.batches(demos, 4, seed=1, window=3), 9))
    # Windows hold 12 demos (3 batches); sorting by kind leaves at most one batch per
    # window mixing the two kinds (random batching would mix most of them).
    mixed = sum(len({d.with_feedback for d in batch}) > 1 for batch in first_epoch)
    assert mixed <= 3
    assert all(len(batch) == 4 for batch in first_epoch)
    seen = set()
    for batch in itertools.islice(sft.batches(demos, 4, seed=1, window=3), 60):
        seen.update(d.task_id for d in batch)
    assert seen == {d.task_id for d in demos}
    again = [
        d.task_id for b in itertools.islice(sft.batches(demos, 4, seed=1, window=3), 5) for d in b
    ]
    first = [
        d.task_id for b in itertools.islice(sft.batches(demos, 4, seed=1, window=3), 5) for d in b
    ]
    assert again == first


def test_batches_refuse_too_few_demos():
    with pytest.raises(ValueError, match="batch_size"):
        next(sft.batches(_fake_demos(3), 4, seed=0))


def test_pad_batch_pads_rows_and_length_with_masked_padding():
    demos = _fake_demos(3)
    batch = sft.pad_batch(demos, 64, pad_id=7, rows_multiple=4)
    assert batch["tokens"].shape == (4, 64) and batch["loss_mask"].shape == (4, 64)
    assert (batch["tokens"][3] == 7).all() and not batch["loss_mask"][3].any()
    for row, demo in enumerate(demos):
        assert batch["tokens"][row, : len(demo.tokens)].tolist() == list(demo.tokens)
        assert (batch["tokens"][row, len(demo.tokens) :] == 7).all()


def test_context_mask_is_the_environment_after_the_system_turns(demos_and_tokenizer):
    demos, tokenizer = demos_and_tokenizer
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    plain = [d for d in demos if not d.with_feedback]
    chosen = plain[:2] + [d for d in demos if d.with_feedback][:2]
    assert len(chosen) == 4
    batch = sft.pad_batch(chosen, max(len(d.tokens) for d in chosen) + 5, pad_id=0)
    for row, demo in enumerate(chosen):
        context, agent = batch["context_mask"][row], batch["loss_mask"][row]
        assert not (context * agent).any()  # never an agent token
        assert not context[len(demo.tokens) :].any()  # never padding
        # Nothing of the system turns (instructions, tools, critique) is context...
        assert demo.tokens[demo.context_start - 1] == eot
        system = tokenizer.decode(list(demo.tokens[: demo.context_start]))
        assert system.count("<|im_start|>system") == 1 + demo.with_feedback
        assert "<|im_start|>user" not in system
        assert (fg.OPEN_TAG in system) == demo.with_feedback
        assert not context[: demo.context_start].any()
        # ...and every other non-agent token is: the user's words and the tool results.
        rest = np.arange(demo.context_start, len(demo.tokens))
        assert (context[rest] + agent[rest] == 1).all()
        user_text = tokenizer.decode(list(demo.tokens[demo.context_start :]))
        assert user_text.lstrip().startswith("<|im_start|>user")


def test_turn_tools_name_each_agent_turn(demos_and_tokenizer):
    demos, tokenizer = demos_and_tokenizer
    for demo in demos:
        spans = agent_spans(demo.loss_mask)
        assert len(demo.turn_tools) == len(spans)
        for (start, end), tool in zip(spans, demo.turn_tools, strict=True):
            text = tokenizer.decode(list(demo.tokens[start:end]))
            if tool == tools.RESPOND:
                assert "<tool_call>" not in text
            else:
                assert f'"name": "{tool}"' in text


def test_turn_weights_scale_their_turns_and_leave_the_context_alone(demos_and_tokenizer):
    demos, tokenizer = demos_and_tokenizer
    chosen = demos[:4]
    length = max(len(d.tokens) for d in chosen)
    weights = {"auth_info_form": 4.0, tools.RESPOND: 0.0}
    plain = sft.pad_batch(chosen, length, pad_id=0)
    weighted = sft.pad_batch(chosen, length, pad_id=0, turn_weights=weights)
    np.testing.assert_array_equal(weighted["context_mask"], plain["context_mask"])
    np.testing.assert_array_equal(weighted["tokens"], plain["tokens"])
    seen = set()
    for row, demo in enumerate(chosen):
        expected = np.zeros(length, np.float32)
        for start, end in agent_spans(demo.loss_mask):
            # The tool, read back from the turn's text.
            called = re.search(r'"name": "(\w+)"', tokenizer.decode(list(demo.tokens[start:end])))
            tool = called.group(1) if called else tools.RESPOND
            expected[start:end] = weights.get(tool, 1.0)
            seen.add(tool)
        np.testing.assert_array_equal(weighted["loss_mask"][row], expected)
    assert {"auth_info_form", tools.RESPOND, "search_company"} <= seen


def test_warm_start_config_checks_turn_weights():
    config = sft.WarmStartConfig(turn_weights={"auth_info_form": 2.0, "respond": 1.0})
    assert config.turn_weights == {"auth_info_form": 2.0}  # weight 1 is the default
    with pytest.raises(ValueError, match="auth_form.*no tool"):
        sft.WarmStartConfig(turn_weights={"auth_form": 2.0})
    with pytest.raises(ValueError, match="respond must be a finite weight"):
        sft.WarmStartConfig(turn_weights={"respond": -1.0})


def test_feedback_thoughts_need_thoughts():
    assert sft.WarmStartConfig(thoughts=True, feedback_thoughts=True).feedback_thoughts
    with pytest.raises(ValueError, match="feedback_thoughts.*needs warm_start.thoughts=True"):
        sft.WarmStartConfig(thoughts=False, feedback_thoughts=True)
    with pytest.raises(ValueError, match="call_fields_thoughts.*needs warm_start.thoughts=True"):
        sft.WarmStartConfig(thoughts=False, call_fields_thoughts=True)


def test_sft_loss_adds_the_weighted_context_term():
    import jax
    import jax.numpy as jnp

    model = toys.tiny_model(toys.tiny_model_config(vocab_size=64), weight_scale=3.0)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (3, 20)), jnp.int32)
    agent = jnp.asarray(rng.random((3, 20)) < 0.3, jnp.float32)
    context = (1.0 - agent) * jnp.asarray(rng.random((3, 20)) < 0.5, jnp.float32)
    context = context.at[:, 0].set(0.0)
    # Reference: log-probs from the plain forward.
    logp = jax.nn.log_softmax(model(tokens)[:, :-1], axis=-1)
    logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    logp = jnp.concatenate([jnp.zeros((3, 1)), logp], axis=1)
    nll_agent = -(logp * agent).sum() / agent.sum()
    nll_context = -(logp * context).sum() / context.sum()
    plain, metrics = sft.sft_loss(model, tokens, agent)
    weighted, metrics_w = sft.sft_loss(model, tokens, agent, context, context_weight=0.5)
    np.testing.assert_allclose(plain, nll_agent, rtol=1e-5)
    np.testing.assert_allclose(weighted, nll_agent + 0.5 * nll_context, rtol=1e-5)
    np.testing.assert_allclose(metrics_w["sft/loss"], metrics["sft/loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics_w["sft/context_loss"], nll_context, rtol=1e-5)
    # A weighted agent mask gives the weighted mean; the token count ignores the weights.
    weights = agent * jnp.asarray(rng.uniform(0.5, 4.0, (3, 20)), jnp.float32)
    loss_w, metrics_w = sft.sft_loss(model, tokens, weights)
    np.testing.assert_allclose(loss_w, -(logp * weights).sum() / weights.sum(), rtol=1e-5)
    assert float(metrics_w["sft/tokens"]) == float(agent.sum())


def test_warm_start_config_refuses_a_negative_context_weight():
    with pytest.raises(ValueError, match="context_loss_weight"):
        sft.WarmStartConfig(context_loss_weight=-1.0)


def test_batch_lengths_round_up_to_the_bucket_and_stop_at_max_len():
    import types

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 3000, rng.integers(1, 6))
        demos = [types.SimpleNamespace(tokens=[0] * n) for n in lengths]
        bucket = int(rng.choice([1, 64, 128, 512]))
        max_len = int(rng.integers(1, 4096))
        got = sft.bucketed_length(demos, max_len, bucket)
        if got < max_len:  # the smallest multiple of the bucket that holds them all
            assert got % bucket == 0 and got - bucket < max(lengths) <= got
        else:
            assert got == max_len and max(lengths) > max_len - bucket
    with pytest.raises(ValueError, match="length_bucket must be >= 1"):
        sft.WarmStartConfig(length_bucket=0)


def test_sft_steps_keep_the_state_placement_and_compile_once():
    """Model and optimizer come back from a step with the shardings they were born with
    (the scalar step counts included), so steps on one batch shape compile once; they
    used to compile twice and let XLA re-place small optimizer moments over fsdp."""
    import jax
    from flax import nnx

    from ctu import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    config = toys.tiny_model_config(vocab_size=64)
    model = sharding.create_sharded_model(config, mesh, nnx.Rngs(0))
    trainer = sft.SftTrainer(model, sft.WarmStartConfig(steps=4, warmup_steps=1), mesh)
    placement = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, trainer.state()))
    rng = np.random.default_rng(0)
    rows = sharding.batch_shards(mesh)
    batch = {
        "tokens": rng.integers(0, 64, (rows, 16)).astype(np.int32),
        "loss_mask": np.ones((rows, 16), np.float32),
    }
    losses = [float(trainer.step(batch)["sft/loss"]) for _ in range(3)]
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, trainer.state())) == placement
    assert trainer._step._cache_size() == 1
    assert losses[-1] < losses[0]  # the updates reach the model
