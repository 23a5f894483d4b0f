"""The sampling distribution: temperature, top-k, top-p; sampling and log-probs.

Pure functions on logits `[batch, vocab]`, used inside the jitted decode loop. The
distribution sampled from is softmax(logits / temperature) restricted to the top-k
tokens, then to the smallest prefix (by descending probability) whose mass reaches
top_p, less the tokens tied with the first one left out (`_candidates`), and
renormalised. Reported log-probs are under that distribution; see
`SamplingConfig` for greedy decoding.
"""

import math

import chex
import jax
import jax.numpy as jnp

from ctu.sampling.settings import SamplingConfig


def _nucleus(values: jax.Array, top_p: float) -> jax.Array:
    """Which of the candidates (scaled logits, descending) the top-p rule keeps: a token
    stays while the mass of the more likely ones is still short of top_p; the most likely
    token always stays."""
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return (mass_before < top_p).at[..., 0].set(True)


def _candidates(logits: jax.Array, config: SamplingConfig):
    """The top-k + 1 scaled logits (logits / temperature, descending), their vocab ids,
    which of them are in the support, and the largest scaled logit left out (-inf when
    nothing is).

    The support is the top-k tokens, cut to the nucleus, less any token whose scaled
    logit ties the largest one left out: a floor between kept and left-out logits
    (`support_floor`) could not tell tied tokens apart, so they are all left out, and
    the sampler and a learner holding the floor agree on the support. The most likely
    token always stays. The one candidate past the top k is masked, not sliced off
    (slicing top_k's output made XLA:CPU run it 16 times slower).
    """
    vocab = logits.shape[-1]
    k = min(config.top_k, vocab) if config.top_k > 0 else vocab
    values, ids = jax.lax.top_k(logits.astype(jnp.float32) / config.temperature, min(k + 1, vocab))
    keep = jnp.broadcast_to(jnp.arange(values.shape[-1]) < k, values.shape)
    if config.top_p < 1.0:
        keep &= _nucleus(jnp.where(keep, values, -jnp.inf), config.top_p)
    kept = jnp.sum(keep, axis=-1)
    first_out = jnp.take_along_axis(values, jnp.minimum(kept, vocab - 1)[:, None], axis=-1)[:, 0]
    first_out = jnp.where(kept < vocab, first_out, -jnp.inf)
    keep = (keep & (values > first_out[:, None])).at[..., 0].set(True)
    return values, ids, keep, first_out


def row_uniforms(rng: jax.Array, rows: jax.Array) -> jax.Array:
    """One uniform in [0, 1) per row, from `rng` folded with the row's index.

    A row's draw depends only on the key and its index in the whole batch, never on
    the batch's size or on how it is split over devices, so a batch sharded into
    per-device decode loops samples exactly what the unsharded batch samples."""
    return jax.vmap(lambda row: jax.random.uniform(jax.random.fold_in(rng, row)))(rows)


def _inverse_cdf_sample(rng: jax.Array, logprobs: jax.Array, rows: jax.Array) -> jax.Array:
    """Index `[batch]` drawn from normalised log-probs `[batch, n]` (-inf allowed); row b
    uses the uniform of global row index `rows[b]`.

    Inverse-CDF sampling with one uniform per row, in two levels: pick a block of about
    sqrt(n) entries by its mass, then the entry inside it. This replaces
    `jax.random.categorical`'s Gumbel noise for every vocabulary entry and a full-length
    cumulative sum, which dominated a CPU decode step. Zero-probability entries are never
    chosen: their cumulative sum equals the previous one, and rounding is clamped to
    entries that carry mass.
    """
    batch, n = logprobs.shape
    block = 1 << max(0, round(math.log2(math.sqrt(n))))
    num_blocks = -(-n // block)
    probs = jnp.pad(jnp.exp(logprobs), ((0, 0), (0, num_blocks * block - n)))
    blocks = probs.reshape(batch, num_blocks, block)
    mass = blocks.sum(axis=-1)
    cdf = jnp.cumsum(mass, axis=-1)
    total = cdf[:, -1:]
    u = row_uniforms(rng, rows)[:, None] * total
    # u can round up to the total: fall back to the last block that has mass.
    chosen = jnp.minimum(jnp.sum(cdf <= u, axis=-1), jnp.sum(cdf < total, axis=-1))
    before = jnp.take_along_axis(cdf - mass, chosen[:, None], axis=-1)
    inner_cdf = jnp.cumsum(jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0], -1)
    inside = jnp.sum(inner_cdf <= u - before, axis=-1)
    first_with_mass = jnp.sum(inner_cdf <= 0, axis=-1)
    last_with_mass = jnp.sum(inner_cdf < inner_cdf[:, -1:], axis=-1)
    return chosen * block + jnp.clip(inside, first_with_mass, last_with_mass)


def sample_tokens(
    rng: jax.Array, logits: jax.Array, config: SamplingConfig, rows: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row.

    Args:
      rng: a PRNG key.
      logits: float `[batch, vocab]`, the model's raw next-token logits.
      config: sampling settings.
      rows: int32 `[batch]`, each row's index in the whole batch (default 0..batch-1);
        a row's sample depends on the key and this index only (`row_uniforms`).

    Returns:
      tokens int32 `[batch]` and their log-probs float32 `[batch]` under the sampling
      distribution (raw log_softmax(logits) for greedy decoding).
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    if rows is None:
        rows = jnp.arange(logits.shape[0], dtype=jnp.int32)
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32), chosen
    if not config.filtered:
        logprobs = jax.nn.log_softmax(logits / config.temperature, axis=-1)
        tokens = _inverse_cdf_sample(rng, logprobs, rows)
        chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32), chosen
    values, ids, keep, _ = _candidates(logits, config)
    logprobs = jax.nn.log_softmax(jnp.where(keep, values, -jnp.inf), axis=-1)
    choice = _inverse_cdf_sample(rng, logprobs, rows)
    chosen = jnp.take_along_axis(logprobs, choice[:, None], axis=-1)[:, 0]
    tokens = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), chosen


def sampling_logprobs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Log-probs `[batch, vocab]` of the sampling distribution; -inf outside its support.

    For greedy decoding this is the raw log_softmax(logits), matching what
    `sample_tokens` reports.
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)
    if config.greedy:
        return jax.nn.log_softmax(logits, axis=-1)
    if not config.filtered:
        return jax.nn.log_softmax(logits / config.temperature, axis=-1)
    values, ids, keep, _ = _candidates(logits, config)
    dense = jnp.full(logits.shape, -jnp.inf, jnp.float32)
    logprobs = jax.nn.log_softmax(jnp.where(keep, values, -jnp.inf), axis=-1)
    return jnp.put_along_axis(dense, ids, logprobs, axis=-1, inplace=False)


def support_floor(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """A floor under the sampling support in scaled logits (logits / temperature), `[batch]`.

    The support of `sample_tokens`' distribution is the tokens whose scaled logit is
    above this floor: it lies halfway between the least likely token kept and the most
    likely one left out, so logits recomputed by another program (rounding a few ulps
    apart) select the same tokens; tokens tied with the one left out are left out too
    (`_candidates`). When all candidates tie, only the most likely token is kept and the
    floor equals its logit: nothing is above it, and a learner keeps the sampled token,
    which is that one. -inf when nothing is filtered (or greedy decoding). A learner
    that masks the logits below it trains the distribution the sampler drew from
    (`ctu.models.shared_prefix.hidden_logp_and_entropy`).
    """
    chex.assert_rank(logits, 2)
    if config.greedy or not config.filtered:
        return jnp.full(logits.shape[:1], -jnp.inf, jnp.float32)
    values, _, keep, first_out = _candidates(logits, config)
    last_in = jnp.take_along_axis(values, jnp.sum(keep, axis=-1)[:, None] - 1, axis=-1)[:, 0]
    return jnp.where(first_out > -jnp.inf, (last_in + first_out) / 2, -jnp.inf)
