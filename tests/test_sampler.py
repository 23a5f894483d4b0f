"""The sampler against the model's own forward pass: log-probs, greedy, stops, turns."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from ctu.models import ModelConfig, Qwen
from ctu.sampling import LENGTH, STOP, SamplingConfig, Session, engine

VOCAB = 256


def _peaked_tiny_model(seed: int = 0) -> Qwen:
    """The tiny preset with weights scaled up, so next-token distributions are peaked."""
    model = Qwen(ModelConfig.preset("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: w * 4.0 if w.ndim >= 2 else w, state))
    return model


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def _full_logprobs(model: Qwen, histories: list[list[int]]) -> list[np.ndarray]:
    """log_softmax of `model(history)` per row; row t predicts token t + 1."""
    width = max(map(len, histories))
    tokens = np.zeros((len(histories), width), np.int32)
    for row, history in enumerate(histories):
        tokens[row, : len(history)] = history
    logprobs = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)), axis=-1))
    return [logprobs[row, : len(h)] for row, h in enumerate(histories)]


class SamplerTest(chex.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = _peaked_tiny_model()
        cls.params = nnx.state(cls.model)

    def _check_against_forward(self, session, turns, generations):
        """Every sampled token's log-prob equals the full forward's, across all turns."""
        histories = [session.history(row) for row in range(session.batch_size)]
        forward = _full_logprobs(self.model, histories)
        for row, history in enumerate(histories):
            # Walk the history: appended tokens first, then the sampled ones, per turn.
            position = 0
            for appends, out in zip(turns, generations, strict=True):
                if appends[row] is None or out.stop_reasons[row] is None:
                    continue
                position += len(appends[row])
                sampled = out.row_tokens(row)
                self.assertEqual(history[position : position + len(sampled)], sampled)
                want = forward[row][np.arange(position - 1, position - 1 + len(sampled)), sampled]
                np.testing.assert_allclose(out.row_logprobs(row), want, atol=1e-4, rtol=0)
                position += len(sampled)
            self.assertEqual(position, len(history))

    def test_logprobs_match_forward_ragged_multi_turn(self):
        stop_ids = tuple(range(0, VOCAB, 12))  # ~8% of the vocabulary ends a turn
        sampling = SamplingConfig(max_new_tokens=24, stop_token_ids=stop_ids)
        session = Session(self.model, batch_size=5, max_len=128, sampling=sampling)
        turns = [
            _prompts(1, [3, 17, 9, 1, 30]),
            [[5, 6], None, [7], [8, 9, 10, 11, 12, 13], []],
            [[1], [2, 3, 4], None, [5] * 20, [6]],
        ]
        outs = [
            session.generate(appends, self.params, jax.random.key(turn))
            for turn, appends in enumerate(turns)
        ]
        reasons = {r for out in outs for r in out.stop_reasons}
        self.assertEqual(reasons, {STOP, LENGTH, None}, "want both stop reasons exercised")
        for out in outs:
            for row, reason in enumerate(out.stop_reasons):
                tokens = out.row_tokens(row)
                if reason == STOP:
                    self.assertIn(tokens[-1], stop_ids)
                    self.assertFalse(set(tokens[:-1]) & set(stop_ids))
                elif reason == LENGTH:
                    self.assertLen(tokens, sampling.max_new_tokens)
                    self.assertFalse(set(tokens) & set(stop_ids))
        self._check_against_forward(session, turns, outs)
        # The cache holds everything but the pending last sampled token.
        np.testing.assert_array_equal(
            session.lengths, [len(session.history(r)) - 1 for r in range(5)]
        )

    def test_greedy_is_argmax_of_forward_and_top_k_1_agrees(self):
        turns = [_prompts(2, [4, 11, 7]), [[3, 4], [5], None]]
        results = {}
        for name, sampling in {
            "greedy": SamplingConfig(temperature=0.0, max_new_tokens=10),
            "top1": SamplingConfig(top_k=1, max_new_tokens=10),
        }.items():
            session = Session(self.model, batch_size=3, max_len=64, sampling=sampling)
            outs = [
                session.generate(a, self.params, jax.random.key(i)) for i, a in enumerate(turns)
            ]
            results[name] = [s.tolist() for s in (outs[0].tokens, outs[1].tokens)]
            histories = [session.history(row) for row in range(3)]
        for row, history in enumerate(histories):
            logits = np.asarray(self.model(jnp.asarray([history])))[0]
            prompt_len = len(turns[0][row])
            for t in range(prompt_len, len(history)):
                if t in range(prompt_len + 10, prompt_len + 10 + len(turns[1][row] or [])):
                    continue  # appended tokens of turn 2
                self.assertGreaterEqual(logits[t - 1, history[t]], logits[t - 1].max() - 1e-5)
        self.assertEqual(results["greedy"], results["top1"])

    def test_deterministic_for_a_given_key(self):
        sampling = SamplingConfig(top_p=0.9, max_new_tokens=8)
        prompts = _prompts(3, [5, 2, 8])

        def run(seed):
            session = Session(self.model, batch_size=3, max_len=32, sampling=sampling)
            return session.generate(prompts, self.params, jax.random.key(seed)).tokens

        np.testing.assert_array_equal(run(0), run(0))
        self.assertFalse(np.array_equal(run(0), run(1)))

    def test_full_cache_and_overflow_stop_with_length(self):
        sampling = SamplingConfig(max_new_tokens=20)
        session = Session(self.model, batch_size=2, max_len=16, sampling=sampling)
        turn = _prompts(4, [10, 3])
        out = session.generate(turn, self.params, jax.random.key(0))
        # A row of n prompt tokens feeds 16 - n samples and keeps one more pending.
        self.assertEqual(out.num_tokens.tolist(), [7, 14])
        self.assertEqual(out.stop_reasons, (LENGTH, LENGTH))
        self._check_against_forward(session, [turn], [out])
        again = session.generate([[1], None], self.params, jax.random.key(1))
        self.assertEqual(again.num_tokens.tolist(), [0, 0])
        self.assertEqual(again.stop_reasons, (LENGTH, None))

    def test_bounded_compiles_and_new_weights_do_not_recompile(self):
        sampling = SamplingConfig(max_new_tokens=3, stop_token_ids=(7,))
        before = dict(engine.TRACE_COUNTS)
        rng = np.random.default_rng(5)
        for call in range(12):
            if call % 4 == 0:
                session = Session(
                    self.model,
                    batch_size=int(rng.integers(5, 9)),
                    max_len=96,
                    sampling=sampling,
                    min_append_bucket=8,
                )
                appends = _prompts(call, rng.integers(1, 30, size=session.batch_size))
            else:
                appends = [
                    rng.integers(0, VOCAB, size=int(n)).tolist() if n else None
                    for n in rng.integers(0, 12, size=session.batch_size)
                ]
            # Fresh weights every call, as after an RL step.
            params = jax.tree.map(lambda w, c=call: w * (1.0 + 0.01 * c), self.params)
            session.generate(appends, params, jax.random.key(call))
        traces = {
            k: engine.TRACE_COUNTS[k] - before.get(k, 0) for k in ("append_step", "decode_step")
        }
        self.assertLessEqual(traces["append_step"], 3)  # buckets 8, 16, 32
        self.assertLessEqual(traces["decode_step"], 1)

    def test_user_errors(self):
        session = Session(self.model, batch_size=2, max_len=16, sampling=SamplingConfig())
        with self.assertRaisesRegex(ValueError, "2"):
            session.generate([[1]], self.params, jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "prompt"):
            session.generate([[1], []], self.params, jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "token ids"):
            session.generate([[1], [VOCAB]], self.params, jax.random.key(0))


if __name__ == "__main__":
    absltest.main()
