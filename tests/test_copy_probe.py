"""The teacher-forced copy probe counts exactly the argument values a model reproduces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctu.analysis import copy_probe
from ctu.text.conversation import agent_spans
from tests import toys


class _NextTokenOracle:
    """A 'model' whose logits at t put all mass on the true token t + 1 of `tokens`,
    optionally wrong on every position in `wrong_at`."""

    def __init__(self, vocab_size, wrong_at=()):
        self.vocab_size = vocab_size
        self.wrong_at = set(wrong_at)

    def __call__(self, tokens):
        nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
        for t in self.wrong_at:
            nxt = nxt.at[:, t].set((nxt[:, t] + 1) % self.vocab_size)
        return jax.nn.one_hot(nxt, self.vocab_size) * 10.0


@pytest.fixture(scope="module")
def world_and_tokenizer():
    return toys.shipped_world(), toys.tiny_tokenizer()


def test_a_perfect_next_token_model_copies_everything(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer
    scores = copy_probe.copy_accuracy(
        _NextTokenOracle(len(tokenizer)), tokenizer, world, "val", num_tasks=4
    )
    kinds = {"copy/company_name", "copy/phone_number", "copy/auth_values"}
    assert kinds <= set(scores)
    assert {f"{k}/first_token" for k in kinds} <= set(scores)
    assert "copy/company_name/later_tokens" in scores
    assert all(v == 1.0 for v in scores.values())


def test_a_constant_model_copies_nothing(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer

    def constant(tokens):
        return jnp.zeros(tokens.shape + (len(tokenizer),)).at[..., 5].set(1.0)

    scores = copy_probe.copy_accuracy(constant, tokenizer, world, "val", num_tasks=4)
    assert scores and all(v == 0.0 for v in scores.values())


def test_one_wrong_token_fails_only_its_value(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer
    from ctu import prompts
    from ctu.demonstrations import record_episode
    from ctu.world import agents
    from ctu.world.env import Environment

    # Find where the first episode's company name sits, and break only its last token.
    task = world.split("val")[0]
    recorder = agents.Recorder(agents.Heuristic(seed=0))
    env = Environment(world, [task], seed=0)
    builder, _ = record_episode(
        env, recorder, task.task_id, tokenizer, system=prompts.system_prompt()
    )
    name = recorder.actions[0].kwargs["company_name"]
    ids = tokenizer.encode(name, add_special_tokens=False)
    at = copy_probe._find_in_agent_turns(builder.tokens(), builder.loss_mask(), ids, 0)
    assert at > 0
    model = _NextTokenOracle(len(tokenizer), wrong_at=[at + len(ids) - 2])
    scores = copy_probe.copy_accuracy(model, tokenizer, world, "val", num_tasks=1)
    assert scores["copy/company_name"] == 0.0
    assert scores["copy/company_name/first_token"] == 1.0
    later = len(ids) - 1
    assert later >= 1  # a name of one token would have no later tokens
    assert scores["copy/company_name/later_tokens"] == pytest.approx((later - 1) / later)
    assert scores["copy/auth_values"] == 1.0


def test_an_empty_split_is_a_clear_error(world_and_tokenizer):
    world, tokenizer = world_and_tokenizer
    with pytest.raises(ValueError, match="no tasks"):
        copy_probe.copy_accuracy(lambda t: t, tokenizer, world, "val", num_tasks=0)


def test_actions_are_scored_whole_and_by_decision(world_and_tokenizer):
    """A perfect model takes every action; a constant one none; one wrong token inside
    the first form fails that form only."""
    world, tokenizer = world_and_tokenizer
    perfect = copy_probe.teacher_forced_probe(
        _NextTokenOracle(len(tokenizer)), tokenizer, world, "val", num_tasks=4
    )
    actions = {k for k in perfect if k.startswith("action/")}
    assert {"action/search_company", "action/first_form", "action/first_call"} <= actions
    assert {"action/respond", "action/episode"} <= actions
    assert {k.split("/")[1] for k in actions} <= set(copy_probe.ACTION_KINDS)
    assert all(perfect[k] == 1.0 for k in actions)
    assert {k for k in perfect if k.startswith("copy/")} == set(
        copy_probe.copy_accuracy(
            _NextTokenOracle(len(tokenizer)), tokenizer, world, "val", num_tasks=4
        )
    )

    def constant(tokens):
        return jnp.zeros(tokens.shape + (len(tokenizer),)).at[..., 5].set(1.0)

    nothing = copy_probe.teacher_forced_probe(constant, tokenizer, world, "val", num_tasks=4)
    assert all(nothing[k] == 0.0 for k in actions)

    from ctu import prompts
    from ctu.demonstrations import record_episode
    from ctu.world import agents
    from ctu.world.env import Environment

    task = world.split("val")[0]
    recorder = agents.Recorder(agents.Heuristic(seed=0))
    env = Environment(world, [task], seed=0)
    builder, _ = record_episode(
        env, recorder, task.task_id, tokenizer, system=prompts.system_prompt()
    )
    turns = agent_spans(builder.loss_mask())
    names = [a.name for a in recorder.actions]
    assert len(turns) == len(names) and names[1] == "auth_info_form"
    start, end = turns[1]
    model = _NextTokenOracle(len(tokenizer), wrong_at=[(start + end) // 2 - 1])
    one = copy_probe.teacher_forced_probe(model, tokenizer, world, "val", num_tasks=1)
    assert one["action/first_form"] == 0.0 and one["action/episode"] == 0.0
    assert all(v == 1.0 for k, v in one.items() if k not in ("action/first_form", "action/episode"))


def test_a_model_is_probed_without_baking_its_weights_into_the_program(world_and_tokenizer):
    """The probe passes a module's weights to its compiled forward as an argument; closed
    over, they became constants of every compilation (2.4 GB for qwen3_0p6b, whose
    probe then did not finish compiling in minutes on an H100)."""
    import warnings

    world, tokenizer = world_and_tokenizer
    model = toys.tiny_model(toys.tiny_model_config(vocab_size=len(tokenizer)))
    before = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", 1024)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*constants were captured.*")
            scores = copy_probe.teacher_forced_probe(model, tokenizer, world, "val", num_tasks=2)
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", before)
    assert 0.0 <= scores["action/episode"] <= 1.0


def test_probe_scores_the_thoughts_the_warm_start_was_trained_on(world_and_tokenizer):
    """With call_fields, the probe's episodes are those of warm_start.call_fields_thoughts:
    a model that writes the plain call thoughts gets no call right."""
    world, tokenizer = world_and_tokenizer
    from ctu import prompts
    from ctu.demonstrations import record_episode
    from ctu.world import agents
    from ctu.world.env import Environment

    tasks = world.split("val")[:2]
    env = Environment(world, tasks, seed=0)
    plain = [
        record_episode(
            env,
            agents.Heuristic(seed=0),
            t.task_id,
            tokenizer,
            system=prompts.system_prompt(),
            thoughts=True,
        )[0].tokens()
        for t in tasks
    ]

    def next_plain_tokens(rows):  # each row's plain episode (longest shared prefix), shifted
        out = np.zeros(rows.shape, np.int32)
        for r, row in enumerate(np.asarray(rows).tolist()):
            shared = [
                next((i for i, (a, b) in enumerate(zip(p, row, strict=False)) if a != b), len(p))
                for p in plain
            ]
            episode = plain[int(np.argmax(shared))]
            out[r, : len(episode) - 1] = episode[1:]
        return out

    def writes_plain_thoughts(tokens):
        shape = jax.ShapeDtypeStruct(tokens.shape, jnp.int32)
        nxt = jax.pure_callback(next_plain_tokens, shape, tokens)
        return jax.nn.one_hot(nxt, len(tokenizer)) * 10.0

    for call_fields, right in ((False, 1.0), (True, 0.0)):
        probe = copy_probe.teacher_forced_probe(
            writes_plain_thoughts,
            tokenizer,
            world,
            "val",
            num_tasks=2,
            thoughts=True,
            call_fields=call_fields,
        )
        assert probe["action/first_call"] == right
