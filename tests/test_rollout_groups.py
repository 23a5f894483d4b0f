"""Feedback-guided groups in waves, the original-prompt variant, and model evaluation."""

import time

import jax
import numpy as np
import pytest

from ctu import feedback_guidance as fg
from ctu import prompts
from ctu.rollout import GroupSettings, choose_feedback_groups, plan_waves, run_groups
from ctu.rollout.evaluate import evaluate_model
from ctu.world import users
from ctu.world.env import Action
from tests import toys


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tiny_tokenizer()


@pytest.fixture(scope="module")
def world():
    return toys.shipped_world()


@pytest.fixture(scope="module")
def task_ids(world):
    counts = {}
    for task in world.tasks.values():
        counts[task.user_request] = counts.get(task.user_request, 0) + 1
    unique = [t for t in world.split("train") if counts[t.user_request] == 1]
    return [t.task_id for t in unique[:4]]


def _give_up_script(prompt):
    """A policy that always fails the same way: it reports without doing anything."""
    del prompt
    return lambda observation: Action("respond", {"content": "Sorry, I cannot help."})


def _count(tokenizer):
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def test_plan_waves():
    assert plan_waves(4, 2, 1) == [[1], [2], [3], [4]]
    assert plan_waves(4, 2, 2) == [[1], [2, 3], [4]]
    assert plan_waves(5, 3, 8) == [[1, 2], [3, 4, 5]]
    assert plan_waves(3, 1, 1) == [[1], [2], [3]]
    assert plan_waves(3, 9, 1) == [[1, 2, 3]]


@pytest.mark.parametrize("mix", [0.0, 0.5, 0.8, 1.0])
def test_mix_chooses_that_fraction_of_groups_deterministically(mix):
    chosen = choose_feedback_groups(10, mix, seed=3)
    assert len(chosen) == round(mix * 10) and chosen <= set(range(10))
    assert chosen == choose_feedback_groups(10, mix, seed=3)
    if 0 < mix < 1:
        assert any(choose_feedback_groups(10, mix, seed=s) != chosen for s in range(5))


@pytest.mark.parametrize("wave_size", [1, 2])
def test_each_wave_sees_exactly_the_failed_critiques_of_earlier_waves(
    tokenizer, world, task_ids, wave_size, monkeypatch
):
    seen_by_user = []
    for name in ("reply", "fill_form"):
        original = getattr(users.UserSimulator, name)

        def spy(self, arg, _original=original):
            seen_by_user.append(repr(arg))
            return _original(self, arg)

        monkeypatch.setattr(users.UserSimulator, name, spy)
    opening = users.UserSimulator.opening_message
    monkeypatch.setattr(
        users.UserSimulator,
        "opening_message",
        lambda self: seen_by_user.append("opening") or opening(self),
    )

    config = fg.FeedbackGuidanceConfig(start_rollout=2, accumulation_mode="all", mix=1.0)
    engine = toys.ScriptedEngine(tokenizer, _give_up_script)
    result = run_groups(
        engine,
        task_ids[:2],
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(0),
        settings=GroupSettings(num_rollouts=4, wave_size=wave_size),
        feedback=config,
    )
    waves = plan_waves(4, 2, wave_size)
    assert [w.rows for w in result.waves] == [2 * len(w) for w in waves]
    assert result.stats()["waves"] == len(waves) == len(engine.sessions)
    wave_of = {k: i for i, wave in enumerate(waves) for k in wave}
    for group in result.groups:
        assert [r.rollout for r in group] == [1, 2, 3, 4]
        for record in group:
            earlier = [r for r in group if wave_of[r.rollout] < wave_of[record.rollout]]
            attempts = [
                fg.Attempt(r.rollout, r.reward, r.feedback, r.failure_type) for r in earlier
            ]
            want = fg.render_previous_attempts(
                attempts, mode="all", max_tokens=500, count_tokens=_count(tokenizer)
            )
            assert record.feedback_block == want
            assert record.guided == (record.rollout >= 2)
            prompt = tokenizer.decode(record.tokens[: record.prompt_length].tolist())
            assert (fg.OPEN_TAG in prompt) == record.guided
    # The user simulator saw openings, messages and form fields, never a critique.
    assert seen_by_user and not any(fg.OPEN_TAG in s or "Attempt 1" in s for s in seen_by_user)
    for record in result.records:
        for step in record.steps:
            assert fg.OPEN_TAG not in repr(step.arguments)


def test_original_prompt_variant_has_the_same_continuation(tokenizer, world, task_ids):
    config = fg.FeedbackGuidanceConfig(start_rollout=2, mix=1.0)
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world, fail_unless_guided=True))
    result = run_groups(
        engine,
        task_ids[:2],
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(1),
        settings=GroupSettings(num_rollouts=3),
        feedback=config,
    )
    plain = prompts.system_prompt()
    for group in result.groups:
        first, second, third = group
        assert first.reward == 0.0 and not first.guided
        # Guided rollouts learn from rollout 1's critique and succeed; rollout 2's
        # success is not a critique, so rollout 3 sees rollout 1's failure only.
        assert second.success and third.success
        assert second.feedback_block == third.feedback_block and "Attempt 1" in third.feedback_block
        for record in (second, third):
            p, q = record.prompt_length, record.original_prompt_length
            assert q < p
            np.testing.assert_array_equal(record.original_tokens[q:], record.tokens[p:])
            np.testing.assert_array_equal(record.original_loss_mask[q:], record.loss_mask[p:])
            np.testing.assert_array_equal(record.original_logprobs[q:], record.logprobs[p:])
            assert not record.original_loss_mask[:q].any()
            original_prompt = tokenizer.decode(record.original_tokens[:q].tolist())
            assert plain in original_prompt and fg.OPEN_TAG not in original_prompt
            # The critique is a system turn of its own after the tools: the guided
            # prompt starts with the whole plain system turn.
            system_turn = original_prompt[: original_prompt.index("<|im_start|>user")]
            guided_prompt = tokenizer.decode(record.tokens[:p].tolist())
            assert guided_prompt.startswith(system_turn + "<|im_start|>system\n" + fg.OPEN_TAG)


def test_mix_half_gives_feedback_to_half_the_groups(tokenizer, world, task_ids):
    config = fg.FeedbackGuidanceConfig(start_rollout=2, mix=0.5)
    engine = toys.ScriptedEngine(tokenizer, _give_up_script)
    result = run_groups(
        engine,
        task_ids,
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(2),
        settings=GroupSettings(num_rollouts=3, wave_size=2, seed=7),
        feedback=config,
    )
    guided_groups = {g for g, group in enumerate(result.groups) if any(r.guided for r in group)}
    assert guided_groups == result.feedback_groups == choose_feedback_groups(4, 0.5, 7)
    assert len(guided_groups) == 2
    # Groups without feedback run all their rollouts in wave 1 (the batch stays wide).
    assert [w.rows for w in result.waves] == [2 * 1 + 2 * 3, 2 * 2]


def test_baseline_is_one_wave_of_everything(tokenizer, world, task_ids):
    engine = toys.ScriptedEngine(tokenizer, _give_up_script)
    result = run_groups(
        engine,
        task_ids,
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(3),
        settings=GroupSettings(num_rollouts=3),
        feedback=fg.FeedbackGuidanceConfig(enable=False),
    )
    assert [w.rows for w in result.waves] == [12] and not any(r.guided for r in result.records)
    assert result.waves[0].feedback_s == 0.0  # no block to render, no critique rewritten
    assert [[r.rollout for r in g] for g in result.groups] == [[1, 2, 3]] * 4


class _SlowRewriter:
    """A feedback enhancer (the `LLMFeedback` interface) taking `delay` s a critique."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, 0

    def enhance(self, rule_feedback: str, trajectory) -> str:
        del trajectory
        self.calls += 1
        time.sleep(self.delay)
        return f"Rewritten critique {self.calls} of: {rule_feedback[:20]}"


def test_rewritten_critiques_are_what_later_waves_read_and_their_time_is_feedback_time(
    tokenizer, world, task_ids
):
    rewriter, delay = _SlowRewriter(0.05), 0.05
    result = run_groups(
        toys.ScriptedEngine(tokenizer, _give_up_script),
        task_ids[:2],
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(0),
        settings=GroupSettings(num_rollouts=3, wave_size=1),
        feedback=fg.FeedbackGuidanceConfig(start_rollout=2, mix=1.0),
        feedback_enhancer=rewriter,
    )
    assert rewriter.calls == len(result.records) == 6  # every rollout failed
    for group in result.groups:
        for record in group:
            assert record.feedback.startswith("Rewritten critique")
            for earlier in group[: record.rollout - 1]:
                assert earlier.feedback in record.feedback_block
    for wave in result.waves:
        # The rewrites count as feedback time, not as environment time.
        assert wave.run.feedback_s >= delay * wave.rows > wave.run.env_s
        assert wave.feedback_s == wave.render_s + wave.run.feedback_s
    assert all(wave.render_s > 0 for wave in result.waves[1:])


def test_evaluate_model_cold_and_feedback(tokenizer, world, task_ids):
    tasks = [world.tasks[t] for t in task_ids[:3]]
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    cold = evaluate_model(
        engine, world, "train", tokenizer=tokenizer, rng=jax.random.key(0), tasks=tasks, trials=2
    )
    assert cold["success_rate"] == 1.0 and cold["episodes"] == 6
    assert cold["pass_hat_k"]["2"] == 1.0 and cold["parse_failure_rate"] == 0.0
    levels = {str(t.level) for t in tasks}
    assert cold["per_level_success"] == dict.fromkeys(levels, 1.0)

    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world, fail_unless_guided=True))
    feedback = evaluate_model(
        engine,
        world,
        "train",
        tokenizer=tokenizer,
        rng=jax.random.key(0),
        tasks=tasks,
        mode="feedback",
        batch_size=2,
    )
    assert feedback["first_try"]["success_rate"] == 0.0
    assert feedback["success_rate"] == 1.0 and feedback["retries"] == 3
    assert feedback["retry_success_rate"] == 1.0
