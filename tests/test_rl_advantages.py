"""Tests for ctu.rl.advantages against per-group NumPy loops."""

import functools

import chex
import jax
import numpy as np
from absl.testing import absltest, parameterized

from ctu.rl import advantages

PARTIAL_CREDIT = np.array([0.0, 0.2, 0.3, 0.5, 0.7, 1.0])


def reference(name, group, eps=1e-6, ddof=0):
    group = np.asarray(group, np.float64)
    n = len(group)
    if np.all(group == group[0]):
        return np.zeros(n)
    if name == "grpo":
        return (group - group.mean()) / (group.std(ddof=ddof) + eps)
    if name == "dr_grpo":
        return group - group.mean()
    if name == "rloo":
        return np.array([group[i] - np.delete(group, i).mean() for i in range(n)])
    raise ValueError(name)


def random_rewards(seed, num_groups=6, group_size=5):
    rng = np.random.default_rng(seed)
    rewards = rng.choice(PARTIAL_CREDIT, size=(num_groups, group_size))
    rewards[0] = 0.3  # all equal: 0.3 is not exact in binary
    rewards[1] = 0.7
    rewards[2, 0] = 1.0
    rewards[2, 1:] = 0.0  # one success
    return rewards


class GroupAdvantagesTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("grpo", "dr_grpo", "rloo")
    def test_grouped_matches_reference(self, name):
        rewards = random_rewards(seed=1)
        result = self.variant(functools.partial(advantages.group_advantages, name))(rewards)
        expected = np.stack([reference(name, group) for group in rewards])
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
        # All-equal groups are exactly zero.
        np.testing.assert_array_equal(result[:2], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("grpo", "dr_grpo", "rloo")
    def test_flat_ragged_shuffled_groups(self, name):
        rng = np.random.default_rng(2)
        sizes = [1, 2, 5, 3, 4]
        group_ids = np.repeat(np.arange(len(sizes)), sizes)
        rewards = rng.choice(PARTIAL_CREDIT, size=len(group_ids))
        rewards[group_ids == 3] = 0.2
        order = rng.permutation(len(group_ids))
        group_ids, rewards = group_ids[order], rewards[order]
        fn = functools.partial(advantages.group_advantages, name, num_groups=len(sizes))
        result = np.asarray(self.variant(fn)(rewards, group_ids=group_ids))
        for g in range(len(sizes)):
            members = group_ids == g
            np.testing.assert_allclose(
                result[members], reference(name, rewards[members]), rtol=1e-5, atol=1e-6
            )
        self.assertTrue(np.all(np.isfinite(result)))

    def test_flat_equals_grouped(self):
        rewards = random_rewards(seed=3)
        group_ids = np.repeat(np.arange(rewards.shape[0]), rewards.shape[1])
        flat = advantages.group_advantages("grpo", rewards.reshape(-1), group_ids=group_ids)
        grouped = advantages.group_advantages("grpo", rewards)
        np.testing.assert_allclose(flat.reshape(rewards.shape), grouped, rtol=1e-6)

    def test_grpo_settings(self):
        rewards = random_rewards(seed=4)
        result = advantages.group_advantages("grpo", rewards, eps=0.5, ddof=1)
        expected = np.stack([reference("grpo", g, eps=0.5, ddof=1) for g in rewards])
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)

    def test_properties(self):
        rewards = random_rewards(seed=5)
        for name in ("grpo", "dr_grpo", "rloo"):
            result = np.asarray(advantages.group_advantages(name, rewards))
            np.testing.assert_allclose(result.sum(axis=1), 0.0, atol=1e-5)
        # RLOO is n / (n - 1) times the mean-centred advantage.
        n = rewards.shape[1]
        np.testing.assert_allclose(
            advantages.group_advantages("rloo", rewards),
            n / (n - 1) * np.asarray(advantages.group_advantages("dr_grpo", rewards)),
            rtol=1e-5,
            atol=1e-6,
        )

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, r"valid estimators: \('dr_grpo', 'grpo', 'rloo'\)"):
            advantages.group_advantages("ppo", np.zeros((2, 2)))
        with self.assertRaisesRegex(ValueError, r"Unknown setting.*'eps'.*advantage"):
            advantages.group_advantages("rloo", np.zeros((2, 2)), eps=0.1)
        with self.assertRaisesRegex(ValueError, "ddof"):
            advantages.group_advantages("grpo", np.zeros((2, 2)), ddof=2)
        with self.assertRaisesRegex(ValueError, "num_groups"):
            jax.jit(lambda r, ids: advantages.group_advantages("grpo", r, group_ids=ids))(
                np.zeros(4), np.zeros(4, np.int32)
            )
        with self.assertRaises(AssertionError):
            advantages.group_advantages("grpo", np.zeros(4))  # flat without group_ids
        ids = np.array([0, 0, 1, 1, 2, 2], np.int32)
        with self.assertRaisesRegex(ValueError, r"group_ids span 0\.\.2 but num_groups=2"):
            advantages.group_advantages("rloo", np.arange(6.0), group_ids=ids, num_groups=2)
        with self.assertRaisesRegex(ValueError, "span -1"):
            advantages.group_advantages("rloo", np.arange(6.0), group_ids=ids - 1, num_groups=3)


if __name__ == "__main__":
    absltest.main()
