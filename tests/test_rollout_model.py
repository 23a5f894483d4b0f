"""The runner on the real JAX sampler with a tiny random model: ids, masks, log-probs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctu.rollout import EpisodeSpec, JaxEngine, RunnerSettings, run_episodes
from ctu.rollout.engine import EngineSession, RolloutEngine
from ctu.sampling import SamplingConfig
from ctu.sampling import engine as sampling_engine
from ctu.world import users
from tests import toys

SYSTEM = "You are a phone assistant."
SETTINGS = RunnerSettings(max_total_tokens=1280, max_turns=3)


class RecordingEngine(JaxEngine):
    """A JaxEngine that logs every generate call of its sessions."""

    def session(self, batch_size, max_len):
        session = super().session(batch_size, max_len)
        generate = session.generate
        session.calls = []

        def logged(appends, rng):
            out = generate(appends, rng)
            session.calls.append((list(appends), out))
            return out

        session.generate = logged
        self.last_session = session
        return session


@pytest.fixture(scope="module")
def tokenizer():
    return toys.tiny_tokenizer()


@pytest.fixture(scope="module")
def world():
    return toys.shipped_world()


@pytest.fixture
def endless_user(monkeypatch):
    """The user answers every message without ending the call, so episodes run for
    several turns whatever a random model writes (they end at the turn limit)."""
    reply = users.UserSimulator.reply

    def never_done(self, message):
        return reply(self, message)._replace(done=False)

    monkeypatch.setattr(users.UserSimulator, "reply", never_done)


def _model(seed):
    return toys.tiny_model(toys.tiny_model_config(vocab_size=1024), seed=seed, weight_scale=3.0)


def _forward_logprobs(model, records):
    """log_softmax of the training forward over every record (right-padded: causal)."""
    tokens = np.zeros((len(records), SETTINGS.max_total_tokens), np.int32)
    for row, record in enumerate(records):
        tokens[row, : len(record.tokens)] = record.tokens
    logits = model(jnp.asarray(tokens))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def _check(record, logp, session, row):
    ids, mask = [], []
    for appends, out in session.calls:
        if appends[row] is None:
            continue
        ids += list(appends[row]) + out.row_tokens(row)
        mask += [0] * len(appends[row]) + [1] * len(out.row_tokens(row))
    assert record.tokens.tolist() == ids[: len(record.tokens)]
    assert record.loss_mask.tolist() == mask[: len(record.tokens)]
    assert record.tokens.tolist() == session.history(row)[: len(record.tokens)]
    positions = np.flatnonzero(record.loss_mask)
    assert positions.size and positions[0] == record.prompt_length
    want = logp[positions - 1, record.tokens[positions]]
    np.testing.assert_allclose(record.logprobs[positions], want, atol=1e-4, rtol=0)
    assert not record.logprobs[record.loss_mask == 0].any()


def test_records_match_the_sampler_and_the_model_forward(tokenizer, world, endless_user):
    task_ids = [t.task_id for t in world.split("train")[:3]]
    model = _model(0)
    sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=(tokenizer.eos_token_id,))
    engine = RecordingEngine(model, sampling, min_append_bucket=128)  # fewer compiles
    assert isinstance(engine, RolloutEngine)
    specs = [EpisodeSpec(t, SYSTEM, group=i) for i, t in enumerate(task_ids)]
    records, stats = run_episodes(
        engine, specs, world=world, tokenizer=tokenizer, rng=jax.random.key(0), settings=SETTINGS
    )
    session = engine.last_session
    assert isinstance(session, EngineSession)
    assert stats.generate_calls == len(session.calls) >= 2
    logp = _forward_logprobs(model, records)
    for row, record in enumerate(records):
        assert record.num_turns >= 2 and len(record.tokens) <= SETTINGS.max_total_tokens
        _check(record, logp[row], session, row)

    # New weights: same compiled steps, samples and log-probs from the new model.
    traces = dict(sampling_engine.TRACE_COUNTS)
    new_model = _model(1)
    engine.update_weights(new_model)
    records, _ = run_episodes(
        engine, specs, world=world, tokenizer=tokenizer, rng=jax.random.key(0), settings=SETTINGS
    )
    assert dict(sampling_engine.TRACE_COUNTS) == traces
    logp = _forward_logprobs(new_model, records)
    for row, record in enumerate(records):
        _check(record, logp[row], engine.last_session, row)


def test_jax_engine_params_follow_update_weights():
    model, other = _model(0), _model(1)
    engine = JaxEngine(model, SamplingConfig(max_new_tokens=4))
    engine.update_weights(other)
    chex.assert_trees_all_equal(engine.params, nnx.state(other))


def test_a_sampler_mesh_of_its_own_samples_what_one_device_samples():
    """The learner's weights on one device, the sampler on two others (rollout.cpu_devices):
    the engine copies the weights over, every row's tokens and log-probs are unchanged,
    and the greedy twin reads the same copy."""
    from ctu import sharding

    model, other = _model(0), _model(1)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[1:3])
    here, there = JaxEngine(model, sampling), JaxEngine(model, sampling, mesh=mesh)
    greedy = there.with_sampling(SamplingConfig(max_new_tokens=6, temperature=0.0))
    prompts = [[5, 6, 7], [9], [11, 12], [13, 14, 15, 16]]
    for weights in (model, other):
        here.update_weights(weights)
        there.update_weights(weights)
        for leaf in jax.tree.leaves(greedy.params):
            assert leaf.sharding.device_set == set(jax.devices()[1:3])
        rng = jax.device_put(jax.random.key(3), jax.devices()[0])  # the learner's device
        want = here.session(4, 32).generate(prompts, rng)
        got = there.session(4, 32).generate(prompts, rng)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
