"""The sampler against the model's own forward pass: log-probs, greedy, stops, turns.

Sessions share max_len, batch bucket and sampling settings where they can, so the
jitted steps compile once for several tests.
"""

import dataclasses
import functools

import chex
import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

from ctu.models import ModelConfig, Qwen
from ctu.sampling import LENGTH, STOP, SamplingConfig, Session, engine
from ctu.sharding import make_mesh, state_shardings

VOCAB = 256
MAX_LEN = 128
STOP_IDS = tuple(range(0, VOCAB, 12))  # ~8% of the vocabulary ends a turn
SAMPLED = SamplingConfig(max_new_tokens=16, stop_token_ids=STOP_IDS)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)
TOP_1 = SamplingConfig(top_k=1, max_new_tokens=16)


def _peaked_tiny_model(seed: int = 0, smear: int = 0) -> Qwen:
    """The tiny preset with weights scaled up, so next-token distributions are peaked."""
    config = ModelConfig.preset("tiny", vocab_size=VOCAB, smear=smear)
    model = Qwen(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: w * 4.0 if w.ndim >= 2 else w, state))
    return model


def _prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(n)).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _forward_logprobs(graphdef, state, tokens):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens), axis=-1)


class SamplerTest(chex.TestCase):
    SMEAR = 0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = _peaked_tiny_model(smear=cls.SMEAR)
        cls.graphdef, cls.params = nnx.split(cls.model)

    def _session(self, sampling, batch_size=5, **kwargs):
        return Session(
            self.model, batch_size=batch_size, max_len=MAX_LEN, sampling=sampling, **kwargs
        )

    def _full_logprobs(self, session) -> list[np.ndarray]:
        """log_softmax of the training forward over each row's history; t predicts t + 1."""
        histories = [session.history(row) for row in range(session.batch_size)]
        # One compiled shape for every test; a full row also holds its pending token.
        tokens = np.zeros((8, MAX_LEN + 1), np.int32)
        for row, history in enumerate(histories):
            tokens[row, : len(history)] = history
        logprobs = np.asarray(_forward_logprobs(self.graphdef, self.params, tokens))
        return [logprobs[row, : len(h)] for row, h in enumerate(histories)]

    def _check_against_forward(self, session, turns, generations):
        """Every sampled token's log-prob equals the full forward's, across all turns."""
        forward = self._full_logprobs(session)
        for row in range(session.batch_size):
            history, position = session.history(row), 0
            # Walk the history: appended tokens first, then the sampled ones, per turn.
            for appends, out in zip(turns, generations, strict=True):
                if appends[row] is None or out.num_tokens[row] == 0:
                    continue  # took no part, or its append did not fit and was dropped
                position += len(appends[row])
                sampled = out.row_tokens(row)
                self.assertEqual(history[position : position + len(sampled)], sampled)
                want = forward[row][np.arange(position - 1, position - 1 + len(sampled)), sampled]
                np.testing.assert_allclose(out.row_logprobs(row), want, atol=1e-4, rtol=0)
                position += len(sampled)
            self.assertEqual(position, len(history))

    def test_logprobs_match_forward_ragged_multi_turn(self):
        # Appends are fed 8 columns at a time: rows end their prompt in different pieces;
        # calls run on KV windows of 64 and 128 slots as the rows grow.
        session = self._session(SAMPLED, prefill_chunk=8, min_kv_window=32)
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
                    self.assertIn(tokens[-1], STOP_IDS)
                    self.assertFalse(set(tokens[:-1]) & set(STOP_IDS))
                elif reason == LENGTH:
                    self.assertLen(tokens, SAMPLED.max_new_tokens)
                    self.assertFalse(set(tokens) & set(STOP_IDS))
        self._check_against_forward(session, turns, outs)
        # The cache holds everything but the pending last sampled token.
        np.testing.assert_array_equal(
            session.lengths, [len(session.history(r)) - 1 for r in range(5)]
        )

    def test_greedy_is_argmax_of_forward_and_top_k_1_agrees(self):
        turns = [_prompts(2, [4, 11, 7, 1, 2]), [[3, 4], [5], None, [6], [7, 8, 9]]]
        tokens = {}
        for name, sampling in {"greedy": GREEDY, "top1": TOP_1}.items():
            session = self._session(sampling)
            outs = [
                session.generate(a, self.params, jax.random.key(i)) for i, a in enumerate(turns)
            ]
            tokens[name] = [out.tokens.tolist() for out in outs]
            if name == "greedy":
                greedy_session, greedy_outs = session, outs
        # top_k=1 reports log-prob 0 (its distribution is a point mass); greedy the raw one.
        np.testing.assert_array_equal(outs[0].logprobs, 0.0)
        self._check_against_forward(greedy_session, turns, greedy_outs)
        self.assertEqual(tokens["greedy"], tokens["top1"])
        forward = self._full_logprobs(session)
        for row in range(session.batch_size):
            history, position = session.history(row), 0
            for appends, out in zip(turns, outs, strict=True):
                if appends[row] is None:
                    continue
                position += len(appends[row])
                for t in range(position, position + out.num_tokens[row]):
                    self.assertGreaterEqual(
                        forward[row][t - 1, history[t]], forward[row][t - 1].max() - 1e-5
                    )
                position += out.num_tokens[row]

    def test_deterministic_for_a_given_key(self):
        prompts = _prompts(3, [5, 2, 8, 1, 1])

        def run(seed):
            session = self._session(SAMPLED)
            return session.generate(prompts, self.params, jax.random.key(seed)).tokens

        np.testing.assert_array_equal(run(0), run(0))
        self.assertFalse(np.array_equal(run(0), run(1)))

    def test_full_cache_and_overflow_stop_with_length(self):
        session = self._session(GREEDY, batch_size=2)
        turn = _prompts(4, [MAX_LEN - 6, 3])
        out = session.generate(turn, self.params, jax.random.key(0))
        # Row 0 feeds 6 samples into its last free slots and keeps a 7th pending.
        self.assertEqual(out.num_tokens.tolist(), [7, GREEDY.max_new_tokens])
        self.assertEqual(out.stop_reasons, (LENGTH, LENGTH))
        self._check_against_forward(session, [turn], [out])
        again = session.generate([[1], [2]], self.params, jax.random.key(1), max_new_tokens=[9, 5])
        self.assertEqual(again.num_tokens.tolist(), [0, 5])  # row 0's append does not fit
        self.assertEqual(again.stop_reasons, (LENGTH, LENGTH))
        self._check_against_forward(session, [turn, [[1], [2]]], [out, again])
        with self.assertRaisesRegex(ValueError, "max_new_tokens"):
            session.generate([None, [3]], self.params, jax.random.key(2), max_new_tokens=99)

    def test_bounded_compiles_and_new_weights_do_not_recompile(self):
        sampling = SamplingConfig(max_new_tokens=3, stop_token_ids=(7,))  # used nowhere else
        before = dict(engine.TRACE_COUNTS)
        rng = np.random.default_rng(5)
        for call in range(12):
            if call % 4 == 0:
                size = int(rng.integers(5, 9))
                session = self._session(sampling, batch_size=size, min_append_bucket=8)
                appends = _prompts(call, rng.integers(1, 30, size=size))
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
        self.assertEqual(traces["decode_step"], 1)

    def test_sharded_session_matches_single_device(self):
        chex.assert_devices_available(8, "cpu")
        mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
        params = jax.device_put(self.params, state_shardings(self.params, mesh))
        turns = [_prompts(6, [5, 9, 2, 7, 3]), [[1, 2], None, [3], [4, 5, 6], [7]]]
        outs = {}
        for name, (mesh_or_none, weights) in {
            "single": (None, self.params),
            "sharded": (mesh, params),
        }.items():
            session = self._session(GREEDY, mesh=mesh_or_none)
            outs[name] = [session.generate(a, weights, jax.random.key(0)) for a in turns]
        for single, sharded in zip(outs["single"], outs["sharded"], strict=True):
            np.testing.assert_array_equal(single.tokens, sharded.tokens)
            np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)
            self.assertEqual(single.stop_reasons, sharded.stop_reasons)
        self.assertLen(session._cache.k[0].sharding.device_set, 8)

    def test_data_parallel_decode_loops_sample_what_one_device_samples(self):
        # Over "data" alone every device runs its own decode loop on its rows; a row's
        # sample depends on the key and its index only, so even sampled tokens agree.
        chex.assert_devices_available(8, "cpu")
        mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:4])
        params = jax.device_put(self.params, state_shardings(self.params, mesh))
        turns = [_prompts(7, [5, 9, 2, 7, 3, 4, 8, 6]), [[1, 2], None, [3], [4, 5, 6]] * 2]
        outs = {}
        for name, (mesh_or_none, weights) in {
            "single": (None, self.params),
            "data_parallel": (mesh, params),
        }.items():
            session = self._session(SAMPLED, batch_size=8, mesh=mesh_or_none)
            outs[name] = [
                session.generate(a, weights, jax.random.key(i)) for i, a in enumerate(turns)
            ]
        self._check_against_forward(session, turns, outs["data_parallel"])
        for single, sharded in zip(outs["single"], outs["data_parallel"], strict=True):
            np.testing.assert_array_equal(single.tokens, sharded.tokens)
            np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)
            self.assertEqual(single.stop_reasons, sharded.stop_reasons)
        self.assertLen(session._cache.k[0].sharding.device_set, 4)

    def test_a_shared_prompt_prefix_is_fed_once_and_changes_nothing(self):
        # Calls 1 and 2 start empty rows whose prompts share 21 and 17 tokens (fed once,
        # cut to 16 at a multiple of 8); in call 2 the rows of call 1 sit out with their
        # histories, which the shared write must leave alone. Call 3 continues every row.
        rng = np.random.default_rng(3)
        common, other = _prompts(8, [21, 17])
        tails = [rng.integers(0, VOCAB, size=n).tolist() for n in (1, 6, 13, 2, 9)]
        turns = [
            [common + t for t in tails[:3]] + [None, None],
            [None, None, None] + [other + t for t in tails[3:]],
            [[5], [6, 7], [8], [9, 10, 11], [12]],
        ]
        mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:4])
        outs = {}
        for name, multiple, on in (("whole", 0, None), ("shared", 8, None), ("dp", 8, mesh)):
            before = engine.TRACE_COUNTS["shared_prefix_step"]
            session = self._session(
                SAMPLED, batch_size=5, shared_prefix_multiple=multiple, prefill_chunk=16, mesh=on
            )
            outs[name] = [
                session.generate(a, self.params, jax.random.key(i)) for i, a in enumerate(turns)
            ]
            if name == "shared":  # one prefix length (16), traced once
                self.assertEqual(engine.TRACE_COUNTS["shared_prefix_step"] - before, 1)
                self._check_against_forward(session, turns, outs[name])
        for name in ("shared", "dp"):  # rows sharded over 4 devices, one loop each
            for whole, shared in zip(outs["whole"], outs[name], strict=True):
                np.testing.assert_array_equal(whole.tokens, shared.tokens)
                np.testing.assert_allclose(whole.logprobs, shared.logprobs, atol=1e-4)
                self.assertEqual(whole.stop_reasons, shared.stop_reasons)

    def test_user_errors(self):
        if self.SMEAR:
            self.skipTest("the model does not matter here")
        session = self._session(SAMPLED, batch_size=2)
        with self.assertRaisesRegex(ValueError, "2"):
            session.generate([[1]], self.params, jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "prompt"):
            session.generate([[1], []], self.params, jax.random.key(0))
        with self.assertRaisesRegex(ValueError, "token ids"):
            session.generate([[1], [VOCAB]], self.params, jax.random.key(0))
        with self.assertRaisesRegex(ValueError, rf"stop_token_ids \[{VOCAB}\] are outside"):
            self._session(dataclasses.replace(SAMPLED, stop_token_ids=(1, VOCAB)), batch_size=2)
        # The refused calls changed nothing: row 0's history is what was fed since.
        self.assertEqual(session.history(0), [])
        out = session.generate([[1, 2], [3]], self.params, jax.random.key(0))
        self.assertEqual(session.history(0), [1, 2, *out.row_tokens(0)])
        np.testing.assert_array_equal(
            session.lengths, [2 + out.num_tokens[0] - 1, 1 + out.num_tokens[1] - 1]
        )


class SmearSamplerTest(SamplerTest):
    """Every sampler check again on a `ModelConfig.smear` model, whose calls read the
    tokens before each chunk from the cache: prefill pieces, decode loops, KV windows."""

    SMEAR = 2


if __name__ == "__main__":
    absltest.main()
