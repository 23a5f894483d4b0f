"""KVCache: per-layer keys and values indexed by absolute position (slot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ctu.models.config import DTYPES, ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values, one array per layer: keys `[batch, num_kv_heads, head_dim, max_len]`,
    values `[batch, num_kv_heads, max_len, head_dim]`.

    The layout is chosen for decode (docs/architecture.md, KV-cache contract):
    - One array per layer, not one stacked `[num_layers, ...]` array: a layer's write
      updates its own buffer in place and its attention reads that buffer directly, with
      no per-step copy of a layer's slice out of the stack.
    - Heads before slots, so each (row, kv head) is one contiguous matrix; keys stored
      transposed, so both attention matmuls, q @ K^T `[.., H] x [H, S]` and
      p @ V `[.., S] x [S, H]`, read their cache operand as it lies.

    Slot `j` of row `b` holds the key/value of the token at absolute position `j`.
    A model call with a cache writes token `(b, t)` into slot `positions[b, t]`
    (positions outside `[0, max_len)` are dropped) and lets query `(b, t)` see slots
    `j <= positions[b, t]`. Stale slots beyond a row's length are hidden by that rule
    until the caller overwrites them.

    `tokens` `[batch, max_len]` int32, only for a `ModelConfig.smear` model (else None):
    the token id in each slot, written by the same rule, from which a call finds the
    predecessors of its first tokens.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    tokens: jax.Array | None = None

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An all-zero cache; `dtype` defaults to the model's compute dtype."""
        dtype = DTYPES[config.dtype] if dtype is None else dtype
        k_shape = (batch, config.num_kv_heads, config.head_dim, max_len)
        v_shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        layers = range(config.num_layers)
        return cls(
            k=tuple(jnp.zeros(k_shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(v_shape, dtype) for _ in layers),
            tokens=jnp.zeros((batch, max_len), jnp.int32) if config.smear else None,
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    def window(self, slots: int) -> KVCache:
        """The first `slots` slots of every row and layer."""
        return KVCache(
            k=tuple(x[..., :slots] for x in self.k),
            v=tuple(x[:, :, :slots] for x in self.v),
            tokens=None if self.tokens is None else self.tokens[:, :slots],
        )

    def grow(self, max_len: int) -> KVCache:
        """The same cache with `max_len` slots; the new slots are zeros."""
        extra = max_len - self.max_len
        if extra < 0:
            raise ValueError(f"cannot grow a cache of {self.max_len} slots to {max_len}.")
        return KVCache(
            k=tuple(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) for x in self.k),
            v=tuple(jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in self.v),
            tokens=None if self.tokens is None else jnp.pad(self.tokens, ((0, 0), (0, extra))),
        )

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
        """Writes k/v `[B, T, K, H]` of `layer` into slots `positions` `[B, T]`."""
        slots, rows = self._slots(positions)

        # Both index expressions select [B, T, K, H]: advanced indices split by slices
        # put their broadcast shape [B, T] first.
        new_k = self.k[layer].at[rows, :, :, slots].set(k.astype(self.k[layer].dtype), mode="drop")
        new_v = self.v[layer].at[rows, :, slots].set(v.astype(self.v[layer].dtype), mode="drop")
        return self.replace(
            k=(*self.k[:layer], new_k, *self.k[layer + 1 :]),
            v=(*self.v[:layer], new_v, *self.v[layer + 1 :]),
        )

    def previous_tokens(self, tokens: jax.Array, positions: jax.Array, width: int = 1):
        """Writes `tokens` `[B, T]` into slots `positions` and returns the cache with
        the ids of the `width` tokens before each, `[B, T, width]` (`[..., k]` is k + 1
        places before; -1 where that is before position 0)."""
        if self.tokens is None:
            raise ValueError("this KVCache keeps no token ids: init it for a smear model.")
        slots, rows = self._slots(positions)
        written = self.tokens.at[rows, slots].set(tokens, mode="drop")
        back = positions[..., None] - jnp.arange(1, width + 1, dtype=positions.dtype)
        slot = jnp.clip(back, 0, self.max_len - 1).reshape(self.batch, -1)
        before = jnp.take_along_axis(written, slot, 1).reshape(back.shape)
        return self.replace(tokens=written), jnp.where(back >= 0, before, -1)

    def _slots(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Negative positions would wrap around; send them out of range so they drop.
        return jnp.where(positions < 0, self.max_len, positions), jnp.arange(self.batch)[:, None]
