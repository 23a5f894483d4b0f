"""Per-turn credit (ctu.rl.credit): unbiased by exact enumeration, the episode estimator
when there is no progress, and the turn -> token layout the learner reads."""

import itertools

import numpy as np
import pytest

from ctu.rl import advantages as advantages_lib
from ctu.rl import credit

# A two-turn episode over three actions. Turn 1 draws a1 from softmax(theta1); a1 == 2
# ends the episode with reward END[...]; otherwise turn 2 draws a2 from
# softmax(theta2[a1]) and the reward is REWARD[a1, a2]. PROGRESS[a1] is the score after
# turn 1, the score turn 2 starts from.
RNG = np.random.default_rng(0)
THETA1 = RNG.normal(size=3)
THETA2 = RNG.normal(size=(2, 3))
REWARD = RNG.uniform(size=(2, 3))
END = 0.35
PROGRESS = RNG.uniform(size=2) * 0.5


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _trajectories():
    """(probability, reward, turn scores, d log p / d theta as [theta1 | theta2.ravel()])."""
    p1 = _softmax(THETA1)
    out = []
    for a1 in range(3):
        g1 = np.eye(3)[a1] - p1
        if a1 == 2:
            out.append((p1[a1], END, [0.0], [np.concatenate([g1, np.zeros(6)])]))
            continue
        p2 = _softmax(THETA2[a1])
        for a2 in range(3):
            g2 = np.zeros((2, 3))
            g2[a1] = np.eye(3)[a2] - p2
            scores = [0.0, PROGRESS[a1]]
            grads = [np.concatenate([g1, np.zeros(6)]), np.concatenate([np.zeros(3), g2.ravel()])]
            out.append((p1[a1] * p2[a2], REWARD[a1, a2], scores, grads))
    return out


def _true_gradient():
    return sum(p * r * sum(grads) for p, r, _, grads in _trajectories())


def _expected_update(estimator, credit_mode, n=3):
    """E over groups of n rollouts of (1/n) sum_i sum_k A[i, k] grad log pi(a[i, k])."""
    trajectories = _trajectories()
    total = np.zeros(9)
    for group in itertools.product(trajectories, repeat=n):
        probability = np.prod([t[0] for t in group])
        rewards = [t[1] for t in group]
        if credit_mode == "progress":
            per_turn = credit.turn_advantages(estimator, rewards, [t[2] for t in group])
        else:
            episode = np.asarray(advantages_lib.group_advantages(estimator, np.array([rewards])))
            per_turn = [np.full(len(t[3]), a) for t, a in zip(group, episode[0], strict=True)]
        update = sum(
            a * g
            for t, adv in zip(group, per_turn, strict=True)
            for a, g in zip(adv, t[3], strict=True)
        )
        total += probability * update / n
    return total


def test_rloo_progress_credit_is_exactly_the_policy_gradient():
    truth = _true_gradient()
    assert np.linalg.norm(truth) > 0.05
    np.testing.assert_allclose(_expected_update("rloo", "progress"), truth, atol=1e-6)
    np.testing.assert_allclose(_expected_update("rloo", "episode"), truth, atol=1e-6)


def test_dr_grpo_progress_credit_is_the_gradient_scaled_by_n_minus_1_over_n():
    truth = _true_gradient()
    np.testing.assert_allclose(_expected_update("dr_grpo", "progress"), truth * 2 / 3, atol=1e-6)


def test_progress_credit_has_less_variance_when_later_turns_add_noise():
    # Turn 1 decides most of the reward (PROGRESS), turn 2 adds noise around it: judged
    # from the score it started from, turn 1's outcome no longer moves turn 2's update.
    p1 = _softmax(THETA1)
    rng = np.random.default_rng(1)
    spread = {"episode": [], "progress": []}
    for _ in range(400):
        a1 = rng.choice(3, size=8, p=p1)
        scores = [[0.0] if a == 2 else [0.0, 0.6 * a] for a in a1]
        rewards = [END if a == 2 else 0.6 * a + rng.uniform(0, 0.2) for a in a1]
        progress = credit.turn_advantages("rloo", rewards, scores)
        episode = np.asarray(advantages_lib.group_advantages("rloo", np.array([rewards])))[0]
        spread["progress"] += [adv[1] for adv in progress if len(adv) == 2]
        spread["episode"] += [e for e, adv in zip(episode, progress, strict=True) if len(adv) == 2]
    assert np.var(spread["progress"]) < 0.5 * np.var(spread["episode"])


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_without_progress_it_is_the_episode_estimator(estimator):
    rng = np.random.default_rng(2)
    for _ in range(20):
        n, turns = rng.integers(2, 9), rng.integers(1, 6)
        rewards = rng.uniform(size=n).round(1)
        per_turn = credit.turn_advantages(estimator, rewards, [[0.0] * turns] * n)
        episode = np.asarray(advantages_lib.group_advantages(estimator, rewards[None]))[0]
        np.testing.assert_allclose(
            np.stack(per_turn), np.repeat(episode[:, None], turns, 1), atol=1e-5
        )


def test_turns_after_an_episode_ended_count_as_nothing_to_come():
    # Rollout 0 stopped after 1 turn: at turn 2 it had 0 to come; rollouts 1 and 2 had
    # 0.6 - 0.2 and 0.1 - 0.1.
    per_turn = credit.turn_advantages("dr_grpo", [0.3, 0.6, 0.1], [[0.0], [0.0, 0.2], [0.0, 0.1]])
    np.testing.assert_allclose(per_turn[0], [0.3 - 1 / 3], atol=1e-6)
    np.testing.assert_allclose(per_turn[1], [0.6 - 1 / 3, 0.4 - 0.4 / 3], atol=1e-6)
    np.testing.assert_allclose(per_turn[2], [0.1 - 1 / 3, 0.0 - 0.4 / 3], atol=1e-6)


def test_lambda_discounts_what_later_turns_gained():
    # Gains 0.3, 0, 0.6 (the reward 0.9 after the last turn): lam = 1 sums them, lam = 0
    # keeps each turn's own, lam = 0.5 halves each further turn's.
    scores = [0.0, 0.3, 0.3]
    np.testing.assert_allclose(credit.to_come(0.9, scores, 1.0), [0.9, 0.6, 0.6])
    np.testing.assert_allclose(credit.to_come(0.9, scores, 0.0), [0.3, 0.0, 0.6])
    np.testing.assert_allclose(credit.to_come(0.9, scores, 0.5), [0.3 + 0.15, 0.3, 0.6])
    rewards, turns = [0.9, 0.2], [scores, [0.0, 0.2]]
    by_hand = [credit.to_come(r, t, 0.5) for r, t in zip(rewards, turns, strict=True)]
    dr = credit.turn_advantages("dr_grpo", rewards, turns, lam=0.5)
    means = [
        (by_hand[0][0] + by_hand[1][0]) / 2,
        (by_hand[0][1] + by_hand[1][1]) / 2,
        by_hand[0][2] / 2,
    ]
    np.testing.assert_allclose(dr[0], by_hand[0] - means, atol=1e-6)
    np.testing.assert_allclose(dr[1], by_hand[1] - means[:2], atol=1e-6)


def test_grpo_gives_an_all_equal_group_zeros_and_scales_by_the_reward_spread():
    zeros = credit.turn_advantages("grpo", [0.3, 0.3], [[0.0, 0.3], [0.0, 0.0, 0.2]])
    assert [z.tolist() for z in zeros] == [[0.0, 0.0], [0.0, 0.0, 0.0]]
    rewards, scores = [1.0, 0.0, 0.5], [[0.0, 0.3], [0.0], [0.0, 0.2]]
    grpo = credit.turn_advantages("grpo", rewards, scores)
    dr = credit.turn_advantages("dr_grpo", rewards, scores)
    for g, d in zip(grpo, dr, strict=True):
        np.testing.assert_allclose(g, d / (np.std(rewards) + 1e-6), rtol=1e-5)


def test_token_advantages_fill_each_sampled_turn():
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    assert credit.turn_spans(mask) == [(2, 4), (6, 7), (8, 11)]
    out = credit.token_advantages(np.array([0.5, -1.0, 2.0]), mask)
    assert out.tolist() == [0, 0, 0.5, 0.5, 0, 0, -1.0, 0, 2.0, 2.0, 2.0]
    assert not credit.token_advantages(np.array([0.5]), np.zeros(5)).any()
    with pytest.raises(ValueError, match="2 sampled turns but the rollout records 3"):
        credit.token_advantages(np.ones(3), np.array([1, 0, 1]))
