"""Tests for ctu.rl.train_step and ctu.rl.optim on the tiny Qwen (8 simulated CPU devices)."""

import dataclasses
import os
import re
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

from ctu import sharding
from ctu.rl import checkpoint, losses, train_step
from ctu.rl import optim as optim_lib
from ctu.rl.optim import OptimConfig, learning_rate_schedule
from tests import resume_worker

chex.set_n_cpu_devices(8)  # No-op when conftest already set it; needed under absltest.

SINGLE = {"data": 1, "fsdp": 1, "tensor": 1}


def _mesh(shape=None):
    if shape is None:
        return sharding.make_mesh(SINGLE, devices=jax.devices()[:1])
    return sharding.make_mesh(shape)


def _learner(mesh, **overrides):
    settings = dict(
        loss="dapo",
        ppo_epochs=1,
        num_mini_batches=1,
        num_micro_batches=2,
        shuffle=False,
        optim=OptimConfig(learning_rate=1e-2, eps=1e-3),
    )
    settings.update(overrides)
    model = sharding.create_sharded_model(resume_worker.tiny_model_config(), mesh, nnx.Rngs(0))
    return train_step.Learner(train_step.TrainConfig(**settings), model, mesh)


def _batch(index=0, **replace):
    tokens, mask, advantages, old_logp = resume_worker.synthetic_batch(index)
    batch = train_step.RolloutBatch(
        tokens=tokens, mask=mask, advantages=advantages, old_logp=old_logp
    )
    return dataclasses.replace(batch, **replace)


def _params(learner):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(learner.model, nnx.Param))]


def _everything(learner):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state((learner.model, learner.optimizer)))]


class TokenLogpTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_at_t_is_about_token_t_predicted_at_t_minus_1(self):
        logits = jax.random.normal(jax.random.key(0), (2, 5, 7)) * 3.0
        tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
        logp, entropy = self.variant(train_step.token_logp_and_entropy)(logits, tokens)
        want_logp = np.zeros((2, 5))
        want_entropy = np.zeros((2, 5))
        for b in range(2):
            for t in range(1, 5):
                z = np.asarray(logits[b, t - 1], np.float64)
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                want_logp[b, t] = np.log(p[int(tokens[b, t])])
                want_entropy[b, t] = -(p * np.log(p)).sum()
        np.testing.assert_allclose(logp, want_logp, atol=1e-5)
        np.testing.assert_allclose(entropy, want_entropy, atol=1e-5)


class TemperatureTest(chex.TestCase):
    def test_the_learner_scores_what_a_tempered_sampler_drew(self):
        """Tokens sampled at temperature 0.6 carry the sampler's log-probs; a learner
        told that temperature recomputes them exactly, one left at 1 does not."""
        from ctu.sampling import SamplingConfig, Session

        mesh = _mesh()
        learner = _learner(mesh, temperature=0.6, num_micro_batches=1)
        plain = train_step.Learner(
            dataclasses.replace(learner.config, temperature=1.0), learner.model, mesh
        )
        sampling = SamplingConfig(temperature=0.6, max_new_tokens=12)
        session = Session(learner.model, batch_size=2, max_len=32, sampling=sampling)
        prompts = [[3, 5, 7, 9], [11, 2]]
        out = session.generate(prompts, nnx.state(learner.model), jax.random.key(0))
        tokens = np.zeros((2, 32), np.int32)
        for row, prompt in enumerate(prompts):
            history = prompt + out.row_tokens(row)
            tokens[row, : len(history)] = history
        tempered = np.asarray(learner.compute_logp(jnp.asarray(tokens))[0])
        raw = np.asarray(plain.compute_logp(jnp.asarray(tokens))[0])
        for row, prompt in enumerate(prompts):
            span = slice(len(prompt), len(prompt) + out.num_tokens[row])
            np.testing.assert_allclose(tempered[row, span], out.row_logprobs(row), atol=1e-4)
            self.assertGreater(np.abs(raw[row, span] - out.row_logprobs(row)).max(), 1e-2)
        # The update's forward divides by the same temperature: recomputed behaviour
        # log-probs give ratio 1 on the first mini-batch.
        first = learner.train_step(learner.prepare(learner.shard_batch(_batch(0))), jnp.arange(8))
        self.assertAlmostEqual(float(first["ratio/mean"]), 1.0, places=5)
        self.assertLess(float(first["approx_kl_old"]), 1e-9)
        with self.assertRaisesRegex(ValueError, "train.temperature must be > 0"):
            train_step.TrainConfig(temperature=0.0)


class SharedLearnerTest(chex.TestCase):
    """Tests that share one DAPO learner (compiling a learner takes seconds)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.learner = _learner(_mesh(), num_mini_batches=2, max_consecutive_nonfinite=3)
        # The step is traced once: new state comes back with the shardings it went in.
        cls.learner._step = jax.jit(
            chex.assert_max_traces(cls.learner._train_step, n=1),
            donate_argnums=0,
            static_argnums=3,  # prefix_len: these synthetic batches share no prefix
        )

    def test_micro_batches_give_the_full_mini_batch_gradient(self):
        model = self.learner.model  # Any parameters will do.
        batch = _batch(3)
        # Off-policy old log-probs so ratios, clipping and the loss are all non-trivial.
        noise = np.random.default_rng(0).normal(0.0, 0.3, batch.old_logp.shape)
        batch = dataclasses.replace(batch, old_logp=(batch.old_logp + noise).astype(np.float32))
        # Guided rows all in the first of 4 micro-batches (rows i::4): the guided-token
        # means must not be diluted by the micro-batches that have none.
        batch = dataclasses.replace(batch, guided=np.arange(8) % 4 == 0)
        batch = jax.tree.map(jnp.asarray, batch)

        @nnx.jit
        def compare(model, batch):
            full = train_step.mini_batch_gradients(model, batch, train_step.TrainConfig())
            micro = train_step.mini_batch_gradients(
                model, batch, train_step.TrainConfig(num_micro_batches=4)
            )
            logp, _ = train_step.token_logp_and_entropy(model(batch.tokens), batch.tokens)
            direct, _ = losses.policy_loss(
                "dapo",
                logp=logp,
                old_logp=batch.old_logp,
                advantages=batch.advantages,
                mask=batch.mask,
            )
            # Averaging per-micro-batch token-means is what exact accumulation avoids.
            naive = jnp.mean(
                jnp.stack(
                    [
                        losses.policy_loss(
                            "dapo",
                            logp=logp[i::4],
                            old_logp=batch.old_logp[i::4],
                            advantages=batch.advantages[i::4],
                            mask=batch.mask[i::4],
                        )[0]
                        for i in range(4)
                    ]
                )
            )
            return full, micro, direct, naive

        (full_grads, full_metrics), (micro_grads, micro_metrics), direct, naive = compare(
            model, batch
        )
        for want, got in zip(
            jax.tree.leaves(full_grads), jax.tree.leaves(micro_grads), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        self.assertAlmostEqual(float(micro_metrics["loss"]), float(full_metrics["loss"]), places=5)
        self.assertAlmostEqual(
            float(micro_metrics["clip_ratio/high"]),
            float(full_metrics["clip_ratio/high"]),
            places=5,
        )
        self.assertEqual(float(micro_metrics["tokens/valid"]), float(batch.mask.sum()))
        guided_tokens = float(batch.mask[::4].sum())
        self.assertEqual(float(micro_metrics["tokens/guided"]), guided_tokens)
        for name in ("guided/ratio_mean", "guided/clip_ratio/high", "guided/frac_tokens"):
            self.assertAlmostEqual(
                float(micro_metrics[name]), float(full_metrics[name]), places=5, msg=name
            )
        self.assertGreater(float(full_metrics["guided/ratio_mean"]), 0.5)
        self.assertAlmostEqual(float(full_metrics["loss"]), float(direct), places=5)
        self.assertGreater(abs(float(naive) - float(direct)), 1e-3)

    def test_first_mini_batch_has_ratio_one(self):
        learner = self.learner
        self.assertIsNone(learner.reference)
        with self.assertRaisesRegex(ValueError, "no KL term"):
            learner.compute_logp(jnp.zeros((8, 16), jnp.int32), reference=True)
        steps = int(learner.optimizer.step[...])
        batch = learner.prepare(learner.shard_batch(_batch(0)))
        first = jax.device_get(learner.train_step(batch, jnp.arange(0, 4)))
        second = jax.device_get(learner.train_step(batch, jnp.arange(4, 8)))
        self.assertAlmostEqual(float(first["ratio/mean"]), 1.0, places=5)
        self.assertLess(float(first["approx_kl_old"]), 1e-9)
        self.assertEqual(float(first["clip_ratio/high"] + first["clip_ratio/low"]), 0.0)
        # The second mini-batch is scored against the pre-update policy.
        self.assertGreater(float(second["approx_kl_old"]), 1e-6)
        result = learner.update(_batch(1), jax.random.key(0))  # Host arrays are placed.
        self.assertEqual(result["nonfinite"], 0.0)
        self.assertIsNone(result["perf/mfu"])  # CPU without a configured peak.
        self.assertGreater(result["perf/tokens_per_s"], 0.0)
        self.assertEqual(int(learner.optimizer.step[...]), steps + 4)

    def test_guided_rows_keep_the_sampler_log_probs(self):
        batch = _batch(0, guided=np.arange(8) < 3)
        prepared = self.learner.prepare(self.learner.shard_batch(batch))
        np.testing.assert_array_equal(prepared.old_logp[:3], batch.old_logp[:3])
        recomputed = self.learner.compute_logp(jnp.asarray(batch.tokens))[0]
        np.testing.assert_array_equal(prepared.old_logp[3:], recomputed[3:])
        self.assertFalse(np.allclose(batch.old_logp[3:], recomputed[3:]))

    def test_a_step_without_gradient_leaves_the_state_alone(self):
        """Zero advantages and no KL: a gradient of exactly zero. Adam would still move
        the weights along its momentum (built by the update before); the step is skipped."""
        learner = self.learner
        learner.update(_batch(1), jax.random.key(0))
        before = _everything(learner)
        flat = learner.update(_batch(2, advantages=np.zeros(8, np.float32)), jax.random.key(1))
        self.assertEqual((flat["zero_gradient"], flat["nonfinite"]), (2.0, 0.0))
        for want, got in zip(before, _everything(learner), strict=True):
            np.testing.assert_array_equal(got, want)
        self.assertEqual(learner.update(_batch(1), jax.random.key(2))["zero_gradient"], 0.0)

    def test_nonfinite_steps_are_skipped_then_the_run_stops(self):
        learner = self.learner
        learner.consecutive_nonfinite = learner.total_nonfinite = 0
        nan = np.full((8,), np.nan, np.float32)
        poisoned = learner.shard_batch(_batch(0, advantages=nan))
        good = learner.shard_batch(_batch(1))

        before = _everything(learner)
        result = learner.update(poisoned, jax.random.key(0))  # Two skipped mini-batches.
        self.assertEqual(result["nonfinite"], 2.0)
        self.assertEqual(learner.consecutive_nonfinite, 2)
        for want, got in zip(before, _everything(learner), strict=True):
            np.testing.assert_array_equal(got, want)

        learner.update(good, jax.random.key(1))  # A finite step resets the count.
        self.assertEqual(learner.consecutive_nonfinite, 0)
        after_good = _everything(learner)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(before, after_good, strict=True)))

        learner.update(poisoned, jax.random.key(2))
        with self.assertRaisesRegex(train_step.NonFiniteError, "3 optimizer steps in a row"):
            learner.update(poisoned, jax.random.key(3))
        self.assertEqual(learner.total_nonfinite, 5)
        for want, got in zip(after_good, _everything(learner), strict=True):
            np.testing.assert_array_equal(got, want)
        learner.consecutive_nonfinite = 0


class ShardedLearnerTest(chex.TestCase):
    def test_sharded_grpo_step_matches_single_device(self):
        batch = _batch(2)
        results, params, initial = [], [], None
        for mesh in (_mesh(), _mesh({"data": 2, "fsdp": 2, "tensor": 2})):
            learner = _learner(mesh, loss="grpo", loss_settings={"kl_coef": 0.04}, ppo_epochs=2)
            initial = _params(learner)
            results.append(learner.update(learner.shard_batch(batch), jax.random.key(0)))
            params.append(_params(learner))
        sharded_kernel = jax.tree.leaves(nnx.state(learner.model, nnx.Param))[0]
        self.assertEqual(len(sharded_kernel.sharding.device_set), 8)
        self.assertAlmostEqual(results[0]["loss"], results[1]["loss"], places=5)
        self.assertAlmostEqual(results[0]["kl"], results[1]["kl"], places=6)
        self.assertAlmostEqual(results[0]["grad_norm"], results[1]["grad_norm"], places=4)
        for want, got in zip(params[0], params[1], strict=True):
            np.testing.assert_allclose(got, want, atol=2e-5)

        # GRPO keeps a frozen reference (the initial policy) and pays a KL to it.
        self.assertGreater(results[1]["kl"], 0.0)
        reference = [np.asarray(x) for x in jax.tree.leaves(learner.reference)]
        for want, got in zip(initial, reference, strict=True):
            np.testing.assert_array_equal(got, want)
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(initial, params[1], strict=True)))


class TrainableTest(chex.TestCase):
    def test_only_matched_parameters_move_and_as_they_would_in_a_full_update(self):
        """Adam is per coordinate, so with clipping off the parameters `trainable` matches
        take the very step a learner of every parameter takes; the rest stay bit-equal
        and carry no optimizer state. A checkpoint of it restores."""
        mesh = _mesh()
        optim = dict(learning_rate=1e-2, eps=1e-3, max_grad_norm=1e9)
        full = _learner(mesh, optim=OptimConfig(**optim))
        part = _learner(mesh, optim=OptimConfig(**optim, trainable=r"norm|^embed$"))
        paths = [
            optim_lib.param_path(path)
            for path, node in nnx.iter_graph(part.model)
            if isinstance(node, nnx.Param)
        ]
        trained = [bool(re.search(r"norm|^embed$", p)) for p in paths]
        self.assertTrue(any(trained) and not all(trained))
        initial = _params(part)
        for learner in (full, part):
            learner.train_step(learner.prepare(learner.shard_batch(_batch(0))), jnp.arange(8))
        for path, on, before, a, b in zip(
            paths, trained, initial, _params(full), _params(part), strict=True
        ):
            if on:
                self.assertFalse(np.array_equal(b, before), path)
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=path)
            else:
                np.testing.assert_array_equal(b, before, err_msg=path)
        moments = sum(x.size for x in jax.tree.leaves(nnx.state(part.optimizer)))
        full_moments = sum(x.size for x in jax.tree.leaves(nnx.state(full.optimizer)))
        trained_size = sum(x.size for x, on in zip(initial, trained, strict=True) if on)
        self.assertLess(moments, 2 * trained_size + 16)
        self.assertGreater(full_moments, 2 * sum(x.size for x in initial))

        directory = os.path.join(tempfile.mkdtemp(), "checkpoints")
        saver = checkpoint.Checkpointer(directory)
        saver.save(
            1,
            model=part.model,
            optimizer=part.optimizer,
            rng=jax.random.key(0),
            data_position={},
            force=True,
        )
        saver.close()
        fresh = _learner(mesh, optim=OptimConfig(**optim, trainable=r"norm|^embed$"))
        checkpoint.Checkpointer(directory).restore(model=fresh.model, optimizer=fresh.optimizer)
        for want, got in zip(_everything(part), _everything(fresh), strict=True):
            np.testing.assert_array_equal(got, want)

    def test_a_pattern_that_is_bad_or_matches_nothing_is_refused(self):
        with self.assertRaisesRegex(ValueError, "not a regular expression"):
            OptimConfig(trainable="layers.(0")
        with self.assertRaisesRegex(ValueError, "matches none of the model's parameters.*embed"):
            _learner(_mesh(), optim=OptimConfig(trainable="lm_head"))


class GuidedMetricsTest(chex.TestCase):
    def test_guided_means_do_not_depend_on_how_the_batch_is_split(self):
        """Guided rows all in the first of two mini-batches: the second has no guided
        token, and must not pull the guided means towards 0."""
        mesh = _mesh()
        guided = np.arange(8) < 4
        results = []
        for mini_batches in (1, 2):
            learner = _learner(
                mesh,
                num_mini_batches=mini_batches,
                num_micro_batches=1,
                optim=OptimConfig(learning_rate=1e-9, eps=1e-3),
            )
            results.append(learner.update(_batch(0, guided=guided), jax.random.key(0)))
        whole, split = results
        self.assertGreater(whole["guided/ratio_mean"], 0.5)
        for name in ("guided/ratio_mean", "guided/clip_ratio/high", "guided/clip_ratio/low"):
            self.assertAlmostEqual(split[name], whole[name], places=3, msg=name)


class ConfigTest(absltest.TestCase):
    def test_warmup_then_constant_or_cosine(self):
        constant = learning_rate_schedule(OptimConfig(learning_rate=1.0, warmup_steps=4))
        np.testing.assert_allclose([constant(s) for s in (0, 2, 4, 100)], [0, 0.5, 1, 1])
        cosine = learning_rate_schedule(
            OptimConfig(
                learning_rate=1.0,
                warmup_steps=2,
                schedule="cosine",
                decay_steps=12,
                final_lr_fraction=0.1,
            )
        )
        np.testing.assert_allclose(
            [cosine(s) for s in (1, 2, 7, 12)], [0.5, 1, 0.55, 0.1], atol=1e-6
        )

    def test_bad_settings_name_the_field(self):
        with self.assertRaisesRegex(ValueError, "Unknown policy loss 'ppo'"):
            train_step.TrainConfig(loss="ppo")
        with self.assertRaisesRegex(ValueError, "Unknown setting"):
            train_step.TrainConfig(loss_settings={"beta": 0.1})
        with self.assertRaisesRegex(ValueError, "num_micro_batches"):
            train_step.TrainConfig(num_micro_batches=0)
        with self.assertRaisesRegex(ValueError, "decay_steps"):
            OptimConfig(schedule="cosine", warmup_steps=10, decay_steps=5)
        self.assertTrue(train_step.TrainConfig(loss="grpo").needs_reference)
        self.assertFalse(train_step.TrainConfig(loss="dapo").needs_reference)

    def test_batch_must_split_into_mini_and_micro_batches(self):
        config = train_step.TrainConfig(num_mini_batches=3, num_micro_batches=2)
        learner = object.__new__(train_step.Learner)
        learner.config = config
        with self.assertRaisesRegex(ValueError, "multiple of num_mini_batches"):
            learner._check_batch(jax.tree.map(jnp.asarray, _batch(0)))


if __name__ == "__main__":
    absltest.main()
