"""Qwen2 / Qwen3 decoder in flax.nnx.

Weights are stored with one axis per named dimension (see ctu/sharding.py for the
letters), e.g. the query projection is `[d, n, h]`, so every matmul is an einsum whose
equation names the same dimensions as the weight's partition spec.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ctu.models.cache import KVCache
from ctu.models.config import ModelConfig
from ctu.sharding import DEFAULT_RULES, AxisNames, ShardingRules, shard

_init_weight = nnx.initializers.normal(stddev=0.02)


def _param(rngs: nnx.Rngs, shape, names: AxisNames, dtype, init=_init_weight) -> nnx.Param:
    # Sharding is metadata here; `ctu.sharding.create_sharded_model` applies it under a mesh.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) `[B, T, 1, H/2]` of the rotary angles at absolute `positions` `[B, T]`.

    Computed once per model call and shared by every layer's queries and keys.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding in the "rotate half" layout of Hugging Face Qwen.

    x: [B, T, heads, H]; rope: `rope_tables` of the tokens' positions.
    """
    sin, cos = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S]."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * h**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


# Query block of `attend_causal`. On 2 CPU cores the tiny model's gradient on 16 x 2048
# tokens takes 3.9 s at 128, 5.3 s at 256 and 13.3 s with the whole square (forward
# 1.0 / 1.3 / 4.4 s; docs/results.md section 4).
CAUSAL_BLOCK = 128


def attend_causal(q: jax.Array, k: jax.Array, v: jax.Array, block: int = CAUSAL_BLOCK):
    """`attend` under a causal mask (q, k, v of one sequence), a query block at a time.

    Queries [i, i + block) see only keys [0, i + block): the masked upper triangle,
    half of the T x T scores at T >> block, is neither computed nor kept for the
    backward pass, and each block's scores are small enough to stay in cache. The
    scores are what dominates a long sequence's forward and backward on CPU (the tiny
    model at T = 2048 took ~4x the time of the same tokens at T = 512 with the whole
    square). Equal to `attend` with a lower-triangular mask up to float rounding.
    """
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        outs.append(attend(q[:, start:end], k[:, :end], v[:, :end], mask[None]))
    return jnp.concatenate(outs, axis=1)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`attend` against a cache layer (the KVCache layout).

    q: [B, T, N, H]; k: [B, K, H, S]; v: [B, K, S, H]; mask: [B, T, S]. The T queries of
    a kv head's G query heads form one [T * G, H] matrix, so each (row, kv head) is two
    plain matmuls with its cache blocks as they lie: no transposed copy of the cache,
    and no size-1 T axis in the contraction (which XLA:CPU runs several times slower).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    groups = n // kv_heads
    q = (q * h**-0.5).reshape(b, t, kv_heads, groups, h).transpose(0, 2, 1, 3, 4)
    q = q.reshape(b, kv_heads, t * groups, h)
    logits = jnp.einsum("bkqh,bkhs->bkqs", q, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv_heads, t, groups, -1)
    logits = jnp.where(mask[:, None, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, kv_heads, t * groups, -1), v)
    return out.reshape(b, kv_heads, t, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in float32 as Hugging Face Qwen does."""

    def __init__(self, size: int, names: AxisNames, config: ModelConfig, *, rngs: nnx.Rngs):
        self.scale = _param(rngs, (size,), names, config.jnp_param_dtype, nnx.initializers.ones)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Self-attention with GQA, RoPE, optional q/k/v biases (Qwen2) or q/k norms (Qwen3)."""

    def __init__(self, config: ModelConfig, rules: ShardingRules, *, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dtype = config.jnp_param_dtype
        self.q_proj = _param(rngs, (d, n, h), rules.q_proj_dnh, dtype)
        self.k_proj = _param(rngs, (d, k, h), rules.kv_proj_dkh, dtype)
        self.v_proj = _param(rngs, (d, k, h), rules.kv_proj_dkh, dtype)
        self.o_proj = _param(rngs, (n, h, d), rules.o_proj_nhd, dtype)
        if config.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (n, h), rules.q_bias_nh, dtype, zeros)
            self.k_bias = _param(rngs, (k, h), rules.kv_bias_kh, dtype, zeros)
            self.v_bias = _param(rngs, (k, h), rules.kv_bias_kh, dtype, zeros)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if config.qk_norm:
            self.q_norm = RMSNorm(h, rules.norm_h, config, rngs=rngs)
            self.k_norm = RMSNorm(h, rules.norm_h, config, rngs=rngs)
        else:
            self.q_norm = self.k_norm = None
        self.dtype = config.jnp_dtype
        self.rules = rules

    def _project(self, x, weight, bias, norm):
        y = jnp.einsum("btd,dnh->btnh", x, weight[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        if norm is not None:
            y = norm(y)
        return y

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: KVCache | None,
        layer: int,
    ) -> tuple[jax.Array, KVCache | None]:
        q = self._project(x, self.q_proj, self.q_bias, self.q_norm)
        k = self._project(x, self.k_proj, self.k_bias, self.k_norm)
        v = self._project(x, self.v_proj, self.v_bias, None)
        q = shard(apply_rope(q, rope), self.rules.act_btnh)
        k = shard(apply_rope(k, rope), self.rules.act_btnh)
        v = shard(v, self.rules.act_btnh)
        if cache is None:  # the whole sequence from position 0: `mask` is causal
            out = attend_causal(q, k, v)
        else:
            cache = cache.update(layer, k, v, positions)
            k, v = cache.k[layer].astype(self.dtype), cache.v[layer].astype(self.dtype)
            out = attend_cache(q, k, v, mask)
        out = shard(out, self.rules.act_btnh)
        return jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(self.dtype)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rules: ShardingRules, *, rngs: nnx.Rngs):
        d, f, dtype = config.hidden_size, config.intermediate_size, config.jnp_param_dtype
        self.gate_proj = _param(rngs, (d, f), rules.ffw_df, dtype)
        self.up_proj = _param(rngs, (d, f), rules.ffw_df, dtype)
        self.down_proj = _param(rngs, (f, d), rules.ffw_fd, dtype)
        self.dtype = config.jnp_dtype
        self.rules = rules

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("btd,df->btf", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,df->btf", x, self.up_proj[...].astype(self.dtype))
        hidden = shard(jax.nn.silu(gate) * up, self.rules.act_btf)
        return jnp.einsum("btf,fd->btd", hidden, self.down_proj[...].astype(self.dtype))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig, rules: ShardingRules, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, rules.norm_d, config, rngs=rngs)
        self.attn = Attention(config, rules, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, rules.norm_d, config, rngs=rngs)
        self.mlp = MLP(config, rules, rngs=rngs)
        self.rules = rules

    def __call__(self, x, positions, rope, mask, cache, layer):
        attn_out, cache = self.attn(self.input_norm(x), positions, rope, mask, cache, layer)
        x = shard(x + attn_out, self.rules.act_btd)
        x = shard(x + self.mlp(self.post_attn_norm(x)), self.rules.act_btd)
        return x, cache


class Qwen(nnx.Module):
    """Qwen2/Qwen3 causal language model.

    `model(tokens)` is the training forward: tokens int32 [B, T] -> float32 logits
    [B, T, V], positions 0..T-1, causal. `model(tokens, positions=p, cache=c)` returns
    (logits, cache) following the KVCache contract (ctu/models/cache.py).
    `logit_positions` int32 [B, K] asks for the logits at those time indices only
    ([B, K, V]): a prefill that samples from each row's last token skips the
    vocabulary projection of every other position. `return_hidden=True` returns the
    final-norm hidden states [B, T, D] in place of the logits, for `project` to turn
    into logits a slice at a time (a 150k vocabulary's logits outweigh the model's).
    """

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, rules: ShardingRules = DEFAULT_RULES
    ):
        v, d = config.vocab_size, config.hidden_size
        self.config = config
        self.rules = rules
        self.embed = _param(rngs, (v, d), rules.embed_vd, config.jnp_param_dtype)
        self.layers = nnx.List([Block(config, rules, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(d, rules.norm_d, config, rngs=rngs)
        if config.smear:  # ModelConfig.smear: a gate per preceding token's embedding
            ones = nnx.initializers.ones
            shape, axes = (config.smear, d), (None, *rules.norm_d)
            self.smear = _param(rngs, shape, axes, config.jnp_param_dtype, ones)
        else:
            self.smear = None
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (d, v), rules.lm_head_dv, config.jnp_param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logit_positions: jax.Array | None = None,
        return_hidden: bool = False,
    ):
        batch, length = tokens.shape
        dtype = self.config.jnp_dtype
        if positions is None:
            if cache is not None:
                raise ValueError("A call with a cache needs positions [B, T] (absolute slots).")
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        if cache is None:
            mask = None  # causal: attend_causal masks block by block
        else:
            slots = jnp.arange(cache.max_len, dtype=positions.dtype)
            mask = slots[None, None, :] <= positions[:, :, None]

        # Gather from a table whole along d (as FSDP gathers every weight before use).
        table = shard(self.embed[...], self.rules.embed_lookup_vd)
        x = jnp.take(table, tokens, axis=0).astype(dtype)
        if self.smear is not None:
            width = self.config.smear
            if cache is None:  # before[b, t, k]: the token k + 1 places before (-1: none)
                padded = jnp.pad(tokens, ((0, 0), (width, 0)), constant_values=-1)
                before = jnp.stack(
                    [padded[:, width - k - 1 : width - k - 1 + length] for k in range(width)], -1
                )
            else:
                cache, before = cache.previous_tokens(tokens, positions, width)
            previous = jnp.take(table, jnp.maximum(before, 0), axis=0).astype(dtype)
            gates = jnp.where(before[..., None] >= 0, self.smear[...].astype(dtype), 0)
            x = x + jnp.sum(previous * gates, axis=2)
        x = shard(x, self.rules.act_btd)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        for layer, block in enumerate(self.layers):
            x, cache = block(x, positions, rope, mask, cache, layer)
        if logit_positions is not None:
            x = jnp.take_along_axis(x, logit_positions[..., None], axis=1)
        x = self.final_norm(x)
        out = x if return_hidden else self.project(x)
        return out if cache is None else (out, cache)

    def project(self, x: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, T, D] -> float32 logits [B, T, V]."""
        if self.lm_head is None:
            head, equation = self.embed[...], "btd,vd->btv"
        else:
            head, equation = self.lm_head[...], "btd,dv->btv"
        dtype = self.config.jnp_dtype
        logits = jnp.einsum(equation, x, head.astype(dtype), preferred_element_type=jnp.float32)
        return shard(logits, self.rules.act_btv)
