"""ModelConfig, the Qwen forward pass and the KV-cache contract."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from ctu.models import PRESETS, KVCache, ModelConfig, Qwen, qwen
from tests import toys

# Published sizes: (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied).
REAL_SIZES = {
    "qwen2p5_0p5b": (896, 24, 14, 2, 64, 4864, 151936, True),
    "qwen2p5_1p5b": (1536, 28, 12, 2, 128, 8960, 151936, True),
    "qwen2p5_7b": (3584, 28, 28, 4, 128, 18944, 152064, False),
    "qwen3_0p6b": (1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3_1p7b": (2048, 28, 16, 8, 128, 6144, 151936, True),
    "qwen3_8b": (4096, 36, 32, 8, 128, 12288, 151936, False),
}
# Parameter counts of the released checkpoints, in billions.
REAL_PARAMS_B = {
    "qwen2p5_0p5b": 0.494,
    "qwen2p5_1p5b": 1.544,
    "qwen2p5_7b": 7.616,
    "qwen3_0p6b": 0.596,
    "qwen3_1p7b": 1.721,
    "qwen3_8b": 8.191,
}


class ConfigTest(chex.TestCase):
    @parameterized.parameters(*REAL_SIZES)
    def test_real_presets(self, name):
        config = ModelConfig.preset(name)
        sizes = (
            config.hidden_size,
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.intermediate_size,
            config.vocab_size,
            config.tie_word_embeddings,
        )
        self.assertEqual(sizes, REAL_SIZES[name])
        self.assertEqual(config.rope_theta, 1_000_000.0)
        self.assertEqual(config.qkv_bias, name.startswith("qwen2"))
        self.assertEqual(config.qk_norm, name.startswith("qwen3"))
        self.assertAlmostEqual(config.num_params() / 1e9, REAL_PARAMS_B[name], delta=0.01)

    @parameterized.parameters(*PRESETS)
    def test_hf_dict_round_trip(self, name):
        config = ModelConfig.preset(name)
        self.assertEqual(ModelConfig.from_hf_dict(config.to_hf_dict()), config)

    def test_transformers_5_rope_parameters(self):
        hf = ModelConfig.preset("qwen3_0p6b").to_hf_dict()
        del hf["rope_theta"]
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
        self.assertEqual(ModelConfig.from_hf_dict(hf).rope_theta, 123.0)

    def test_replace_vocab_and_validation(self):
        config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=300)
        self.assertEqual(config.vocab_size, 300)
        with self.assertRaisesRegex(ValueError, "num_kv_heads"):
            ModelConfig.preset("tiny", num_kv_heads=3)
        with self.assertRaisesRegex(ValueError, "vocab_size"):
            ModelConfig.preset("tiny", vocab_size=0)
        with self.assertRaisesRegex(ValueError, "dtype"):
            ModelConfig.preset("tiny", dtype="float8")
        with self.assertRaisesRegex(ValueError, "Unknown model preset"):
            ModelConfig.preset("gpt2")
        with self.assertRaisesRegex(ValueError, "rope_type"):
            hf = ModelConfig.preset("tiny").to_hf_dict()
            hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}
            ModelConfig.from_hf_dict(hf)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def _reference_logits(model, rows):
    """Full causal forward without a cache; right padding cannot reach earlier positions."""
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    logits = np.asarray(forward(model, jnp.asarray(tokens)))
    return [logits[b, : len(row)] for b, row in enumerate(rows)]


class ForwardTest(chex.TestCase):
    def test_shapes_dtypes_and_tied_head(self):
        config = toys.tiny_model_config(vocab_size=50)
        model = toys.tiny_model(config)
        tokens = jnp.zeros((3, 7), jnp.int32)
        logits = forward(model, tokens)
        chex.assert_shape(logits, (3, 7, 50))
        chex.assert_type(logits, jnp.float32)
        self.assertIsNone(model.lm_head)
        untied = Qwen(dataclasses.replace(config, tie_word_embeddings=False), rngs=nnx.Rngs(0))
        chex.assert_shape(untied.lm_head[...], (config.hidden_size, 50))

    def test_causal(self):
        model = toys.tiny_model(weight_scale=4.0)
        tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 128)
        changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 128)
        a, b = forward(model, tokens), forward(model, changed)
        np.testing.assert_array_equal(a[:, :6], b[:, :6])
        self.assertGreater(float(jnp.abs(a[:, 6:] - b[:, 6:]).max()), 1e-3)

    @parameterized.parameters(True, False)
    def test_logit_positions_pick_rows_of_the_full_logits(self, tied):
        config = dataclasses.replace(toys.tiny_model_config(), tie_word_embeddings=tied)
        model = Qwen(config, rngs=nnx.Rngs(1))
        tokens = jax.random.randint(jax.random.key(0), (3, 9), 0, 128)
        picks = jnp.array([[8, 0], [3, 3], [5, 1]], jnp.int32)
        full = forward(model, tokens)
        got = model(tokens, logit_positions=picks)
        chex.assert_shape(got, (3, 2, config.vocab_size))
        want = jnp.take_along_axis(full, picks[..., None], axis=1)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    def test_bfloat16_close_to_float32(self):
        config = toys.tiny_model_config()
        model32 = toys.tiny_model(config, weight_scale=3.0)
        config16 = dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16")
        model16 = nnx.eval_shape(lambda: Qwen(config16, rngs=nnx.Rngs(0)))
        nnx.update(model16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model32)))
        self.assertEqual(model16.layers[0].attn.q_proj[...].dtype, jnp.bfloat16)
        tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 128)
        want, got = forward(model32, tokens), forward(model16, tokens)
        chex.assert_type(got, jnp.float32)
        scale = float(jnp.abs(want).max())
        self.assertLess(float(jnp.abs(got - want).max()), 0.05 * scale)


class KVCacheTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.config = toys.tiny_model_config(vocab_size=128)
        self.model = toys.tiny_model(self.config, weight_scale=4.0)
        self.rng = np.random.default_rng(0)

    def _step(self):
        @nnx.jit(donate_argnames="cache")
        def step(model, tokens, positions, cache):
            return model(tokens, positions=positions, cache=cache)

        return step

    def test_init_shape(self):
        cache = KVCache.init(self.config, batch=3, max_len=20, dtype=jnp.bfloat16)
        self.assertEqual((cache.num_layers, cache.batch, cache.max_len), (2, 3, 20))
        chex.assert_shape(cache.k, (3, 2, 32, 20))  # keys [B, K, H, S]
        chex.assert_shape(cache.v, (3, 2, 20, 32))  # values [B, K, S, H]
        chex.assert_type(jax.tree.leaves(cache), jnp.bfloat16)
        self.assertLen(jax.tree.leaves(cache), 4)

    def _full_cache(self, slots: int) -> KVCache:
        """A 2-row cache whose `slots` slots all hold random tokens' keys and values."""
        tokens = jnp.asarray(self.rng.integers(1, 128, (2, slots)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (2, slots))
        cache = KVCache.init(self.config, batch=2, max_len=slots)
        return self._step()(self.model, tokens, positions, cache)[1]

    def test_window_keeps_the_first_slots_of_keys_and_values(self):
        cache = self._full_cache(8)
        window = cache.window(5)
        self.assertEqual(window.max_len, 5)
        for full, part in zip(cache.k, window.k, strict=True):
            np.testing.assert_array_equal(part, full[..., :5])
        for full, part in zip(cache.v, window.v, strict=True):
            np.testing.assert_array_equal(part, full[:, :, :5])

    def test_grow_keeps_the_slots_and_adds_zeros(self):
        cache = self._full_cache(4)
        grown = cache.grow(7)
        self.assertEqual(grown.max_len, 7)
        np.testing.assert_array_equal(grown.window(4).k, cache.k)
        np.testing.assert_array_equal(grown.window(4).v, cache.v)
        for k, v in zip(grown.k, grown.v, strict=True):
            self.assertFalse(np.any(k[..., 4:]) or np.any(v[:, :, 4:]))
        with self.assertRaisesRegex(ValueError, "grow"):
            cache.grow(3)

    @parameterized.named_parameters(("plain", 0), ("smear", 1), ("smear3", 3))
    def test_ragged_prefill_decode_and_continuation(self, smear):
        """Right-padded ragged prefill, token-by-token decode, then a ragged chunk.

        A smear model's calls must find each chunk's first predecessors in the cache
        (with width 3 they reach back across the 1-token decode chunks)."""
        if smear:
            self.config = dataclasses.replace(self.config, smear=smear)
            self.model = toys.tiny_model(self.config, weight_scale=4.0)
        prompt_lens, decode_steps, chunk_lens = [7, 3, 1], 4, [2, 5, 3]
        rows = [list(self.rng.integers(1, 128, n)) for n in prompt_lens]
        step = self._step()
        batch, max_len = len(rows), 24
        cache = KVCache.init(self.config, batch=batch, max_len=max_len)
        got = [[] for _ in rows]

        def run(chunks, starts):
            nonlocal cache
            width = max(len(c) for c in chunks)
            tokens = np.zeros((batch, width), np.int32)  # right padding: token 0
            for b, chunk in enumerate(chunks):
                tokens[b, : len(chunk)] = chunk
            positions = np.asarray(starts)[:, None] + np.arange(width)[None]
            logits, cache = step(self.model, jnp.asarray(tokens), jnp.asarray(positions), cache)
            for b, chunk in enumerate(chunks):
                got[b].extend(np.asarray(logits[b, : len(chunk)]))

        run(rows, [0] * batch)
        lengths = list(prompt_lens)
        for _ in range(decode_steps):
            new = [[int(self.rng.integers(1, 128))] for _ in rows]
            run(new, lengths)
            for b in range(batch):
                rows[b] += new[b]
                lengths[b] += 1
        chunks = [list(self.rng.integers(1, 128, n)) for n in chunk_lens]
        run(chunks, lengths)
        for b in range(batch):
            rows[b] += chunks[b]

        for b, want in enumerate(_reference_logits(self.model, rows)):
            np.testing.assert_allclose(np.stack(got[b]), want, atol=1e-4, rtol=0)

    def test_decode_compiles_once(self):
        step = self._step()
        cache = KVCache.init(self.config, batch=2, max_len=8)
        step = chex.assert_max_traces(step, n=1)
        for t in range(4):
            positions = jnp.full((2, 1), t, jnp.int32)
            _, cache = step(self.model, jnp.ones((2, 1), jnp.int32), positions, cache)

    def test_out_of_range_slots_are_dropped(self):
        cache = KVCache.init(self.config, batch=2, max_len=4)
        tokens = jnp.ones((2, 3), jnp.int32)
        positions = jnp.asarray([[0, 1, 2], [4, 5, -1]], jnp.int32)
        _, cache = self._step()(self.model, tokens, positions, cache)
        written = sum(np.abs(np.asarray(k)).sum(axis=(1, 2)) for k in cache.k)  # [B, S]
        np.testing.assert_array_equal(written[0] > 0, [True, True, True, False])
        np.testing.assert_array_equal(written[1], 0)

    def test_smear_cache_keeps_token_ids_through_window_and_grow(self):
        config = dataclasses.replace(self.config, smear=1)
        tokens = jnp.asarray([[5, 6, 7], [8, 9, 10]], jnp.int32)
        cache = KVCache.init(config, batch=2, max_len=4)
        positions = jnp.asarray([[0, 1, 2], [1, 2, -1]], jnp.int32)
        _, two_back = cache.previous_tokens(tokens, positions, width=2)
        cache, before = cache.previous_tokens(tokens, positions)
        np.testing.assert_array_equal(cache.tokens, [[5, 6, 7, 0], [0, 8, 9, 0]])
        np.testing.assert_array_equal(before[..., 0], [[-1, 5, 6], [0, 8, -1]])
        np.testing.assert_array_equal(two_back[..., 1], [[-1, -1, 5], [-1, 0, -1]])
        np.testing.assert_array_equal(cache.grow(6).tokens[:, 4:], 0)
        np.testing.assert_array_equal(cache.window(2).tokens, [[5, 6], [0, 8]])
        self.assertIsNone(KVCache.init(self.config, batch=1, max_len=4).tokens)
        with self.assertRaisesRegex(ValueError, "smear"):
            KVCache.init(self.config, batch=1, max_len=4).previous_tokens(tokens, positions)

    def test_smear_adds_the_previous_embedding_only(self):
        """With the gate at 0 a smear model is the plain model; the first token has no
        predecessor, so it never changes; later ones do."""
        config = dataclasses.replace(self.config, smear=1)
        model = toys.tiny_model(config, weight_scale=4.0)
        plain = toys.tiny_model(self.config, weight_scale=4.0)
        tokens = jnp.asarray(self.rng.integers(1, 128, (2, 9)), jnp.int32)
        smeared = forward(model, tokens)
        np.testing.assert_allclose(smeared[:, 0], forward(plain, tokens)[:, 0], atol=1e-5)
        self.assertGreater(
            float(jnp.abs(smeared[:, 1:] - forward(plain, tokens)[:, 1:]).max()), 1e-2
        )
        model.smear.set_value(jnp.zeros_like(model.smear[...]))
        np.testing.assert_allclose(forward(model, tokens), forward(plain, tokens), atol=1e-5)
        self.assertEqual(config.num_params(), self.config.num_params() + config.hidden_size)

    @parameterized.parameters((1, 3), (7, 3), (9, 3), (12, 4), (5, 128))
    def test_causal_attention_by_query_blocks_is_attention_under_a_causal_mask(self, t, block):
        q = jnp.asarray(self.rng.normal(size=(2, t, 4, 8)), jnp.float32)
        k, v = (jnp.asarray(self.rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in "kv")
        want = qwen.attend(q, k, v, jnp.tril(jnp.ones((t, t), bool))[None])
        np.testing.assert_allclose(
            qwen.attend_causal(q, k, v, block=block), want, atol=1e-6, rtol=1e-6
        )

        def grads(attention):
            return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v))), (0, 1, 2))(
                q, k, v
            )

        blocked = grads(lambda q, k, v: qwen.attend_causal(q, k, v, block=block))
        full = grads(lambda q, k, v: qwen.attend(q, k, v, jnp.tril(jnp.ones((t, t), bool))[None]))
        for a, b in zip(blocked, full, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def test_smear_gradients_equal_those_of_the_cached_path(self):
        """Training shifts the gathered embeddings; a cached call gathers each
        predecessor from the table again. Both are the same function of the weights,
        so their gradients (embeddings, gates, layers) agree."""
        config = dataclasses.replace(self.config, smear=3)
        model = toys.tiny_model(config, weight_scale=4.0)
        tokens = jnp.asarray(self.rng.integers(0, 128, (2, 9)), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
        probe = jnp.asarray(self.rng.normal(size=(2, 9, config.vocab_size)), jnp.float32)

        def loss(model, cached):
            if cached:
                cache = KVCache.init(config, batch=2, max_len=9)
                logits, _ = model(tokens, positions=positions, cache=cache)
            else:
                logits = model(tokens)
            return jnp.sum(jnp.tanh(logits) * probe)

        shifted = nnx.grad(loss)(model, False)
        gathered = nnx.grad(loss)(model, True)
        self.assertGreater(float(jnp.abs(shifted["smear"][...]).max()), 1e-3)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
            nnx.to_pure_dict(shifted),
            nnx.to_pure_dict(gathered),
        )

    def test_wider_smear_with_only_the_first_gate_open_is_the_width_one_smear(self):
        """Width 3 with the gates of 2 and 3 tokens back at 0 is width 1 with the same
        first gate; opening the third gate changes outputs from position 3 on only."""
        narrow = toys.tiny_model(dataclasses.replace(self.config, smear=1), weight_scale=4.0)
        wide = toys.tiny_model(dataclasses.replace(self.config, smear=3), weight_scale=4.0)
        gate = jnp.linspace(0.5, 1.5, self.config.hidden_size)
        narrow.smear.set_value(gate[None])
        wide.smear.set_value(jnp.stack([gate, 0 * gate, 0 * gate]))
        tokens = jnp.asarray(self.rng.integers(1, 128, (2, 9)), jnp.int32)
        np.testing.assert_allclose(forward(wide, tokens), forward(narrow, tokens), atol=1e-5)
        wide.smear.set_value(jnp.stack([gate, 0 * gate, gate]))
        opened = forward(wide, tokens)
        np.testing.assert_allclose(opened[:, :3], forward(narrow, tokens)[:, :3], atol=1e-5)
        self.assertGreater(float(jnp.abs(opened[:, 3:] - forward(narrow, tokens)[:, 3:]).min()), 0)
        self.assertEqual(
            wide.config.num_params(), self.config.num_params() + 3 * self.config.hidden_size
        )
        with self.assertRaisesRegex(ValueError, "smear=-1"):
            dataclasses.replace(self.config, smear=-1)

    def test_positions_required_with_cache(self):
        cache = KVCache.init(self.config, batch=1, max_len=4)
        with self.assertRaisesRegex(ValueError, "positions"):
            self.model(jnp.ones((1, 2), jnp.int32), cache=cache)


if __name__ == "__main__":
    absltest.main()
