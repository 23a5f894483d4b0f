"""The shared-prefix training forward equals the plain forward, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctu.models import shared_prefix
from ctu.rl.train_step import token_logp_and_entropy
from tests import toys

PREFIX, LENGTH, BATCH = 12, 20, 3


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (BATCH, LENGTH)).astype(np.int32)
    tokens[:, :PREFIX] = tokens[0, :PREFIX]  # the shared prompt
    mask = np.zeros((BATCH, LENGTH), np.float32)
    mask[:, PREFIX + 1 :] = rng.integers(0, 2, (BATCH, LENGTH - PREFIX - 1))
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "smear"])
def test_log_probs_match_the_plain_forward_after_the_prefix(family):
    config = toys.tiny_model_config(
        qkv_bias=family == "qwen2", qk_norm=family != "qwen2", smear=2 if family == "smear" else 0
    )
    model = toys.tiny_model(config, weight_scale=3.0)
    tokens, _ = _batch(config.vocab_size)
    plain, _ = token_logp_and_entropy(model(tokens), tokens)
    shared = shared_prefix.shared_prefix_token_logp(model, tokens, PREFIX)
    np.testing.assert_allclose(shared[:, PREFIX:], plain[:, PREFIX:], atol=1e-5)
    assert not np.asarray(shared[:, :PREFIX]).any()
    np.testing.assert_allclose(
        shared_prefix.shared_prefix_token_logp(model, tokens, 0), plain, atol=1e-6
    )


def test_gradients_match_the_plain_forward():
    model = toys.tiny_model(weight_scale=3.0)
    tokens, mask = _batch(model.config.vocab_size, seed=1)

    def plain_loss(model):
        logp, _ = token_logp_and_entropy(model(tokens), tokens)
        return -(logp * mask).sum() / mask.sum()

    def shared_loss(model):
        logp = shared_prefix.shared_prefix_token_logp(model, tokens, PREFIX)
        return -(logp * mask).sum() / mask.sum()

    loss_a, grads_a = nnx.value_and_grad(plain_loss)(model)
    loss_b, grads_b = nnx.value_and_grad(shared_loss)(model)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    assert len(flat_a) == len(flat_b) > 0
    for a, b in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_prefix_must_be_shared_to_agree():
    """A wrong prefix length (rows differ inside it) gives other log-probs: the
    caller must measure the shared prefix, which common_prefix_length does."""
    model = toys.tiny_model(weight_scale=3.0)
    tokens, _ = _batch(model.config.vocab_size, seed=2)
    tokens = tokens.at[1, PREFIX - 1].set((tokens[0, PREFIX - 1] + 1) % model.config.vocab_size)
    plain, _ = token_logp_and_entropy(model(tokens), tokens)
    shared = shared_prefix.shared_prefix_token_logp(model, tokens, PREFIX)
    assert not np.allclose(shared[1, PREFIX:], plain[1, PREFIX:], atol=1e-4)
    np.testing.assert_allclose(shared[0, PREFIX:], plain[0, PREFIX:], atol=1e-5)


def test_common_prefix_length_stops_at_the_first_difference_or_trained_token():
    tokens = np.tile(np.arange(200), (3, 1))
    mask = np.zeros_like(tokens)
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=1) == 199
    tokens[2, 150] = -1
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=1) == 150
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=64) == 128
    mask[0, 70] = 1
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=1) == 70
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=64) == 64
    mask[1, 10] = 1
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=64) == 0


def test_prefix_length_out_of_range_is_an_error():
    model = toys.tiny_model()
    tokens, _ = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="prefix_len"):
        shared_prefix.shared_prefix_logits(model, tokens, LENGTH)
    assert dataclasses.is_dataclass(model.config)


@pytest.mark.parametrize("loss", ["dapo", "grpo"])
def test_learner_update_with_shared_prefix_equals_the_plain_update(loss):
    """Learner.update measures the shared prompt and runs it once; parameters after
    the update (with old log-probs and, for GRPO, reference log-probs recomputed
    through the same path) equal those of an update that runs every row in full."""
    from ctu import sharding
    from ctu.rl import train_step
    from ctu.rl.optim import OptimConfig

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tokens, mask = _batch(toys.tiny_model_config().vocab_size, seed=3)
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    rng = np.random.default_rng(0)
    batch = train_step.RolloutBatch(
        tokens=tokens,
        mask=mask,
        advantages=rng.normal(size=BATCH).astype(np.float32),
        old_logp=np.zeros_like(mask),
    )
    assert shared_prefix.common_prefix_length(tokens, mask, bucket=4) == PREFIX
    params, losses = [], []
    for prefix_len in (0, PREFIX):
        config = train_step.TrainConfig(
            loss=loss,
            num_micro_batches=1,
            shuffle=False,
            # A large eps keeps Adam from amplifying float rounding in near-zero gradients.
            optim=OptimConfig(learning_rate=1e-2, eps=1e-3),
        )
        model = sharding.create_sharded_model(toys.tiny_model_config(), mesh, nnx.Rngs(0))
        learner = train_step.Learner(config, model, mesh)
        metrics = learner.update(batch, jax.random.key(0), prefix_len=prefix_len)
        assert metrics["batch/shared_prefix_tokens"] == prefix_len
        losses.append(metrics["loss"])
        params.append(jax.tree.leaves(nnx.state(learner.model, nnx.Param)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix_len", [0, PREFIX])
def test_logits_a_slice_at_a_time_equal_the_whole(monkeypatch, prefix_len):
    """Above LOGITS_CHUNK_ELEMENTS the log-probs, entropies and their gradients come a
    slice of positions at a time (3 here, which does not divide the length) and equal
    those of the whole logits."""
    model = toys.tiny_model(weight_scale=3.0)
    tokens, mask = _batch(model.config.vocab_size, seed=4)

    def loss(model):
        logp, entropy = shared_prefix.shared_prefix_token_logp_and_entropy(
            model, tokens, prefix_len, temperature=0.7
        )
        return -(logp * mask).sum() + 0.1 * (entropy * mask).sum(), (logp, entropy)

    results = []
    for elements in (10**9, 3 * BATCH * model.config.vocab_size):
        monkeypatch.setattr(shared_prefix, "LOGITS_CHUNK_ELEMENTS", elements)
        (value, outputs), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        results.append((value, outputs, jax.tree.leaves(grads)))
    (value_a, out_a, grads_a), (value_b, out_b, grads_b) = results
    np.testing.assert_allclose(value_a, value_b, rtol=1e-5)
    for a, b in zip(out_a, out_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_the_gradient_a_slice_at_a_time_never_holds_the_whole_logits(monkeypatch):
    """XLA's own memory plan for a vocabulary that dwarfs the model (as a Qwen's does):
    with the whole logits the gradient's temporaries are several float32 copies of
    them (logits, softmax, their gradients); a slice at a time, under half of one."""
    vocab = 65536
    model = toys.tiny_model(toys.tiny_model_config(vocab_size=vocab))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (4, 256)), jnp.int32)
    graphdef, params = nnx.split(model)

    def loss(params):
        logp, entropy = shared_prefix.shared_prefix_token_logp_and_entropy(
            nnx.merge(graphdef, params), tokens, 0
        )
        return logp.sum() + entropy.sum()

    logits_bytes = tokens.size * vocab * 4
    temp = {}
    for elements in (10**10, 2**20):
        monkeypatch.setattr(shared_prefix, "LOGITS_CHUNK_ELEMENTS", elements)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temp[elements] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[10**10] > 3 * logits_bytes
    assert temp[2**20] < logits_bytes / 2
