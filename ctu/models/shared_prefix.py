"""Training forward for rows that share a prompt prefix: the prefix runs once.

Every episode of a batch starts with the same system turn (instructions and the
tool schemas, most of the prompt), so a plain forward spends most of its work
recomputing the same prefix for every row. Here the prefix runs once with batch
1, its keys and values are broadcast to all rows as a KV cache, and the rows'
suffixes run against it. The result equals the plain forward at every position
from `prefix_len - 1` on, and so do the gradients: they flow through the cache
and the broadcast sums them over the rows.

Tokens before `prefix_len` get no log-prob (0): they must carry no loss, which
holds for a prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ctu.models.cache import KVCache
from ctu.sampling.filters import support_floor

# Prefix lengths are rounded down to a multiple of this to bound recompiles.
PREFIX_BUCKET = 64

# Logits (float32 elements) made at once by `hidden_logp_and_entropy`; more go a slice
# of positions at a time. 2**27 is 512 MiB: the tiny model's batches (vocabulary 2,048)
# stay whole; a Qwen vocabulary (151,936) takes 55 positions of 16 rows a slice.
LOGITS_CHUNK_ELEMENTS = 2**27


def shared_prefix_hidden(model, tokens: jax.Array, prefix_len: int) -> jax.Array:
    """Final hidden states at positions `prefix_len - 1 .. T - 1`: `[B, T - prefix_len + 1, D]`.

    All rows must hold the same `tokens[:, :prefix_len]`; `prefix_len` is static.
    """
    batch, length = tokens.shape
    if not 0 < prefix_len < length:
        raise ValueError(f"prefix_len={prefix_len} must be in (0, {length}).")
    # The prefix attends over its own slots only; the cache then grows to `length` slots
    # (zeros, hidden by causality until the suffix writes them) and is shared by all rows.
    cache = KVCache.init(model.config, batch=1, max_len=prefix_len)
    prefix_hidden, cache = model(
        tokens[:1, :prefix_len],
        positions=jnp.arange(prefix_len)[None],
        cache=cache,
        return_hidden=True,
    )
    cache = cache.grow(length)
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])), cache)
    positions = jnp.broadcast_to(jnp.arange(prefix_len, length)[None], (batch, length - prefix_len))
    suffix_hidden, _ = model(
        tokens[:, prefix_len:], positions=positions, cache=cache, return_hidden=True
    )
    last = jnp.broadcast_to(prefix_hidden[:, -1:], (batch, 1, prefix_hidden.shape[-1]))
    return jnp.concatenate([last, suffix_hidden], axis=1)


def shared_prefix_logits(model, tokens: jax.Array, prefix_len: int) -> jax.Array:
    """Logits at positions `prefix_len - 1 .. T - 1`: `[B, T - prefix_len + 1, V]`."""
    return model.project(shared_prefix_hidden(model, tokens, prefix_len))


def _logp_and_entropy(logits, targets, temperature: float, floor=None):
    """Log-probs of `targets` and entropies under softmax(logits / temperature), restricted
    where `floor` is given to the scaled logits above it (the target always kept)."""
    scaled = logits.astype(jnp.float32) / temperature
    if floor is None:
        log_probs = jax.nn.log_softmax(scaled, axis=-1)
        logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return logp, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    ids = jnp.arange(scaled.shape[-1])
    keep = (scaled > floor[..., None]) | (ids == targets[..., None])
    log_probs = jax.nn.log_softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    # 0 outside the support, where exp(-inf) * -inf would be NaN in value and gradient.
    safe = jnp.where(keep, log_probs, 0.0)
    return logp, -jnp.sum(jnp.exp(safe) * safe * keep, axis=-1)


def _map_positions(model, fn, hidden: jax.Array, *per_position: jax.Array):
    """`fn(model.project(hidden), *per_position)` for outputs `[B, L]`, made a slice of
    positions at a time (remade in the backward pass) above `LOGITS_CHUNK_ELEMENTS`."""
    batch, length, width = hidden.shape
    step = max(1, LOGITS_CHUNK_ELEMENTS // (batch * model.config.vocab_size))
    if step >= length:
        return fn(model.project(hidden), *per_position)
    chunks = -(-length // step)
    pad = chunks * step - length

    def slices(x):
        # [chunks, B, step, ...]: rows stay whole in each slice, so their sharding holds.
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(batch, chunks, step, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h, *rest = args
        return fn(model.project(h), *rest)

    out = jax.lax.map(one, tuple(slices(x) for x in (hidden, *per_position)))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, chunks * step)[:, :length]  # noqa: E731
    return jax.tree.map(unchunk, out)


def hidden_logp_and_entropy(
    model, hidden: jax.Array, targets: jax.Array, temperature: float = 1.0, floor=None
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of `targets` [B, L] and entropies under `model.project(hidden)` [B, L, D].

    `floor` [B, L] (optional) restricts each position's distribution to the scaled logits
    above it, the target always included (`support_floor`: the sampler's top-k /
    top-p support); -inf keeps all.

    When the logits would exceed `LOGITS_CHUNK_ELEMENTS` (read at call time), they are
    made a slice of positions at a time and remade in the backward pass
    (`jax.checkpoint`), so only one slice's logits are ever held: a 150k vocabulary's
    logits over 16 x 2,048 tokens are 20 GB in float32, several times that with the
    softmax and its gradient, against 2 GB for the 0.6B model's weights.
    """
    if floor is None:
        fn = lambda logits, t: _logp_and_entropy(logits, t, temperature)  # noqa: E731
        return _map_positions(model, fn, hidden, targets)
    fn = lambda logits, t, f: _logp_and_entropy(logits, t, temperature, f)  # noqa: E731
    return _map_positions(model, fn, hidden, targets, floor)


def _hidden(model, tokens: jax.Array, prefix_len: int) -> tuple[jax.Array, int]:
    """Hidden states predicting tokens[:, start:], and start (1, or prefix_len)."""
    if prefix_len == 0:
        return model(tokens, return_hidden=True)[:, :-1], 1
    return shared_prefix_hidden(model, tokens, prefix_len)[:, :-1], prefix_len


def shared_prefix_token_logp_and_entropy(
    model, tokens: jax.Array, prefix_len: int, temperature: float = 1.0, floor=None
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies `[B, T]` aligned with `tokens`
    (docs/architecture.md: the value at t is about token t, predicted at t - 1),
    0 before `prefix_len`; with prefix_len 0, the plain forward.

    `temperature` divides the logits first: the distribution a sampler at that
    temperature draws from, whose log-probs it reports as the behaviour's. `floor`
    `[B, T]`, aligned the same way (`shared_prefix_sampled_logp`), restricts each
    token's distribution to the sampler's support."""
    hidden, start = _hidden(model, tokens, prefix_len)
    extra = () if floor is None else (floor[:, start:],)
    logp, entropy = hidden_logp_and_entropy(model, hidden, tokens[:, start:], temperature, *extra)
    pad = ((0, 0), (start, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


def shared_prefix_sampled_logp(model, tokens: jax.Array, prefix_len: int, sampling):
    """Per-token log-probs under the sampler's distribution and their support floors,
    both `[B, T]` aligned with `tokens` (0 and -inf before `prefix_len`).

    `sampling` is the rollouts' `SamplingConfig`: each position's distribution is the
    one `ctu.sampling.filters.sample_tokens` draws from given these logits (temperature,
    top-k, top-p), so on the sampler's weights the log-probs are the ones it reported.
    The floors (`support_floor`) then hold that support fixed for
    `shared_prefix_token_logp_and_entropy` while the weights move.
    """
    hidden, start = _hidden(model, tokens, prefix_len)

    def fn(logits, targets):
        flat = logits.reshape(-1, logits.shape[-1])
        floor = support_floor(flat, sampling).reshape(logits.shape[:-1])
        return _logp_and_entropy(logits, targets, sampling.temperature, floor)[0], floor

    logp, floor = _map_positions(model, fn, hidden, tokens[:, start:])
    pad = ((0, 0), (start, 0))
    return jnp.pad(logp, pad), jnp.pad(floor, pad, constant_values=-jnp.inf)


def shared_prefix_token_logp(model, tokens: jax.Array, prefix_len: int) -> jax.Array:
    """The log-probs of `shared_prefix_token_logp_and_entropy`."""
    return shared_prefix_token_logp_and_entropy(model, tokens, prefix_len)[0]


def common_prefix_length(tokens: np.ndarray, loss_mask: np.ndarray, bucket: int = PREFIX_BUCKET):
    """The longest prefix all rows share that carries no loss, rounded down to a
    multiple of `bucket` (0 when shorter than one bucket)."""
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    differs = np.any(tokens != tokens[:1], axis=0)
    shared = int(np.argmax(differs)) if differs.any() else tokens.shape[1]
    trained = np.any(loss_mask != 0, axis=0)
    first_trained = int(np.argmax(trained)) if trained.any() else tokens.shape[1]
    # Keep at least one position after the prefix.
    length = min(shared, first_trained, tokens.shape[1] - 1)
    return length // bucket * bucket
