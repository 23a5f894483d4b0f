"""Tests for ctu.analysis.grad_noise: the noise-scale estimators on gradients drawn
around a known mean, and per-group gradients that add up to the update's."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from configs import feedback_dapo
from ctu import run_config, sharding
from ctu.analysis import grad_noise
from ctu.rl import batching, credit, train_step
from tests import resume_worker


def _draws(rng, b_noise, n=32, dims=2000):
    """n gradients around a unit-norm mean with isotropic noise of trace b_noise."""
    mean = rng.normal(size=dims)
    mean /= np.linalg.norm(mean)
    return mean + np.sqrt(b_noise / dims) * rng.normal(size=(n, dims))


@pytest.mark.parametrize("b_noise", [5.0, 50.0, 500.0])
def test_estimates_are_unbiased_and_the_interval_covers_the_truth(b_noise):
    rng = np.random.default_rng(int(b_noise))
    signals, traces, covered = [], [], 0
    for _ in range(100):
        grads = _draws(rng, b_noise)
        scale = grad_noise.noise_scale(grads)
        signals.append(scale["signal_sq_norm"])
        traces.append(scale["noise_trace"])
        low, high = grad_noise.jackknife_b_noise(grads)
        covered += low <= b_noise <= high
    # |G|^2 = 1; the mean of 100 estimates has a standard error of ~sqrt(2 B / n) / 10.
    assert np.mean(signals) == pytest.approx(1.0, abs=4 * np.sqrt(2 * b_noise / 32) / 10 + 0.02)
    assert np.mean(traces) == pytest.approx(b_noise, rel=0.02)
    assert covered >= 85  # a 90% interval


def test_the_naive_squared_mean_is_what_the_estimate_corrects():
    grads = _draws(np.random.default_rng(0), 500.0)
    scale = grad_noise.noise_scale(grads)
    naive = float(np.sum(grads.mean(0) ** 2))  # biased up by tr(Sigma) / n = 15.6
    assert naive > 10 and abs(scale["signal_sq_norm"] - 1.0) < 5
    assert grad_noise.noise_scale(np.zeros((4, 3)))["b_noise"] == float("inf")
    with pytest.raises(ValueError, match="at least 2"):
        grad_noise.noise_scale(grads[:1])


def test_disjoint_updates_agree_only_through_their_signal():
    rng = np.random.default_rng(1)
    noise_free = grad_noise.disjoint_batch_cosines(_draws(rng, 0.0), 4)
    assert len(noise_free) == 28 and np.allclose(noise_free, 1.0)
    # B_noise = 40 over batches of 4: expected cosine 1 / (1 + 10).
    cosines = grad_noise.disjoint_batch_cosines(_draws(rng, 40.0, n=400), 4)
    assert np.mean(cosines) == pytest.approx(1 / 11, abs=0.02)


@dataclasses.dataclass
class _Record:
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    reward: float
    guided: bool = False
    truncated: bool = False
    kinds: tuple = ()

    def turn_kinds(self):
        return self.kinds

    original_tokens = property(lambda self: self.tokens)
    original_loss_mask = property(lambda self: self.loss_mask)
    original_logprobs = property(lambda self: self.logprobs)
    success = property(lambda self: self.reward >= 1.0)
    num_sampled_tokens = property(lambda self: int(self.loss_mask.sum()))


def _group(rng, rewards, length=40, sampled=12):
    group = []
    for reward in rewards:
        tokens = rng.integers(1, resume_worker.VOCAB, length)
        mask = np.zeros(length, np.int32)
        mask[rng.choice(np.arange(8, length), sampled, replace=False)] = 1
        turns = len(credit.turn_spans(mask))
        kinds = tuple(rng.choice(["search_company", "auth_info_form", "respond"], turns))
        group.append(_Record(tokens, mask, np.zeros(length, np.float32), reward, kinds=kinds))
    return group


def test_group_gradients_average_to_the_update_gradient():
    """With equal token counts per group, DAPO's token mean over a batch is the mean of
    the groups' token means: so is its gradient."""
    config = feedback_dapo.get_config()
    config.algorithm.overlong.enable = False
    settings = run_config.settings_from_config(config)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = sharding.create_sharded_model(resume_worker.tiny_model_config(), mesh, nnx.Rngs(0))
    learner = train_step.Learner(settings.train, model, mesh)
    gradient = grad_noise.group_gradient_fn(learner, settings, pad_id=0)

    rng = np.random.default_rng(0)
    groups = [_group(rng, r) for r in ([1.0, 0.0, 0.3, 0.0], [0.2, 0.7, 0.7, 0.0])]
    per_group = np.stack([gradient(g) for g in groups])
    assert np.all(np.linalg.norm(per_group, axis=1) > 0)

    batch, _ = batching.build_batch(groups, settings=settings.algorithm, rows_multiple=1, pad_id=0)
    prepared = learner.prepare(learner.shard_batch(batch))
    with jax.set_mesh(mesh):
        grads, _ = nnx.jit(
            lambda model, batch: train_step.mini_batch_gradients(model, batch, settings.train)
        )(learner.model, prepared)
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    np.testing.assert_allclose(per_group.mean(0), flat, rtol=1e-4, atol=1e-6)
    # A group whose rewards are all equal has no advantage, so no gradient.
    assert not np.any(gradient(_group(rng, [0.5] * 4)))
    # The parts of each kind of turn add up to the group's gradient.
    for group, whole in zip(groups, per_group, strict=True):
        parts = [gradient(group, kind) for kind in ("search_company", "auth_info_form", "respond")]
        assert all(np.any(p) for p in parts)
        np.testing.assert_allclose(np.sum(parts, 0), whole, rtol=1e-4, atol=1e-6)


def test_kind_shares_find_where_signal_and_noise_are():
    # Part "a" is the mean gradient plus noise e (trace 1); part "b" cancels half of e and
    # adds its own noise f (trace 9). The whole, mean + e / 2 + f, has noise of trace
    # 1/4 + 9; a's share of it is tr Cov(a, whole) = 1/2, b's -1/4 + 9.
    rng = np.random.default_rng(3)
    n, dims = 64, 4000
    mean = rng.normal(size=dims) / np.sqrt(dims)
    e = rng.normal(size=(n, dims)) / np.sqrt(dims)
    f = 3 * rng.normal(size=(n, dims)) / np.sqrt(dims)
    a, b = mean + e, -0.5 * e + f
    shares = grad_noise.kind_shares(a + b, {"a": a, "b": b})
    assert shares["a"]["signal_share"] + shares["b"]["signal_share"] == pytest.approx(1.0)
    assert shares["a"]["noise_share"] + shares["b"]["noise_share"] == pytest.approx(1.0)
    assert shares["a"]["signal_share"] == pytest.approx(1.0, abs=0.2)
    assert shares["a"]["noise_share"] == pytest.approx(0.5 / 9.25, abs=0.02)
    assert shares["a"]["b_noise"] == pytest.approx(1.0, rel=0.5)


def test_overrides_change_existing_settings_and_refuse_the_rest():
    config = feedback_dapo.get_config()
    grad_noise.override_config(
        config, ["algorithm.credit=progress", "rollout.group_size=16", "optimizer.learning_rate=1"]
    )
    assert config.algorithm.credit == "progress" and config.rollout.group_size == 16
    assert config.optimizer.learning_rate == 1.0  # an int where a float is expected
    assert run_config.settings_from_config(config).algorithm.credit == "progress"
    for item, match in [
        ("algorithm.credits=progress", "no key 'algorithm.credits'"),
        ("rollout.group_size.x=1", "no key"),
        ("rollout.group_size=eight", "override 'rollout.group_size=eight'"),
        ("algorithm.credit", "write KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=match):
            grad_noise.override_config(feedback_dapo.get_config(), [item])


def test_fewer_than_three_groups_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="num_groups=2: need at least 3"):
        grad_noise.measure(str(tmp_path / "never_read"), num_groups=2)
