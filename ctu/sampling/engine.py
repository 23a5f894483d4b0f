"""The two jitted steps of the sampler: append (prefill) and decode.

`append_step` feeds a right-padded chunk of new tokens per row into the KV cache and
samples each row's first new token from the logits at its last real token. `decode_step`
then runs the whole decode loop inside one `jax.lax.while_loop`: each iteration feeds
one token per row at its next slot and samples the next one, until every row has
sampled a stop token, reached `max_new_tokens`, or filled its cache.

Both take the model as (graphdef, state): the graphdef and the `SamplingConfig` are
static, the state (weights) is a traced argument, so new weights after an RL step reuse
the compiled code. The cache is donated and updated in place. `cache_window` and
`write_window` copy a cache's first W slots out and back, so a call whose rows fit in W
slots runs (and attends) on W slots only.

Slot conventions (docs/architecture.md, KV-cache contract): slots are absolute
positions. A row's `lengths[b]` slots hold its history; everything from slot
`lengths[b]` on is scratch that causality hides and later writes overwrite, so padding
and finished rows may write there freely (writes past the end are dropped).
"""

import collections
import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ctu.models import KVCache
from ctu.sampling.filters import sample_tokens
from ctu.sampling.settings import SamplingConfig
from ctu.sharding import DATA_AXIS

# Number of times each step was traced (i.e. compiled), for tests and benchmarks.
TRACE_COUNTS: collections.Counter = collections.Counter()

STOP_REASON_STOP = 1
STOP_REASON_LENGTH = 2


@functools.partial(jax.jit, static_argnames=("window",))
def cache_window(cache, window: int):
    """A copy of the first `window` slots of every row of `cache`."""
    return cache.window(window)


@functools.partial(jax.jit, donate_argnames=("cache",))
def write_window(cache, window_cache):
    """Writes `window_cache` (from `cache_window`) back over the first slots of `cache`."""
    return jax.tree.map(
        lambda full, part: jax.lax.dynamic_update_slice(full, part, (0,) * full.ndim),
        cache,
        window_cache,
    )


def _is_stop(tokens: jax.Array, config: SamplingConfig) -> jax.Array:
    if not config.stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(config.stop_token_ids, jnp.int32))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config", "chunk"), donate_argnames=("cache",)
)
def append_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache,
    tokens: jax.Array,
    positions: jax.Array,
    num_new: jax.Array,
    rng: jax.Array,
    config: SamplingConfig,
    chunk: int,
):
    """Feeds the appended tokens and samples the first new token of every row.

    The tokens are fed `chunk` columns at a time (a `lax.scan`), so the attention
    scores of one piece are all that is live, and only each row's last real token is
    projected onto the vocabulary (`[batch, 1, vocab]` per piece).

    Args:
      graphdef, state: the model, split with `nnx.split`.
      cache: the `KVCache` (donated).
      tokens: int32 `[batch, T]`, right-padded; T a multiple of `chunk`.
      positions: int32 `[batch, T]`, the slot of every token (`lengths[b] + t`).
      num_new: int32 `[batch]`, real tokens per row; rows with 0 are not sampled from
        (their sample is garbage and must be ignored).
      rng: PRNG key for this call.
      config: sampling settings.
      chunk: columns fed per model call.

    Returns:
      (cache, first_tokens int32 `[batch]`, first_logprobs float32 `[batch]`).
    """
    TRACE_COUNTS["append_step"] += 1
    chex.assert_rank([tokens, positions, num_new], [2, 2, 1])
    chex.assert_equal_shape([tokens, positions])
    batch, width = tokens.shape
    if width % chunk:
        raise ValueError(f"append width {width} is not a multiple of the chunk {chunk}.")
    model = nnx.merge(graphdef, state)

    def pieces(x):  # [batch, n * chunk] -> [n, batch, chunk]
        return x.reshape(batch, width // chunk, chunk).swapaxes(0, 1)

    def feed(carry, piece):
        cache, last_logits = carry
        start, piece_tokens, piece_positions = piece
        last = num_new - 1 - start  # each row's last real token, relative to this piece
        here, cache = model(
            piece_tokens,
            positions=piece_positions,
            cache=cache,
            logit_positions=jnp.clip(last, 0, chunk - 1)[:, None],
        )
        last_logits = jnp.where(((last >= 0) & (last < chunk))[:, None], here[:, 0], last_logits)
        return (cache, last_logits), None

    starts = jnp.arange(0, width, chunk, dtype=jnp.int32)
    init = (cache, jnp.zeros((batch, model.config.vocab_size), jnp.float32))
    (cache, last_logits), _ = jax.lax.scan(feed, init, (starts, pieces(tokens), pieces(positions)))
    first_tokens, first_logprobs = sample_tokens(rng, last_logits, config)
    return cache, first_tokens, first_logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnames=("cache",))
def shared_prefix_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache,
    prefix: jax.Array,
    rows: jax.Array,
    chunk: int,
):
    """Feeds a prompt prefix that several rows share once, into all of them.

    The prefix runs as one row on a cache of its own length, `chunk` columns at a time,
    and its keys, values (and token ids) are then copied into slots `[0, P)` of every
    row with `rows[b]`; the other rows keep their cache. Those rows must be empty (a
    prefix starts at slot 0); the caller then appends each row's rest from slot P.

    Args:
      graphdef, state: the model, split with `nnx.split`.
      cache: the `KVCache` (donated), at least P slots.
      prefix: int32 `[1, P]`, every token real; P a multiple of `chunk`.
      rows: bool `[batch]`, the rows that start with `prefix`.
      chunk: columns fed per model call.
    """
    TRACE_COUNTS["shared_prefix_step"] += 1
    length = prefix.shape[1]
    if length % chunk:
        raise ValueError(f"prefix length {length} is not a multiple of the chunk {chunk}.")
    model = nnx.merge(graphdef, state)
    one = KVCache.init(model.config, 1, length, dtype=cache.k[0].dtype)

    def feed(one, start):
        piece = jax.lax.dynamic_slice_in_dim(prefix, start, chunk, axis=1)
        positions = start + jnp.arange(chunk, dtype=jnp.int32)[None]
        last = jnp.zeros((1, 1), jnp.int32)  # no logits wanted: the cheapest one
        _, one = model(piece, positions=positions, cache=one, logit_positions=last)
        return one, None

    one, _ = jax.lax.scan(feed, one, jnp.arange(0, length, chunk, dtype=jnp.int32))

    def copy(full, part, slot_axis):
        head = jax.lax.slice_in_dim(full, 0, length, axis=slot_axis)
        mask = rows.reshape((-1,) + (1,) * (full.ndim - 1))
        head = jnp.where(mask, jnp.broadcast_to(part, head.shape), head)
        return jax.lax.dynamic_update_slice_in_dim(full, head, 0, axis=slot_axis)

    return cache.replace(
        k=tuple(copy(full, part, 3) for full, part in zip(cache.k, one.k, strict=True)),
        v=tuple(copy(full, part, 2) for full, part in zip(cache.v, one.v, strict=True)),
        tokens=None if cache.tokens is None else copy(cache.tokens, one.tokens, 1),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("cache",))
def decode_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache,
    first_tokens: jax.Array,
    first_logprobs: jax.Array,
    lengths: jax.Array,
    active: jax.Array,
    limits: jax.Array,
    rng: jax.Array,
    config: SamplingConfig,
):
    """Decodes up to `limits[b]` tokens per active row in one while_loop.

    Under a mesh (`jax.set_mesh`) that only splits "data" (fsdp and tensor of size 1),
    each device runs its own loop over its rows (`jax.shard_map`): no device waits on
    the others between tokens (the SPMD loop all-reduces its stop condition every
    token), and a shard stops as soon as its own rows are done. Rows sample from keys
    folded with their index in the whole batch, so the tokens do not depend on the
    split. With fsdp or tensor above 1 the loop stays one SPMD program.

    Args:
      graphdef, state: the model, split with `nnx.split`.
      cache: the `KVCache` (donated); `cache.max_len` is the slot capacity.
      first_tokens, first_logprobs: `[batch]`, from `append_step`.
      lengths: int32 `[batch]`, slots filled per row after the append.
      active: bool `[batch]`, rows that sample in this call.
      limits: int32 `[batch]`, most tokens per row, in [1, config.max_new_tokens].
      rng: PRNG key for this call (must differ from the one given to `append_step`).
      config: sampling settings.

    Returns:
      A dict of `cache`, `tokens` int32 `[batch, max_new_tokens]` (0 past `num_tokens`),
      `logprobs` float32 (same shape, 0 past `num_tokens`), `num_tokens` int32 `[batch]`,
      `lengths` int32 `[batch]` (slots filled; the last sampled token is not yet fed) and
      `stop_reason` int32 `[batch]` (STOP_REASON_STOP | STOP_REASON_LENGTH, 0 if inactive).
    """
    TRACE_COUNTS["decode_step"] += 1
    chex.assert_rank([first_tokens, first_logprobs, lengths, active, limits], 1)
    args = (state, cache, first_tokens, first_logprobs, lengths, active, limits, rng)
    loop = functools.partial(_decode_loop, graphdef=graphdef, config=config)
    shards = _data_shards()
    if shards == 1 or first_tokens.shape[0] % shards:
        return loop(*args, first_row=0)

    def shard_loop(*shard_args):
        first_row = jax.lax.axis_index(DATA_AXIS) * shard_args[2].shape[0]
        return loop(*shard_args, first_row=first_row)

    rows = P(DATA_AXIS)
    return jax.shard_map(
        shard_loop, in_specs=(P(), rows, rows, rows, rows, rows, rows, P()), out_specs=rows
    )(*args)


def _data_shards() -> int:
    """Devices on the "data" axis of the mesh in context, if it splits nothing else
    (XLA's partitioner cannot mix this manual loop with automatic fsdp/tensor axes);
    else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    if any(size > 1 for name, size in mesh.shape.items() if name != DATA_AXIS):
        return 1
    return mesh.shape[DATA_AXIS]


def _decode_loop(
    state,
    cache,
    first_tokens,
    first_logprobs,
    lengths,
    active,
    limits,
    rng,
    *,
    first_row,
    graphdef: nnx.GraphDef,
    config: SamplingConfig,
):
    """`decode_step` on rows `first_row ..` of the whole batch (all of it, or a shard)."""
    batch, capacity, budget = first_tokens.shape[0], cache.max_len, config.max_new_tokens
    model = nnx.merge(graphdef, state)
    rows = first_row + jnp.arange(batch, dtype=jnp.int32)

    def can_continue(running, num_tokens, lengths):
        # The next token needs a free slot for the one just sampled.
        return running & (num_tokens < limits) & (lengths < capacity)

    out_tokens = (
        jnp.zeros((batch, budget), jnp.int32).at[:, 0].set(jnp.where(active, first_tokens, 0))
    )
    out_logprobs = (
        jnp.zeros((batch, budget), jnp.float32).at[:, 0].set(jnp.where(active, first_logprobs, 0.0))
    )
    num_tokens = active.astype(jnp.int32)
    stopped = active & _is_stop(first_tokens, config)
    running = can_continue(active & ~stopped, num_tokens, lengths)

    def cond(c):
        return (c["step"] < budget) & jnp.any(c["running"])

    def body(c):
        running = c["running"]
        # Rows that are not running write their token into their first scratch slot.
        logits, cache = model(c["last"][:, None], positions=c["lengths"][:, None], cache=c["cache"])
        rng_step = jax.random.fold_in(rng, c["step"])
        tokens, logprobs = sample_tokens(rng_step, logits[:, 0], config, rows)
        hit_stop = running & _is_stop(tokens, config)
        lengths = c["lengths"] + running
        num_tokens = c["num_tokens"] + running
        return dict(
            step=c["step"] + 1,
            cache=cache,
            last=jnp.where(running, tokens, c["last"]),
            lengths=lengths,
            tokens=c["tokens"].at[:, c["step"]].set(jnp.where(running, tokens, 0)),
            logprobs=c["logprobs"].at[:, c["step"]].set(jnp.where(running, logprobs, 0.0)),
            num_tokens=num_tokens,
            running=can_continue(running & ~hit_stop, num_tokens, lengths),
            stopped=c["stopped"] | hit_stop,
        )

    c = jax.lax.while_loop(
        cond,
        body,
        dict(
            step=jnp.int32(1),
            cache=cache,
            last=first_tokens,
            lengths=lengths,
            tokens=out_tokens,
            logprobs=out_logprobs,
            num_tokens=num_tokens,
            running=running,
            stopped=stopped,
        ),
    )
    stop_reason = jnp.where(
        active, jnp.where(c["stopped"], STOP_REASON_STOP, STOP_REASON_LENGTH), 0
    ).astype(jnp.int32)
    return dict(
        cache=c["cache"],
        tokens=c["tokens"],
        logprobs=c["logprobs"],
        num_tokens=c["num_tokens"],
        lengths=c["lengths"],
        stop_reason=stop_reason,
    )
