"""Sampling maths on plain logits: filters, sampling, log-probs, buckets, settings."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from ctu.sampling.buckets import append_bucket, batch_bucket, next_power_of_two
from ctu.sampling.filters import sample_tokens, sampling_logprobs
from ctu.sampling.settings import SamplingConfig


def _reference_logprobs(logits, temperature, top_k, top_p):
    """NumPy: greedily add tokens by descending probability until the mass reaches top_p."""
    out = np.full(logits.shape, -np.inf)
    for row, row_logits in enumerate(np.asarray(logits, np.float64)):
        scaled = row_logits / temperature
        order = np.argsort(-scaled, kind="stable")
        if top_k:
            order = order[:top_k]
        probs = np.exp(scaled[order] - scaled[order].max())
        probs /= probs.sum()
        kept, mass = [], 0.0
        for token, p in zip(order, probs, strict=True):
            kept.append(token)
            mass += p
            if mass >= top_p:
                break
        kept = np.array(kept)
        kept_logits = scaled[kept]
        log_z = kept_logits.max() + np.log(np.exp(kept_logits - kept_logits.max()).sum())
        out[row, kept] = kept_logits - log_z
    return out


def _logits(seed, batch=4, vocab=50, scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), (batch, vocab), jnp.float32)


class SettingsTest(parameterized.TestCase):
    @parameterized.parameters(
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(max_new_tokens=0),
        dict(stop_token_ids=(-3,)),
        dict(stop_token_ids="7"),
    )
    def test_rejects_bad_values(self, **kwargs):
        with self.assertRaises(ValueError):
            SamplingConfig(**kwargs)

    def test_stop_ids_normalised_and_hashable(self):
        a = SamplingConfig(stop_token_ids=[5, 3, 5])
        b = SamplingConfig(stop_token_ids=(3, 5))
        self.assertEqual(a.stop_token_ids, (3, 5))
        self.assertEqual(hash(a), hash(b))
        self.assertEqual(a, b)


class BucketsTest(parameterized.TestCase):
    def test_next_power_of_two(self):
        got = [next_power_of_two(n) for n in (0, 1, 2, 3, 4, 5, 17, 64, 65)]
        self.assertEqual(got, [1, 1, 2, 4, 4, 8, 32, 64, 128])

    def test_batch_bucket(self):
        self.assertEqual(batch_bucket(3), 4)
        self.assertEqual(batch_bucket(64), 64)
        with self.assertRaises(ValueError):
            batch_bucket(0)

    def test_append_bucket_bounded_and_fits(self):
        buckets = {append_bucket(n, minimum=8, maximum=200) for n in range(0, 201)}
        self.assertEqual(buckets, {8, 16, 32, 64, 128, 200})
        for n in range(0, 201):
            self.assertGreaterEqual(append_bucket(n, minimum=8, maximum=200), n)

    def test_append_bucket_above_the_prefill_chunk_is_a_multiple_of_it(self):
        buckets = {n: append_bucket(n, minimum=16, maximum=2047, step=512) for n in range(2048)}
        self.assertEqual(set(buckets.values()), {16, 32, 64, 128, 256, 512, 1024, 1536, 2047})
        for n, bucket in buckets.items():
            self.assertGreaterEqual(bucket, n)
            if bucket > 512:  # the least multiple of the chunk that holds n (or the cap)
                self.assertEqual(bucket, min(-(-n // 512) * 512, 2047))


class FiltersTest(chex.TestCase):
    @parameterized.parameters(
        dict(temperature=1.0, top_k=0, top_p=1.0),
        dict(temperature=0.7, top_k=0, top_p=1.0),
        dict(temperature=1.0, top_k=5, top_p=1.0),
        dict(temperature=1.0, top_k=0, top_p=0.9),
        dict(temperature=1.3, top_k=0, top_p=0.5),
        dict(temperature=0.8, top_k=10, top_p=0.7),
        dict(temperature=1.0, top_k=0, top_p=1e-6),
        dict(temperature=1.0, top_k=1000, top_p=1.0),
    )
    def test_distribution_matches_numpy(self, temperature, top_k, top_p):
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        logits = _logits(0)
        got = np.asarray(jax.jit(sampling_logprobs, static_argnums=1)(logits, config))
        want = _reference_logprobs(logits, temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-5)

    def test_greedy_distribution_is_raw_log_softmax(self):
        logits = _logits(1)
        got = sampling_logprobs(logits, SamplingConfig(temperature=0.0))
        np.testing.assert_allclose(got, jax.nn.log_softmax(logits), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(
        dict(temperature=1.0, top_k=0, top_p=1.0),
        dict(temperature=0.5, top_k=7, top_p=1.0),
        dict(temperature=1.0, top_k=0, top_p=0.8),
        dict(temperature=2.0, top_k=12, top_p=0.6),
        dict(temperature=0.0, top_k=0, top_p=1.0),
    )
    def test_sampled_logprob_is_that_of_the_distribution(self, temperature, top_k, top_p):
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        logits = _logits(2, batch=64)
        sample = self.variant(functools.partial(sample_tokens, config=config))
        tokens, logprobs = sample(jax.random.key(3), logits)
        chex.assert_type([tokens, logprobs], [jnp.int32, jnp.float32])
        dense = np.asarray(sampling_logprobs(logits, config))
        want = dense[np.arange(64), np.asarray(tokens)]
        self.assertTrue(np.isfinite(want).all(), "sampled a token outside the support")
        np.testing.assert_allclose(logprobs, want, atol=1e-5)

    def test_greedy_and_top_k_1_are_argmax(self):
        logits = _logits(4, batch=32)
        argmax = np.argmax(np.asarray(logits), axis=-1)
        raw = np.asarray(jax.nn.log_softmax(logits))[np.arange(32), argmax]
        greedy, greedy_lp = sample_tokens(jax.random.key(0), logits, SamplingConfig(0.0))
        np.testing.assert_array_equal(greedy, argmax)
        np.testing.assert_allclose(greedy_lp, raw, atol=1e-6)
        top1, top1_lp = sample_tokens(jax.random.key(0), logits, SamplingConfig(top_k=1))
        np.testing.assert_array_equal(top1, argmax)
        np.testing.assert_allclose(top1_lp, 0.0, atol=1e-6)

    @parameterized.parameters(
        dict(temperature=1.0, top_k=0, top_p=1.0, vocab=8),
        dict(temperature=0.8, top_k=4, top_p=0.9, vocab=8),
        dict(temperature=1.0, top_k=0, top_p=0.95, vocab=70),
    )
    def test_empirical_frequencies(self, temperature, top_k, top_p, vocab):
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        n = 40_000
        logits = _logits(5, batch=1, vocab=vocab, scale=1.0)
        logits = jnp.tile(logits.at[:, vocab // 3 : vocab // 2].set(-jnp.inf), (n, 1))
        tokens, _ = jax.jit(sample_tokens, static_argnums=2)(jax.random.key(6), logits, config)
        freq = np.bincount(np.asarray(tokens), minlength=vocab) / n
        probs = np.exp(np.asarray(sampling_logprobs(logits[:1], config))[0])
        self.assertEqual(freq[probs == 0].sum(), 0.0, "sampled a zero-probability token")
        # Binomial std <= 0.0025 at n=40k; 5 sigma.
        np.testing.assert_allclose(freq, probs, atol=0.0125)

    def test_deterministic_for_a_given_key(self):
        config = SamplingConfig(top_p=0.9, top_k=20)
        logits = _logits(7, batch=16)
        a, _ = sample_tokens(jax.random.key(8), logits, config)
        b, _ = sample_tokens(jax.random.key(8), logits, config)
        c, _ = sample_tokens(jax.random.key(9), logits, config)
        np.testing.assert_array_equal(a, b)
        self.assertFalse(np.array_equal(a, c))

    @parameterized.parameters(SamplingConfig(), SamplingConfig(top_p=0.9, top_k=20))
    def test_a_row_samples_the_same_in_any_split_of_the_batch(self, config):
        # What lets every device of a data-parallel decode run its own loop.
        logits = _logits(10, batch=12, scale=1.0)
        key = jax.random.key(11)
        whole, whole_logp = sample_tokens(key, logits, config)
        for rows in (np.arange(4, 8), np.arange(9, 12), np.array([2])):
            part, part_logp = sample_tokens(key, logits[rows], config, jnp.asarray(rows))
            np.testing.assert_array_equal(part, whole[rows])
            np.testing.assert_array_equal(part_logp, whole_logp[rows])
        # The index, not the position in the call, decides: rows 4..7 sampled as 0..3 differ.
        shifted, _ = sample_tokens(key, logits[4:8], config)
        self.assertFalse(np.array_equal(shifted, whole[4:8]))


if __name__ == "__main__":
    absltest.main()
