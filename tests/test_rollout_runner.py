"""The multi-turn runner with a scripted engine: text <-> env plumbing, ids, masks, limits."""

import dataclasses

import jax
import numpy as np
import pytest

from ctu import prompts
from ctu.rollout import TOKEN_LIMIT, EpisodeSpec, RunnerSettings, run_episodes
from ctu.rollout.runner import MALFORMED_ACTION
from ctu.sampling import LENGTH
from ctu.world import reward, tools
from ctu.world.env import Action
from tests import toys


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tiny_tokenizer()


@pytest.fixture(scope="module")
def world():
    return toys.shipped_world()


def _tasks(world, levels=(1, 2, 3, 4, 5)):
    """One train task per level, with a request text no other task shares."""
    counts = {}
    for task in world.tasks.values():
        counts[task.user_request] = counts.get(task.user_request, 0) + 1
    picked = {}
    for task in world.split("train"):
        if task.level in levels and task.level not in picked and counts[task.user_request] == 1:
            picked[task.level] = task
    return [picked[level] for level in levels]


def _run(engine, world, tokenizer, task_ids, **settings):
    specs = [
        EpisodeSpec(task_id, prompts.system_prompt(), group=i) for i, task_id in enumerate(task_ids)
    ]
    return run_episodes(
        engine,
        specs,
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(0),
        settings=RunnerSettings(**settings),
    )


def _expected_ids_and_mask(session, row):
    """Concatenation of what the session was fed and what it sampled, with the mask."""
    ids, mask = [], []
    for appends, out in session.calls:
        if appends[row] is None or out.stop_reasons[row] is None:
            continue
        ids += list(appends[row])
        mask += [0] * len(appends[row])
        ids += out.row_tokens(row)
        mask += [1] * len(out.row_tokens(row))
    return ids, mask


def test_oracle_turns_through_parser_and_env_reach_reward_one(tokenizer, world):
    tasks = _tasks(world)
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    records, stats = _run(engine, world, tokenizer, [t.task_id for t in tasks])
    session = engine.sessions[0]
    assert stats.episodes == len(tasks) and stats.generate_calls == session.calls.__len__()
    for row, (task, record) in enumerate(zip(tasks, records, strict=True)):
        assert record.task_id == task.task_id and record.group == row
        assert record.reward == 1.0, (task.level, record.feedback)
        assert record.failure_type == reward.SUCCESS and record.ended_by == "user"
        assert not record.truncated and record.num_parse_failures == 0
        assert record.num_tool_calls == 2 + len(task.requests)
        ids, mask = _expected_ids_and_mask(session, row)
        assert record.tokens.tolist() == ids == session.histories[row]
        assert record.loss_mask.tolist() == mask
        # Behaviour log-probs sit on the sampled ids, 0 elsewhere.
        sampled = np.concatenate(
            [out.row_logprobs(row) for a, out in session.calls if a[row] is not None]
        )
        np.testing.assert_array_equal(record.logprobs[record.loss_mask == 1], sampled)
        assert not record.logprobs[record.loss_mask == 0].any()
        assert record.loss_mask[: record.prompt_length].sum() == 0
        # Not feedback-guided: the original variant is the rollout itself.
        assert record.original_tokens is record.tokens and not record.guided
        assert record.num_turns == sum(a[row] is not None for a, _ in session.calls)
        assert record.generation_s > 0 and record.env_s > 0


def test_turn_scores_are_the_score_each_oracle_turn_starts_from(tokenizer, world):
    # The oracle never errs, so its score only climbs the reward's ladder: 0 before it
    # has a field, 0.2 with some, 0.3 with all, 0.7 once a department of the task served
    # it, and 1.0 less the missing report's penalty before the report.
    tasks = _tasks(world)
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    records, _ = _run(engine, world, tokenizer, [t.task_id for t in tasks])
    before_report = reward.COMPLETED_SCORE - reward.NO_FINAL_REPORT_PENALTY
    ladder = {0.0, reward.SOME_AUTH_SCORE, reward.ALL_AUTH_SCORE, reward.DEPARTMENT_SCORE}
    for task, record in zip(tasks, records, strict=True):
        scores = list(record.turn_scores)
        assert len(scores) == record.num_turns
        assert scores[:2] == [0.0, 0.0]  # before the search, and before the form
        assert scores[-1] == pytest.approx(before_report)
        assert scores == sorted(scores) and set(scores[:-1]) <= ladder
        if task.level == 1:  # search, form with every field, one call, report
            assert scores == pytest.approx([0.0, 0.0, reward.ALL_AUTH_SCORE, before_report])
            assert record.turn_kinds() == (
                "search_company",
                "auth_info_form",
                "make_phone_call",
                tools.RESPOND,
            )


def test_unparsable_and_invalid_calls_are_counted_and_penalised(tokenizer, world):
    task = _tasks(world, levels=(1,))[0]
    broken = '<tool_call>\n{"name": "search_company", "arguments": {"company_name": \n</tool_call>'
    unknown = Action("fax_company", {"number": "1"})
    engine = toys.ScriptedEngine(
        tokenizer, toys.oracle_script(world, first_turns=[broken, unknown])
    )
    (record,), _ = _run(engine, world, tokenizer, [task.task_id])
    assert record.num_parse_failures == 2
    invalid = [s for s in record.steps if isinstance(s.outcome, tools.Invalid)]
    assert [s.name for s in invalid] == [MALFORMED_ACTION, MALFORMED_ACTION]
    assert record.turn_kinds()[:3] == ("malformed", "malformed", "search_company")
    # The oracle still completes the task; the two malformed calls cost their penalty.
    assert record.reward == pytest.approx(1.0 - 2 * reward.MALFORMED_CALL_PENALTY)
    assert record.failure_type == reward.MALFORMED_CALL
    text = tokenizer.decode(record.tokens.tolist())
    assert text.count("Error: your tool call could not be used") == 2
    assert "unknown tool 'fax_company'" in text


def test_token_limit_truncates_and_scores_what_was_done(tokenizer, world):
    task = _tasks(world, levels=(3,))[0]
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    (full,), _ = _run(engine, world, tokenizer, [task.task_id])
    for limit in (full.prompt_length + 5, len(full.tokens) - 40, len(full.tokens) - 3):
        engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
        (record,), _ = _run(engine, world, tokenizer, [task.task_id], max_total_tokens=limit)
        assert record.truncated and record.ended_by == TOKEN_LIMIT, limit
        assert len(record.tokens) <= limit
        assert record.reward < 1.0
        # What was kept is a prefix of the full episode (same script, same ids).
        assert record.tokens.tolist() == full.tokens[: len(record.tokens)].tolist()
        assert len(record.loss_mask) == len(record.logprobs) == len(record.tokens)
        expected = reward.compute_score_with_feedback(
            world.tasks[task.task_id], world, _episode(record)
        )
        assert record.reward == expected.score
        if limit == full.prompt_length + 5:  # cut inside the first turn, at the limit
            (_, out), *_ = engine.sessions[0].calls
            assert out.stop_reasons[0] == LENGTH and record.num_turns == 1
            assert record.loss_mask.sum() == 5 and len(record.steps) == 0
            assert record.turn_kinds() == ("cut",) and record.turn_scores == (0.0,)


class _Episode:
    def __init__(self, steps):
        self.steps = list(steps)
        self.final_message = None


def _episode(record):
    return _Episode(record.steps)


def test_prompt_longer_than_the_limit_gives_an_empty_truncated_record(tokenizer, world):
    task = _tasks(world, levels=(1,))[0]
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    (record,), stats = _run(engine, world, tokenizer, [task.task_id], max_total_tokens=64)
    assert record.truncated and record.num_turns == 0 and record.reward == 0.0
    assert stats.generate_calls == 0


def test_turn_limit_ends_the_episode(tokenizer, world):
    task = _tasks(world, levels=(5,))[0]
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    (record,), _ = _run(engine, world, tokenizer, [task.task_id], max_turns=3)
    assert record.ended_by == "turn_limit" and len(record.steps) == 3 and not record.truncated
    assert record.reward < 1.0


def test_engine_must_stop_at_the_end_of_turn(tokenizer, world):
    engine = toys.ScriptedEngine(tokenizer, toys.oracle_script(world))
    engine.sampling = dataclasses.replace(engine.sampling, stop_token_ids=())
    with pytest.raises(ValueError, match="end-of-turn"):
        _run(engine, world, tokenizer, [_tasks(world, levels=(1,))[0].task_id])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_total_tokens"):
        RunnerSettings(max_total_tokens=4)
    with pytest.raises(ValueError, match="rollouts are numbered"):
        EpisodeSpec("t", "s", rollout=0)
    with pytest.raises(ValueError, match="feedback_block is blank"):
        EpisodeSpec("t", "s", feedback_block=" \n")
