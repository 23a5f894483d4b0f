"""DAPO overlong reward shaping and truncated-response masking (arXiv 2503.14476, sec. 3.4).

Lengths are token counts of the response (for a multi-turn episode: the tokens
counted against the generation budget, as the sampler reports them), never
characters.

Soft overlong punishment (DAPO sec. 3.4), added to the task reward:

    R_length(L) = 0                               if L <= L_max - L_cache
                = (L_max - L_cache - L) / L_cache if L_max - L_cache < L <= L_max
                = -1                              if L > L_max

Overlong filtering (DAPO sec. 3.4, "masking the loss of truncated samples"):
sequences that hit the length limit get an all-zero loss mask.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OverlongSettings:
    """max_length: L_max in tokens; cache_length: L_cache, the soft-punishment interval."""

    max_length: int
    cache_length: int

    def __post_init__(self):
        if self.max_length <= 0:
            raise ValueError(f"max_length must be a positive token count, got {self.max_length}.")
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(
                f"cache_length must be in (0, max_length={self.max_length}], "
                f"got {self.cache_length}."
            )


def overlong_penalty(lengths: Array, *, max_length: int, cache_length: int) -> Array:
    """Soft overlong punishment R_length(L) per sequence (formula in the module docstring).

    Args:
      lengths: [B] response lengths in tokens.
      max_length, cache_length: L_max and L_cache.

    Returns:
      [B] float32 penalties in [-1, 0], to add to the rewards.
    """
    settings = OverlongSettings(max_length=max_length, cache_length=cache_length)
    chex.assert_rank(lengths, 1)
    lengths = jnp.asarray(lengths, jnp.float32)
    expected = settings.max_length - settings.cache_length
    linear = (expected - lengths) / settings.cache_length
    penalty = jnp.where(lengths <= expected, 0.0, linear)
    return jnp.where(lengths > settings.max_length, -1.0, penalty)


def mask_truncated(mask: Array, truncated: Array) -> Array:
    """Zeroes the loss mask of truncated sequences (overlong filtering).

    Args:
      mask: [B, T] loss mask.
      truncated: [B] bool, True where generation stopped at the length limit.

    Returns:
      The mask with the rows of truncated sequences set to 0, same dtype.
    """
    chex.assert_rank([mask, truncated], [2, 1])
    chex.assert_axis_dimension(truncated, 0, mask.shape[0])
    keep = ~jnp.asarray(truncated, bool)
    return jnp.where(keep[:, None], mask, jnp.zeros_like(mask))
