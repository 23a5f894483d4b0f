"""The learner trains the distribution the rollouts were drawn from (top-k / top-p).

References: `sampling_logprobs` (the sampler's own distribution, built by sorting), and
the log-probs the sampler reported for the tokens it drew.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctu import sharding
from ctu.models import shared_prefix
from ctu.rl import train_step
from ctu.rl.optim import OptimConfig
from ctu.sampling import SamplingConfig, Session
from ctu.sampling.filters import sample_tokens, sampling_logprobs, support_floor
from tests import toys

FILTERS = [
    SamplingConfig(top_k=5),
    SamplingConfig(top_p=0.7),
    SamplingConfig(temperature=0.6, top_p=0.9, top_k=20),
]


@pytest.mark.parametrize("config", FILTERS, ids=str)
def test_the_floor_bounds_the_sampling_support(config):
    logits = jax.random.normal(jax.random.key(0), (64, 300)) * 4.0
    floor = support_floor(logits, config)
    support = np.isfinite(np.asarray(sampling_logprobs(logits, config)))
    scaled = np.asarray(logits / config.temperature)
    np.testing.assert_array_equal(scaled > np.asarray(floor)[:, None], support)
    assert 1 <= support.sum(1).min() and support.sum(1).max() < 300


@pytest.mark.parametrize("config", FILTERS, ids=str)
def test_ties_at_the_cut_leave_the_sampler_and_the_floor_in_agreement(config):
    """Logits on a coarse grid tie at the top-k / top-p cut. The tied tokens are all
    left out, so the floor still separates kept from left out; the sampled tokens'
    reported log-probs are what a learner holding the floor computes."""
    logits = jnp.round(jax.random.normal(jax.random.key(3), (256, 40)) * 3.0) / 2.0
    floor = np.asarray(support_floor(logits, config))
    support = np.isfinite(np.asarray(sampling_logprobs(logits, config)))
    scaled = np.asarray(logits / config.temperature)
    above = scaled > floor[:, None]
    alone = ~above.any(1)  # every candidate tied: the likeliest token alone
    np.testing.assert_array_equal(support[~alone], above[~alone])
    assert np.all(support[alone].sum(1) == 1)
    np.testing.assert_array_equal(np.argmax(support[alone], 1), np.argmax(scaled[alone], 1))
    if config.top_k:
        assert (support.sum(1) < config.top_k).any()  # some rows had a tie at the cut
    for seed in range(4):
        tokens, reported = sample_tokens(jax.random.key(seed), logits, config)
        learner, _ = shared_prefix._logp_and_entropy(logits, tokens, config.temperature, floor)
        np.testing.assert_allclose(learner, reported, atol=1e-5)


def test_no_filter_no_floor():
    logits = jax.random.normal(jax.random.key(0), (4, 30))
    for config in (SamplingConfig(), SamplingConfig(temperature=0.0), SamplingConfig(0.5)):
        assert np.all(np.asarray(support_floor(logits, config)) == -np.inf)


@pytest.mark.parametrize("prefix_len", [0, 6])
@pytest.mark.parametrize("config", FILTERS, ids=str)
def test_sampled_log_probs_are_the_samplers_distribution(config, prefix_len):
    """At every position with a target inside the support, the log-prob equals
    sampling_logprobs of that position's logits; a target outside is kept, alone."""
    model = toys.tiny_model(weight_scale=3.0)
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, model.config.vocab_size)
    tokens = tokens.at[:, :prefix_len].set(tokens[0, :prefix_len])
    for t in range(max(prefix_len, 1), 16, 2):  # every other target the likeliest token
        tokens = tokens.at[:, t].set(jnp.argmax(model(tokens)[:, t - 1], axis=-1))
    logp, floor = shared_prefix.shared_prefix_sampled_logp(model, tokens, prefix_len, config)
    start = max(prefix_len, 1)
    logits = model(tokens)[:, start - 1 : -1].reshape(-1, model.config.vocab_size)
    want = sampling_logprobs(logits, config)
    want = np.take_along_axis(np.asarray(want), np.asarray(tokens[:, start:]).reshape(-1, 1), 1)
    want = want.reshape(3, -1)
    got = np.asarray(logp[:, start:])
    inside = np.isfinite(want)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-5)
    assert np.all(got[~inside] < 0) and np.all(np.isfinite(got))
    assert np.all(np.asarray(floor[:, :start]) == -np.inf)
    assert np.all(np.asarray(logp[:, :start]) == 0)


def test_the_gradient_stays_inside_the_support():
    """With floors, d logp / d logits is zero for every token below the floor but the
    target, and softmax-shaped inside; the entropy's gradient is finite."""
    logits = jax.random.normal(jax.random.key(2), (8, 40)) * 3.0
    targets = jnp.arange(8) * 5
    config = SamplingConfig(top_p=0.8)
    floor = support_floor(logits, config)

    def objective(logits):
        logp, entropy = shared_prefix._logp_and_entropy(logits, targets, 1.0, floor)
        return logp.sum() + entropy.sum(), logp

    (_, logp), grads = jax.value_and_grad(objective, has_aux=True)(logits)
    grads = np.asarray(grads)
    assert np.all(np.isfinite(grads))
    keep = np.asarray(logits) > np.asarray(floor)[:, None]
    keep[np.arange(8), targets] = True
    assert np.all(grads[~keep] == 0) and np.all(keep.sum(1) < 40)
    # The log-prob's own gradient: onehot - renormalised softmax over the support.
    only_logp = np.asarray(jax.grad(lambda x: objective(x)[1].sum())(logits))
    p = np.where(keep, np.exp(np.asarray(logits)), 0.0)
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(only_logp, np.eye(40)[targets] - p, atol=1e-5)


def test_floors_a_slice_at_a_time_equal_the_whole(monkeypatch):
    model = toys.tiny_model(weight_scale=3.0)
    tokens = jax.random.randint(jax.random.key(3), (3, 20), 0, model.config.vocab_size)
    config = FILTERS[2]
    results = []
    for elements in (10**9, 3 * 3 * model.config.vocab_size):
        monkeypatch.setattr(shared_prefix, "LOGITS_CHUNK_ELEMENTS", elements)
        logp, floor = shared_prefix.shared_prefix_sampled_logp(model, tokens, 0, config)

        def loss(model, floor=floor):
            logp, entropy = shared_prefix.shared_prefix_token_logp_and_entropy(
                model, tokens, 0, config.temperature, floor
            )
            return logp.sum() + entropy.sum()

        grads = jax.tree.leaves(nnx.grad(loss)(model))
        results.append((logp, floor, grads))
    (logp_a, floor_a, grads_a), (logp_b, floor_b, grads_b) = results
    np.testing.assert_allclose(floor_a, floor_b, atol=1e-5)
    np.testing.assert_allclose(logp_a, logp_b, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_learner_recomputes_what_a_filtered_sampler_reported():
    """Tokens drawn with top-k 8 / top-p 0.7 at temperature 0.8: a learner told those
    settings recomputes the sampler's log-probs, its first update has ratio 1, and the
    floors travel with the batch; a learner on the whole distribution does not match."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = sharding.create_sharded_model(toys.tiny_model_config(), mesh, nnx.Rngs(0))
    settings = dict(num_micro_batches=1, shuffle=False, optim=OptimConfig(learning_rate=1e-2))
    learner = train_step.Learner(
        train_step.TrainConfig(temperature=0.8, top_p=0.7, top_k=8, **settings), model, mesh
    )
    whole = train_step.Learner(train_step.TrainConfig(temperature=0.8, **settings), model, mesh)
    sampling = SamplingConfig(temperature=0.8, top_p=0.7, top_k=8, max_new_tokens=12)
    session = Session(model, batch_size=4, max_len=32, sampling=sampling)
    prompts = [[3, 5, 7, 9], [11, 2], [4, 4, 4], [9]]
    out = session.generate(prompts, nnx.state(model), jax.random.key(0))
    tokens = np.zeros((4, 32), np.int32)
    mask = np.zeros((4, 32), np.float32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt) + out.num_tokens[row]] = prompt + out.row_tokens(row)
        mask[row, len(prompt) : len(prompt) + out.num_tokens[row]] = 1
    filtered, floor = learner.compute_logp(jnp.asarray(tokens))
    full, no_floor = whole.compute_logp(jnp.asarray(tokens))
    assert no_floor is None
    for row, prompt in enumerate(prompts):
        span = slice(len(prompt), len(prompt) + out.num_tokens[row])
        np.testing.assert_allclose(filtered[row, span], out.row_logprobs(row), atol=1e-4)
        assert np.all(np.isfinite(np.asarray(floor[row, span])))
    assert np.abs(np.asarray(full - filtered)[mask > 0]).max() > 1e-2
    batch = train_step.RolloutBatch(
        tokens=tokens,
        mask=mask,
        advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32),
        old_logp=np.zeros_like(mask),
    )
    prepared = learner.prepare(learner.shard_batch(batch))
    np.testing.assert_array_equal(prepared.support_floor, floor)
    first = learner.train_step(prepared, jnp.arange(4))
    assert abs(float(first["ratio/mean"]) - 1.0) < 1e-5
    assert float(first["nonfinite"]) == 0


def test_bad_support_settings_are_named():
    with pytest.raises(ValueError, match="train.top_p / train.top_k: top_p must be in"):
        train_step.TrainConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        train_step.TrainConfig(top_k=-1)
