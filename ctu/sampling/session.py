"""Multi-turn sampling sessions: per-row KV caches that grow turn by turn.

A `Session` owns a KV cache of `batch_size` rows (padded to a power of two) and
`max_len` slots. Each `generate(appends, params, rng)` call appends new tokens to the
rows that take part (the prompt on the first call; tool output or the user's reply
later), then samples a reply for each of them, continuing from the cache: a multi-turn
rollout never re-prefills its history.

Bookkeeping per row: `lengths[b]` slots of the cache hold the history fed so far; the
last sampled token is *pending* (not yet fed) and is fed first at the row's next append,
so the sampled tokens are part of the history exactly as sampled (token in, token out).

Appends are fed `prefill_chunk` columns per model call, so a long prompt never holds
logits for all its tokens at once. Each call runs on a KV window: a copy of the first W
slots (W a power of two >= `min_kv_window` holding every slot the call can fill), so
attention reads what the conversations use, not `max_len` slots. Rows can be given
per-call token limits.

A call whose rows all start empty (a wave's first turn) and share a prompt prefix (the
system turn) feeds that prefix once and copies its keys and values into each row
(`engine.shared_prefix_step`), then appends each row's own rest.

Compiles: the decode loop once per window size, the append step once per (append-length
bucket, window size), the shared prefix once per (multiple of `shared_prefix_multiple`,
window size); all bounded by max_len, shared by all sessions with the same model
structure, shapes and `SamplingConfig`, and reused when the weights change.
"""

import contextlib
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from ctu.models import KVCache
from ctu.sampling import engine
from ctu.sampling.buckets import append_bucket, batch_bucket, next_power_of_two
from ctu.sampling.settings import SamplingConfig
from ctu.sharding import BATCH_AXES, fit_spec, kv_cache_shardings

STOP = "stop"
LENGTH = "length"
_REASONS = {engine.STOP_REASON_STOP: STOP, engine.STOP_REASON_LENGTH: LENGTH}


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one `Session.generate` call sampled.

    Attributes:
      tokens: int32 `[batch_size, max_new_tokens]`, row b's sampled ids in
        `tokens[b, :num_tokens[b]]` (the stop token included), 0 after.
      logprobs: float32, same shape: log-prob of each sampled token under the sampling
        distribution (see `SamplingConfig`), 0 after `num_tokens[b]`.
      num_tokens: int32 `[batch_size]`.
      stop_reasons: per row "stop" (sampled a stop token), "length" (hit
        max_new_tokens or the cache is full; 0 tokens if the append did not fit), or
        None for rows that took no part in the call.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    num_tokens: np.ndarray
    stop_reasons: tuple[str | None, ...]

    def row_tokens(self, row: int) -> list[int]:
        return self.tokens[row, : self.num_tokens[row]].tolist()

    def row_logprobs(self, row: int) -> np.ndarray:
        return self.logprobs[row, : self.num_tokens[row]]


class Session:
    """Per-row KV caches for multi-turn sampling with one model structure."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        batch_size: int,
        max_len: int,
        sampling: SamplingConfig,
        cache_dtype=None,
        min_append_bucket: int = 16,
        prefill_chunk: int = 512,
        min_kv_window: int = 256,
        mesh: jax.sharding.Mesh | None = None,
        shared_prefix_multiple: int = 128,
    ):
        """Creates an empty session.

        Args:
          model: a `ctu.models.Qwen`; only its structure and config are kept, the
            weights are passed to every `generate` call.
          batch_size: number of rows (conversations).
          max_len: cache slots per row: the longest conversation, in tokens.
          sampling: sampling settings.
          cache_dtype: KV cache dtype; default the model's `KVCache.init` default.
          min_append_bucket: smallest padded append length.
          prefill_chunk: appended tokens per row fed in one model call; bounds the
            memory of the activations and attention scores. Appends longer than one
            chunk are padded to a multiple of it (`append_bucket`).
          min_kv_window: smallest KV window. A call runs on a copy of the first W slots
            of the cache, W the power of two (>= min_kv_window, <= max_len) that holds
            every slot the call can fill, so attention reads W slots, not max_len.
          mesh: the ("data", "fsdp", "tensor") mesh the weights live on, if any: the
            cache is created sharded (rows over data/fsdp, kv heads over tensor), inputs
            are placed batch-sharded and the steps run under the mesh.
          shared_prefix_multiple: when the rows of a call start empty and share a prompt
            prefix (the system turn of every rollout of a wave), it is fed once, not per
            row, cut to a multiple of this many tokens (fed that many at a time; one
            compilation per multiple). 0 feeds every row's prompt whole.
        """
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 tokens, got {max_len}.")
        if min_append_bucket < 1:
            raise ValueError(f"min_append_bucket must be >= 1, got {min_append_bucket}.")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}.")
        if min_kv_window < 1:
            raise ValueError(f"min_kv_window must be >= 1, got {min_kv_window}.")
        if shared_prefix_multiple < 0:
            raise ValueError(f"shared_prefix_multiple must be >= 0, got {shared_prefix_multiple}.")
        vocab = model.config.vocab_size
        outside = [t for t in sampling.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(
                f"stop_token_ids {outside} are outside the model's vocabulary [0, {vocab}): "
                "they could never be sampled, so no row would stop; take them from the "
                "tokenizer the model was trained with."
            )
        if max_len > model.config.max_position_embeddings:
            logging.warning(
                "max_len=%d is past the model's max_position_embeddings=%d: positions "
                "beyond it were never trained",
                max_len,
                model.config.max_position_embeddings,
            )
        self.sampling = sampling
        self.batch_size = batch_size
        self.max_len = max_len
        self.min_append_bucket = min_append_bucket
        self.prefill_chunk = prefill_chunk
        self.min_kv_window = min_kv_window
        self.shared_prefix_multiple = shared_prefix_multiple
        self.model_config = model.config
        self.graphdef = nnx.graphdef(model)
        self._rows = batch_bucket(batch_size)
        self.mesh = mesh

        def init_cache():
            return KVCache.init(self.model_config, self._rows, max_len, dtype=cache_dtype)

        if mesh is None:
            self._cache = init_cache()
        else:
            shardings = kv_cache_shardings(mesh, jax.eval_shape(init_cache))
            # Born sharded: a large cache never sits whole on one device.
            self._cache = jax.jit(init_cache, out_shardings=shardings)()
        self._lengths = np.zeros(self._rows, np.int32)
        self._pending: list[int | None] = [None] * self._rows
        self._history: list[list[int]] = [[] for _ in range(batch_size)]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens fed into each row's cache (not counting the pending sampled token)."""
        return self._lengths[: self.batch_size].copy()

    def history(self, row: int) -> list[int]:
        """Every token of row `row` so far, appended and sampled, in order."""
        return list(self._history[row])

    def _row_sharding(self, shape) -> jax.sharding.NamedSharding:
        """Rows over ("data", "fsdp") where they divide, everything else replicated."""
        names = (BATCH_AXES,) + (None,) * (len(shape) - 1)
        spec = fit_spec(names, tuple(shape), self.mesh.shape)
        return jax.sharding.NamedSharding(self.mesh, spec)

    def _shared_prefix(self, chunks: dict[int, list[int]]) -> list[int]:
        """The leading tokens that every row of this call appends to an empty cache, cut
        to a multiple of `shared_prefix_multiple` and leaving each row at least one token
        of its own; [] when there is nothing to share."""
        multiple = self.shared_prefix_multiple
        if not multiple or len(chunks) < 2:
            return []
        if any(self._lengths[row] or self._pending[row] is not None for row in chunks):
            return []
        rows = [np.asarray(chunk, np.int32) for chunk in chunks.values()]
        limit = min(len(r) for r in rows) - 1
        first = rows[0][:limit]
        same = np.ones(limit, bool)
        for row in rows[1:]:
            same &= row[:limit] == first
        shared = limit if same.all() else int(np.argmin(same))
        shared -= shared % multiple
        return first[:shared].tolist()

    def generate(
        self,
        appends: Sequence[Sequence[int] | None],
        params: nnx.State | nnx.Module,
        rng: jax.Array,
        *,
        max_new_tokens: int | Sequence[int] | None = None,
    ) -> Generation:
        """Appends tokens to each taking-part row and samples its continuation.

        Args:
          appends: one entry per row: the new token ids to append (the prompt on the
            first call), or None for a row that takes no part in this call (e.g. its
            episode is over). An empty list continues a row from its pending token.
          params: the current weights, `nnx.state(model)` (or the model itself); a new
            state with the same structure does not recompile.
          rng: PRNG key; the same key, weights and inputs give the same samples.
          max_new_tokens: a smaller limit for this call, for all rows or per row (e.g. an
            episode's remaining token budget), each in [1, sampling.max_new_tokens];
            default `sampling.max_new_tokens`. A traced value: changing it never recompiles.

        Returns:
          A `Generation`. A row whose append does not fit in its `max_len` slots gets 0
          tokens and stop reason "length", and its append is dropped.
        """
        if len(appends) != self.batch_size:
            raise ValueError(f"appends has {len(appends)} rows, the session has {self.batch_size}.")
        if isinstance(params, nnx.Module):
            params = nnx.state(params)
        budget = self.sampling.max_new_tokens
        limits = np.full(self._rows, budget, np.int32)
        if max_new_tokens is not None:
            limits[: self.batch_size] = np.broadcast_to(max_new_tokens, (self.batch_size,))
            if limits.min() < 1 or limits.max() > budget:
                raise ValueError(
                    f"max_new_tokens must be in [1, {budget}] (sampling.max_new_tokens, the "
                    f"compiled buffer size), got {max_new_tokens}."
                )
        vocab = self.model_config.vocab_size
        chunks: dict[int, list[int]] = {}
        appended: dict[int, list[int]] = {}
        overflow = set()
        for row, new in enumerate(appends):
            if new is None:
                continue
            new = [int(t) for t in new]
            if any(not 0 <= t < vocab for t in new):
                raise ValueError(f"row {row}: token ids must be in [0, {vocab}), got {new}.")
            pending = self._pending[row]
            chunk = ([] if pending is None else [pending]) + new
            if not chunk:
                raise ValueError(f"row {row} has no token to continue from: give its prompt first.")
            if self._lengths[row] + len(chunk) > self.max_len:
                overflow.add(row)
                continue
            chunks[row] = chunk
            appended[row] = new
        # Only once every row is valid: a refused call leaves the session as it was.
        for row, new in appended.items():
            self._history[row].extend(new)

        stop_reasons = [LENGTH if row in overflow else None for row in range(self.batch_size)]
        tokens = np.zeros((self.batch_size, budget), np.int32)
        logprobs = np.zeros((self.batch_size, budget), np.float32)
        num_tokens = np.zeros(self.batch_size, np.int32)
        if not chunks:
            return Generation(tokens, logprobs, num_tokens, tuple(stop_reasons))

        # The slots this call can fill: the append, then limits - 1 fed samples per row.
        needed = max(int(self._lengths[r] + len(c) + limits[r] - 1) for r, c in chunks.items())
        window = min(next_power_of_two(max(needed, self.min_kv_window)), self.max_len)
        start = self._lengths.copy()  # the slot each row's append starts at
        prefix = self._shared_prefix(chunks)
        if prefix:
            chunks = {row: chunk[len(prefix) :] for row, chunk in chunks.items()}
            start[list(chunks)] = len(prefix)

        width = append_bucket(
            max(len(c) for c in chunks.values()),
            minimum=self.min_append_bucket,
            maximum=self.max_len,
            step=self.prefill_chunk,
        )
        piece = min(width, self.prefill_chunk)
        width = -(-width // piece) * piece  # slots past max_len are dropped by the model
        chunk_tokens = np.zeros((self._rows, width), np.int32)
        num_new = np.zeros(self._rows, np.int32)
        for row, chunk in chunks.items():
            chunk_tokens[row, : len(chunk)] = chunk
            num_new[row] = len(chunk)
        positions = start[:, None] + np.arange(width, dtype=np.int32)[None, :]
        active = num_new > 0
        if self.mesh is not None:  # the caller's key may live on another mesh (a learner's)
            rng = jax.device_put(rng, jax.sharding.NamedSharding(self.mesh, P()))
        rng_append, rng_decode = jax.random.split(rng)
        lengths = start + num_new
        sharing = np.zeros(self._rows, bool)
        sharing[list(chunks)] = bool(prefix)
        if self.mesh is not None:
            chunk_tokens, positions, num_new, lengths, active, limits, sharing = (
                jax.device_put(x, self._row_sharding(x.shape))
                for x in (chunk_tokens, positions, num_new, lengths, active, limits, sharing)
            )
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if window < self.max_len:
                cache = engine.cache_window(self._cache, window=window)
            else:
                cache, self._cache = self._cache, None  # donated below
            if prefix:
                cache = engine.shared_prefix_step(
                    self.graphdef,
                    params,
                    cache,
                    np.asarray(prefix, np.int32)[None],
                    sharing,
                    chunk=self.shared_prefix_multiple,
                )
            cache, first_tokens, first_logprobs = engine.append_step(
                self.graphdef,
                params,
                cache,
                chunk_tokens,
                positions,
                num_new,
                rng_append,
                config=self.sampling,
                chunk=piece,
            )
            out = engine.decode_step(
                self.graphdef,
                params,
                cache,
                first_tokens,
                first_logprobs,
                lengths,
                active,
                limits,
                rng_decode,
                config=self.sampling,
            )
            if window < self.max_len:
                self._cache = engine.write_window(self._cache, out.pop("cache"))
            else:
                self._cache = out.pop("cache")
        out = jax.device_get(out)

        self._lengths = np.asarray(out["lengths"], np.int32).copy()
        for row in chunks:
            n = int(out["num_tokens"][row])
            sampled = out["tokens"][row, :n]
            self._history[row].extend(sampled.tolist())
            self._pending[row] = int(sampled[-1])
            tokens[row, :n] = sampled
            logprobs[row, :n] = out["logprobs"][row, :n]
            num_tokens[row] = n
            stop_reasons[row] = _REASONS[int(out["stop_reason"][row])]
        return Generation(tokens, logprobs, num_tokens, tuple(stop_reasons))
