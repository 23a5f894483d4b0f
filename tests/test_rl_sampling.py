"""Tests for ctu.rl.dynamic_sampling with a fake sampler."""

import dataclasses
import subprocess
import sys

from absl.testing import absltest, parameterized

from ctu.rl import dynamic_sampling


@dataclasses.dataclass(frozen=True)
class FakeGroup:
    index: int
    rewards: tuple[float, ...]


class FakeSampler:
    """Yields groups from a fixed pattern of rewards and records each request."""

    def __init__(self, pattern, extra=0):
        self.pattern = pattern
        self.extra = extra  # groups returned beyond the request
        self.requests = []
        self.count = 0

    def __call__(self, n):
        self.requests.append(n)
        groups = []
        for _ in range(n + self.extra):
            rewards = self.pattern[self.count % len(self.pattern)]
            groups.append(FakeGroup(self.count, rewards))
            self.count += 1
        return groups


SIGNAL = (0.0, 1.0, 0.5, 0.0)
FLAT = (0.3, 0.3, 0.3, 0.3)


class DynamicSamplingTest(parameterized.TestCase):
    def test_all_groups_with_signal_take_one_round(self):
        sampler = FakeSampler([SIGNAL])
        groups, stats = dynamic_sampling.dynamic_sample(sampler, target_groups=5)
        self.assertEqual(sampler.requests, [5])
        self.assertEqual([g.index for g in groups], [0, 1, 2, 3, 4])
        self.assertEqual(stats["dynamic_sampling/rounds"], 1)
        self.assertEqual(stats["frac_reward_zero_std"], 0.0)

    def test_refills_what_is_missing(self):
        sampler = FakeSampler([SIGNAL, FLAT])  # every other group has signal
        groups, stats = dynamic_sampling.dynamic_sample(sampler, target_groups=4, max_rounds=5)
        # 4 -> 2 kept; 2 -> 1 kept; 1 -> 1 kept (index 6).
        self.assertEqual(sampler.requests, [4, 2, 1])
        self.assertEqual([g.index for g in groups], [0, 2, 4, 6])
        self.assertEqual(stats["dynamic_sampling/generated"], 7)
        self.assertEqual(stats["dynamic_sampling/dropped"], 3)
        self.assertEqual(stats["dynamic_sampling/rounds"], 3)
        self.assertEqual(stats["dynamic_sampling/shortfall"], 0)
        self.assertAlmostEqual(stats["frac_reward_zero_std"], 3 / 7)

    def test_oversample_and_surplus(self):
        sampler = FakeSampler([SIGNAL, FLAT, FLAT])
        groups, stats = dynamic_sampling.dynamic_sample(
            sampler, target_groups=3, oversample=2.5, max_rounds=4
        )
        # ceil(3 * 2.5) = 8 -> kept 0, 3, 6; done.
        self.assertEqual(sampler.requests, [8])
        self.assertLen(groups, 3)
        self.assertEqual(stats["dynamic_sampling/surplus"], 0)
        sampler = FakeSampler([SIGNAL], extra=2)
        groups, stats = dynamic_sampling.dynamic_sample(sampler, target_groups=3)
        self.assertEqual([g.index for g in groups], [0, 1, 2])
        self.assertEqual(stats["dynamic_sampling/surplus"], 2)

    def test_bound_returns_fewer_and_logs(self):
        sampler = FakeSampler([FLAT, FLAT, SIGNAL])
        with self.assertLogs(level="WARNING") as logs:
            groups, stats = dynamic_sampling.dynamic_sample(sampler, target_groups=4, max_rounds=2)
        # 4 -> kept index 2; 3 -> kept index 5; bound hit.
        self.assertEqual(sampler.requests, [4, 3])
        self.assertEqual([g.index for g in groups], [2, 5])
        self.assertEqual(stats["dynamic_sampling/rounds"], 2)
        self.assertEqual(stats["dynamic_sampling/shortfall"], 2)
        self.assertEqual(stats["dynamic_sampling/padded"], 0)
        self.assertIn("2 of 4 groups", "\n".join(logs.output))

    def test_bound_pads_with_dropped_groups(self):
        sampler = FakeSampler([FLAT, FLAT, SIGNAL])
        groups, stats = dynamic_sampling.dynamic_sample(
            sampler, target_groups=4, max_rounds=2, on_shortfall="pad"
        )
        self.assertEqual([g.index for g in groups], [2, 5, 6, 4])
        self.assertFalse(any(dynamic_sampling.has_signal(g.rewards) for g in groups[2:]))
        self.assertEqual(stats["dynamic_sampling/padded"], 2)

    def test_sampler_that_returns_nothing_stops_at_the_bound(self):
        calls = []
        groups, stats = dynamic_sampling.dynamic_sample(
            lambda n: calls.append(n) or [], target_groups=2, max_rounds=3
        )
        self.assertEqual((groups, calls), ([], [2, 2, 2]))
        self.assertEqual(stats["frac_reward_zero_std"], 0.0)

    def test_custom_rewards_accessor(self):
        groups, _ = dynamic_sampling.dynamic_sample(
            lambda n: [{"scores": [0.0, 1.0]}] * n,
            target_groups=2,
            rewards_of=lambda g: g["scores"],
        )
        self.assertLen(groups, 2)

    @parameterized.parameters(
        ((0.0, 1.0), True),
        ((0.7, 0.7, 0.7), False),
        ((1.0,), False),
        ((), False),
        ((0.2, 0.2, 0.2000001), True),
    )
    def test_has_signal(self, rewards, expected):
        self.assertEqual(dynamic_sampling.has_signal(rewards), expected)

    @parameterized.parameters(
        dict(target_groups=0),
        dict(target_groups=2, max_rounds=0),
        dict(target_groups=2, oversample=0.5),
        dict(target_groups=2, on_shortfall="drop"),
    )
    def test_invalid_settings(self, **settings):
        with self.assertRaises(ValueError):
            dynamic_sampling.dynamic_sample(FakeSampler([SIGNAL]), **settings)

    def test_module_does_not_import_jax(self):
        code = "import sys, ctu.rl.dynamic_sampling; assert 'jax' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    absltest.main()
