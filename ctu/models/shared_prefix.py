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

# Prefix lengths are rounded down to a multiple of this to bound recompiles.
PREFIX_BUCKET = 64


def shared_prefix_logits(model, tokens: jax.Array, prefix_len: int) -> jax.Array:
    """Logits at positions `prefix_len - 1 .. T - 1`: `[B, T - prefix_len + 1, V]`.

    All rows must hold the same `tokens[:, :prefix_len]`; `prefix_len` is static.
    """
    batch, length = tokens.shape
    if not 0 < prefix_len < length:
        raise ValueError(f"prefix_len={prefix_len} must be in (0, {length}).")
    # The prefix attends over its own slots only; the cache then grows to `length` slots
    # (zeros, hidden by causality until the suffix writes them) and is shared by all rows.
    cache = KVCache.init(model.config, batch=1, max_len=prefix_len)
    prefix_logits, cache = model(
        tokens[:1, :prefix_len], positions=jnp.arange(prefix_len)[None], cache=cache
    )
    cache = cache.grow(length)
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch, *x.shape[1:])), cache)
    positions = jnp.broadcast_to(jnp.arange(prefix_len, length)[None], (batch, length - prefix_len))
    suffix_logits, _ = model(tokens[:, prefix_len:], positions=positions, cache=cache)
    last = jnp.broadcast_to(prefix_logits[:, -1:], (batch, 1, prefix_logits.shape[-1]))
    return jnp.concatenate([last, suffix_logits], axis=1)


def shared_prefix_token_logp_and_entropy(
    model, tokens: jax.Array, prefix_len: int, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs and entropies `[B, T]` aligned with `tokens`
    (docs/architecture.md: the value at t is about token t, predicted at t - 1),
    0 before `prefix_len`; with prefix_len 0, the plain forward.

    `temperature` divides the logits first: the distribution a sampler at that
    temperature draws from, whose log-probs it reports as the behaviour's."""
    if prefix_len == 0:
        logits, start = model(tokens)[:, :-1], 1
    else:
        logits, start = shared_prefix_logits(model, tokens, prefix_len)[:, :-1], prefix_len
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(log_probs, tokens[:, start:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    pad = ((0, 0), (start, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


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
