"""Tests for ctu.rl.losses against an independent NumPy reference."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from ctu.rl import losses

DEFAULTS = {
    "dapo": {"eps_low": 0.2, "eps_high": 0.28, "kl_coef": 0.0},
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.04},
    "dr_grpo": {"eps_low": 0.2, "eps_high": 0.2, "kl_coef": 0.0},
}


def reference_token_objective(r, a, eps_low, eps_high, dual_clip):
    """Piecewise form of the clipped objective, one token at a time."""
    if a > 0:
        return min(r, 1.0 + eps_high) * a
    if a < 0:
        if dual_clip is not None and r > dual_clip:
            return dual_clip * a
        return max(r, 1.0 - eps_low) * a
    return 0.0


def reference_loss(
    name,
    logp,
    old_logp,
    advantages,
    mask,
    ref_logp=None,
    guided=None,
    eps_low=0.2,
    eps_high=0.28,
    dual_clip=None,
    kl_coef=0.0,
    guided_objective="clip",
    shaping_gamma=0.1,
    max_length=None,
):
    """Loops over sequences and tokens in float64."""
    batch, length = logp.shape
    adv = np.broadcast_to(advantages[:, None], logp.shape) if advantages.ndim == 1 else advantages
    sequence_sums, sequence_means, total_tokens = [], [], 0
    for i in range(batch):
        token_losses = []
        for t in range(length):
            if not mask[i, t]:
                continue
            r = float(np.exp(np.float64(logp[i, t]) - old_logp[i, t]))
            a = float(adv[i, t])
            if guided is not None and guided[i] and guided_objective == "shaped":
                objective = r / (r + shaping_gamma) * a
            else:
                objective = reference_token_objective(r, a, eps_low, eps_high, dual_clip)
            token_loss = -objective
            if kl_coef:
                x = np.float64(ref_logp[i, t]) - logp[i, t]
                token_loss += kl_coef * (np.exp(x) - x - 1.0)
            token_losses.append(token_loss)
        if token_losses:
            sequence_sums.append(sum(token_losses))
            sequence_means.append(sum(token_losses) / len(token_losses))
            total_tokens += len(token_losses)
    if not sequence_sums:
        return 0.0
    if name == "dapo":
        return sum(sequence_sums) / total_tokens
    if name == "grpo":
        return float(np.mean(sequence_means))
    if name == "dr_grpo":
        return sum(sequence_sums) / (len(sequence_sums) * (max_length or length))
    raise ValueError(name)


def random_batch(seed, batch=4, length=6, per_token_adv=False):
    rng = np.random.default_rng(seed)
    old_logp = rng.uniform(-3.0, -0.1, (batch, length)).astype(np.float32)
    logp = (old_logp + rng.normal(0.0, 0.4, (batch, length))).astype(np.float32)
    mask = rng.random((batch, length)) < 0.7
    mask[:, 0] = False
    mask[1] = False  # a row with zero valid tokens
    adv_shape = (batch, length) if per_token_adv else (batch,)
    advantages = rng.normal(0.0, 1.0, adv_shape).astype(np.float32)
    ref_logp = (old_logp + rng.normal(0.0, 0.3, (batch, length))).astype(np.float32)
    return dict(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)


class PolicyLossTest(parameterized.TestCase):
    @chex.variants(with_jit=True)
    @parameterized.product(
        name=("dapo", "grpo", "dr_grpo"),
        per_token_adv=(False, True),
    )
    def test_matches_numpy_reference(self, name, per_token_adv):
        batch = random_batch(seed=len(name), per_token_adv=per_token_adv)
        fn = self.variant(functools.partial(losses.policy_loss, name))
        loss, metrics = fn(**batch)
        expected = reference_loss(name, **batch, **DEFAULTS[name])
        np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
        self.assertEqual(float(metrics["tokens/valid"]), batch["mask"].sum())
        self.assertEqual(float(metrics["sequences/valid"]), (batch["mask"].sum(1) > 0).sum())

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("dapo", "grpo", "dr_grpo")
    def test_matches_reference_with_dual_clip_and_shaping(self, name):
        batch = random_batch(seed=7, batch=5, length=5)
        batch["logp"] = batch["old_logp"] + np.log(
            np.random.default_rng(1).uniform(0.3, 5.0, batch["logp"].shape)
        ).astype(np.float32)
        guided = np.array([True, False, True, False, True])
        settings = dict(DEFAULTS[name], dual_clip=3.0, guided_objective="shaped")
        settings["kl_coef"] = 0.1
        if name == "dr_grpo":
            settings["max_length"] = 9
        fn = self.variant(functools.partial(losses.policy_loss, name, **settings))
        loss, _ = fn(**batch, guided=guided)
        expected = reference_loss(name, **batch, guided=guided, **settings)
        np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)

    def test_clip_fractions_are_exact(self):
        # Per token: (ratio, advantage, valid) and which clip must be active.
        cases = [
            (1.5, 1.0, True),  # high
            (1.29, 2.0, True),  # high (just above 1.28)
            (1.27, 2.0, True),  # none
            (0.5, -1.0, True),  # low
            (0.79, -0.5, True),  # low
            (0.81, -1.0, True),  # none
            (1.5, -1.0, True),  # none: negative advantage is not clipped from above
            (0.5, 1.0, True),  # none: positive advantage is not clipped from below
            (4.0, -1.0, True),  # dual (c = 3)
            (9.0, 1.0, False),  # masked: never counted
            (0.01, -1.0, False),  # masked: never counted
            (1.0, 0.0, True),  # none
        ]
        ratio, adv, valid = (np.array(column) for column in zip(*cases, strict=True))
        old_logp = np.full((1, len(cases)), -1.0, np.float32)
        logp = (old_logp + np.log(ratio)).astype(np.float32)
        _, metrics = losses.policy_loss(
            "dapo",
            logp=logp,
            old_logp=old_logp,
            advantages=adv[None].astype(np.float32),
            mask=valid[None],
            dual_clip=3.0,
        )
        num_valid = valid.sum()
        self.assertAlmostEqual(float(metrics["clip_ratio/high"]), 2 / num_valid, places=6)
        self.assertAlmostEqual(float(metrics["clip_ratio/low"]), 2 / num_valid, places=6)
        self.assertAlmostEqual(float(metrics["clip_ratio/dual"]), 1 / num_valid, places=6)

    def test_gradient_is_zero_exactly_where_clipped(self):
        ratio = np.array([[1.0, 1.5, 0.5, 1.1, 0.5, 4.0, 1.2, 2.0]])
        adv = np.array([[1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0, 1.0]], np.float32)
        mask = np.array([[0, 1, 1, 1, 1, 1, 1, 0]], bool)
        # Token 0 and 7 masked; 1 high-clipped; 2 low-clipped; 5 dual-clipped.
        clipped = np.array([[0, 1, 1, 0, 0, 1, 0, 0]], bool)
        old_logp = np.full(ratio.shape, -2.0, np.float32)
        logp = (old_logp + np.log(ratio)).astype(np.float32)

        def loss_fn(lp):
            return losses.policy_loss(
                "dapo", logp=lp, old_logp=old_logp, advantages=adv, mask=mask, dual_clip=3.0
            )[0]

        grad = np.asarray(jax.jit(jax.grad(loss_fn))(jnp.asarray(logp)))
        free = mask & ~clipped
        np.testing.assert_array_equal(grad[~free], 0.0)
        # d/dlogp of -r A / N is -r A / N for unclipped tokens.
        np.testing.assert_allclose(grad[free], (-ratio * adv / mask.sum())[free], rtol=1e-5)

    @parameterized.parameters("dapo", "grpo", "dr_grpo")
    def test_microbatch_losses_sum_to_full_batch_loss(self, name):
        batch = random_batch(seed=3, batch=6, length=5)
        settings = {"dual_clip": 3.0}
        if name == "dr_grpo":
            settings["max_length"] = 8
        normalizer = losses.loss_normalizer(name, batch["mask"], **settings)

        @jax.jit
        def loss_and_grad(logp, rest, normalizer):
            def loss_fn(lp):
                return losses.policy_loss(name, logp=lp, **rest, normalizer=normalizer, **settings)

            return jax.value_and_grad(lambda lp: loss_fn(lp)[0])(logp)

        def run(rows, normalizer):
            rest = {key: value[rows] for key, value in batch.items() if key != "logp"}
            return loss_and_grad(batch["logp"][rows], rest, normalizer)

        full_loss, full_grad = run(slice(0, 6), None)
        micro = [run(slice(start, start + 2), normalizer) for start in (0, 2, 4)]
        np.testing.assert_allclose(sum(loss for loss, _ in micro), full_loss, rtol=1e-5)
        micro_grad = np.concatenate([grad for _, grad in micro])
        np.testing.assert_allclose(micro_grad, full_grad, rtol=1e-5, atol=1e-7)
        # Without the shared normalizer the token-mean would not add up.
        if name == "dapo":
            separate = sum(run(slice(start, start + 2), None)[0] for start in (0, 2, 4))
            self.assertGreater(abs(float(separate - full_loss)), 1e-3)

    def test_guided_clip_objective_equals_plain_dapo(self):
        batch = random_batch(seed=5)
        guided = np.array([True, False, False, True])
        plain, _ = losses.policy_loss("dapo", **batch)
        guided_loss, metrics = losses.policy_loss("dapo", **batch, guided=guided)
        np.testing.assert_allclose(guided_loss, plain, rtol=1e-6)
        expected_frac = batch["mask"][guided].sum() / batch["mask"].sum()
        self.assertAlmostEqual(float(metrics["guided/frac_tokens"]), expected_frac, places=6)

    def test_per_token_guided_equals_per_sequence_guided(self):
        batch = random_batch(seed=6)
        guided = np.array([False, True, True, False])
        per_token = np.broadcast_to(guided[:, None], batch["logp"].shape)
        fn = jax.jit(functools.partial(losses.policy_loss, "dapo", guided_objective="shaped"))
        by_sequence, _ = fn(**batch, guided=guided)
        by_token, _ = fn(**batch, guided=per_token)
        np.testing.assert_allclose(by_token, by_sequence, rtol=1e-6)
        plain, _ = fn(**batch)
        self.assertGreater(abs(float(by_sequence - plain)), 1e-4)

    @parameterized.parameters("importance", "policy")
    def test_shaped_guided_tokens_are_not_clipped(self, shaped_ratio):
        # Both tokens have ratio 2 > 1 + eps_high with A > 0; only the guided one
        # keeps a gradient, equal to d/dlogp of -f(x) A / N.
        old_logp = np.full((2, 2), -1.5, np.float32)
        logp = (old_logp + np.log(2.0)).astype(np.float32)
        mask = np.array([[0, 1], [0, 1]], bool)
        adv = np.array([1.0, 1.0], np.float32)
        guided = np.array([True, False])
        gamma = 0.1

        def loss_fn(lp):
            return losses.policy_loss(
                "dapo",
                logp=lp,
                old_logp=old_logp,
                advantages=adv,
                mask=mask,
                guided=guided,
                guided_objective="shaped",
                shaping_gamma=gamma,
                shaped_ratio=shaped_ratio,
            )

        value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, metrics), grad = value_and_grad(jnp.asarray(logp))
        x = 2.0 if shaped_ratio == "importance" else float(np.exp(logp[0, 1]))
        expected_loss = -(x / (x + gamma) + 1.28) / 2
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        np.testing.assert_allclose(grad[0, 1], -gamma * x / (x + gamma) ** 2 / 2, rtol=1e-4)
        self.assertEqual(float(grad[1, 1]), 0.0)
        self.assertEqual(float(metrics["clip_ratio/high"]), 0.5)
        self.assertEqual(float(metrics["guided/clip_ratio/high"]), 1.0)

    def test_padding_with_infinite_logp_gives_finite_loss_and_grad(self):
        batch = random_batch(seed=11)
        for key in ("logp", "old_logp", "ref_logp"):
            batch[key] = np.where(batch["mask"], batch[key], -np.inf).astype(np.float32)

        def loss_fn(lp):
            return losses.policy_loss("grpo", **dict(batch, logp=lp))[0]

        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(batch["logp"]))
        self.assertTrue(np.isfinite(loss))
        self.assertTrue(np.all(np.isfinite(grad)))
        np.testing.assert_array_equal(np.asarray(grad)[~batch["mask"]], 0.0)

    @parameterized.parameters("dapo", "grpo", "dr_grpo")
    def test_all_masked_batch_is_zero_not_nan(self, name):
        batch = random_batch(seed=2)
        batch["mask"] = np.zeros_like(batch["mask"])
        loss, metrics = jax.jit(functools.partial(losses.policy_loss, name))(**batch)
        self.assertEqual(float(loss), 0.0)
        for key, value in metrics.items():
            self.assertTrue(np.isfinite(value), key)

    def test_kl_metrics(self):
        batch = random_batch(seed=4)
        _, metrics = losses.policy_loss("grpo", **batch, entropy=np.ones_like(batch["logp"]))
        mask = batch["mask"]
        x = (batch["ref_logp"] - batch["logp"]).astype(np.float64)
        np.testing.assert_allclose(metrics["kl"], (np.exp(x) - x - 1)[mask].mean(), rtol=1e-5)
        y = (batch["logp"] - batch["old_logp"]).astype(np.float64)
        np.testing.assert_allclose(
            metrics["approx_kl_old"], (np.exp(y) - y - 1)[mask].mean(), rtol=1e-5
        )
        self.assertAlmostEqual(float(metrics["entropy"]), 1.0, places=6)
        self.assertNotIn("kl", losses.policy_loss("dapo", **dict(batch, ref_logp=None))[1])

    def test_errors_name_the_valid_choices(self):
        batch = random_batch(seed=0)
        with self.assertRaisesRegex(ValueError, r"valid losses: \('dapo', 'dr_grpo', 'grpo'\)"):
            losses.policy_loss("ppo", **batch)
        with self.assertRaisesRegex(ValueError, r"Unknown setting.*'epsilon'.*eps_low"):
            losses.policy_loss("dapo", **batch, epsilon=0.1)
        with self.assertRaisesRegex(ValueError, "max_length"):
            losses.policy_loss("dapo", **batch, max_length=10)
        with self.assertRaisesRegex(ValueError, "dual_clip must be > 1"):
            losses.policy_loss("dapo", **batch, dual_clip=0.5)
        with self.assertRaisesRegex(ValueError, "guided_objective"):
            losses.policy_loss("dapo", **batch, guided_objective="luffy")
        with self.assertRaisesRegex(ValueError, "needs ref_logp"):
            losses.policy_loss("grpo", **dict(batch, ref_logp=None))
        with self.assertRaises(AssertionError):  # chex shape check
            losses.policy_loss("dapo", **dict(batch, advantages=np.zeros(3, np.float32)))


if __name__ == "__main__":
    absltest.main()
