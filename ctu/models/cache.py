"""KVCache: per-layer keys and values indexed by absolute position (slot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ctu.models.config import DTYPES, ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values, each `[num_layers, batch, max_len, num_kv_heads, head_dim]`.

    Slot `j` of row `b` holds the key/value of the token at absolute position `j`.
    A model call with a cache writes token `(b, t)` into slot `positions[b, t]`
    (positions outside `[0, max_len)` are dropped) and lets query `(b, t)` see slots
    `j <= positions[b, t]`. Stale slots beyond a row's length are hidden by that rule
    until the caller overwrites them.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        """An all-zero cache; `dtype` defaults to the model's compute dtype."""
        dtype = DTYPES[config.dtype] if dtype is None else dtype
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
        """Writes k/v `[B, T, K, H]` of `layer` into slots `positions` `[B, T]`."""
        # Negative positions would wrap around; send them out of range so they drop.
        slots = jnp.where(positions < 0, self.max_len, positions)
        rows = jnp.arange(self.batch)[:, None]
        return KVCache(
            k=self.k.at[layer, rows, slots].set(k.astype(self.k.dtype), mode="drop"),
            v=self.v.at[layer, rows, slots].set(v.astype(self.v.dtype), mode="drop"),
        )
