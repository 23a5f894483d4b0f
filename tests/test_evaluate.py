"""Evaluation: pass^k against brute force, determinism, batch policies, the CLI."""

import itertools
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctu.world import agents, evaluation
from ctu.world.env import Action
from tests import toys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REQUIRED_KEYS = {
    "policy",
    "split",
    "trials",
    "seed",
    "num_tasks",
    "episodes",
    "success_rate",
    "mean_score",
    "pass_hat_k",
    "by_level",
    "held_out_company",
    "failure_types",
}


def _brute_force_pass_hat_k(outcomes: list[list[bool]], k: int) -> float:
    """Mean over tasks of the share of k-subsets of its trials that all succeed."""
    shares = []
    for trials in outcomes:
        subsets = list(itertools.combinations(trials, k))
        shares.append(sum(all(s) for s in subsets) / len(subsets))
    return sum(shares) / len(shares)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=8)
    )
)
def test_pass_hat_k_matches_brute_force(outcomes):
    n = len(outcomes[0])
    successes = [sum(trials) for trials in outcomes]
    for k in range(1, n + 1):
        expected = _brute_force_pass_hat_k(outcomes, k)
        assert evaluation.pass_hat_k(successes, n, k) == pytest.approx(expected, abs=1e-12)


def test_pass_hat_k_from_episodes():
    results = [
        evaluation.EpisodeResult(t, 1, False, trial, score, "x", 1, "user")
        for t, scores in (("a", [1.0, 1.0, 0.5]), ("b", [1.0, 0.0, 0.0]))
        for trial, score in enumerate(scores)
    ]
    metrics = evaluation.summarize(results, trials=3)
    # a: c=2, b: c=1 -> k=1: (2/3 + 1/3)/2; k=2: (1/3 + 0)/2; k=3: 0.
    assert metrics["pass_hat_k"] == pytest.approx({"1": 0.5, "2": 1 / 6, "3": 0.0})
    assert metrics["success_rate"] == pytest.approx(0.5)


def _random_run(*, seed, batch_size=evaluation.DEFAULT_BATCH_SIZE):
    world = toys.shipped_world()
    policy = evaluation.scripted_policy("random", world)
    tasks = world.split("val")[:40]
    return evaluation.run_episodes(policy, world, tasks, trials=2, seed=seed, batch_size=batch_size)


def test_deterministic_for_a_seed_and_independent_of_batch_size():
    first = _random_run(seed=7)
    assert len(first) == 80
    assert first == _random_run(seed=7, batch_size=7)
    assert first != _random_run(seed=8)
    metrics = evaluation.summarize(first, trials=2)
    assert metrics == evaluation.summarize(_random_run(seed=7, batch_size=1), trials=2)


class _BatchedOracle:
    """A BatchPolicy that acts for all rows at once, as a model sampler would."""

    def __init__(self, world):
        self.world = world
        self.widest = 0

    def reset(self, episodes):
        self.policies = [agents.Oracle(self.world) for _ in episodes]
        for policy, episode in zip(self.policies, episodes, strict=True):
            policy.reset(episode.task_id, episode.observation)

    def act(self, rows, observations) -> list[Action]:
        self.widest = max(self.widest, len(rows))
        return [self.policies[r].act(o) for r, o in zip(rows, observations, strict=True)]


def test_batch_policy_plugs_in():
    world = toys.shipped_world()
    policy = _BatchedOracle(world)
    metrics = evaluation.evaluate(policy, world, "val", trials=1, batch_size=32)
    assert metrics["success_rate"] == 1.0
    assert policy.widest == 32


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.evaluate", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_writes_valid_json(tmp_path):
    out = tmp_path / "sub" / "eval.json"
    proc = _cli(
        "--policy=heuristic", "--split=val", "--trials=2", "--mode=feedback", f"--out={out}"
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["policy"] == "heuristic" and metrics["split"] == "val"
    assert set(metrics["by_level"]) == {"1", "2", "3", "4", "5"}
    assert set(metrics["pass_hat_k"]) == {"1", "2"}
    assert sum(metrics["failure_types"].values()) == metrics["episodes"] == 200
    assert metrics["mode"] == "feedback"
    assert metrics["with_feedback"]["success_rate"] >= metrics["success_rate"]
    assert "level 3" in proc.stdout and "pass^k" in proc.stdout and "with feedback" in proc.stdout
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split=dev"], "--split"),
        (["--data=/no/such/world"], "launch.make_data"),
        (["--policy=genius"], "--policy"),
        (["--mode=hint"], "--mode"),
        (["--out=/tmp"], "is a directory"),
    ],
)
def test_cli_user_errors_exit_nonzero_with_a_message(tmp_path, args, message):
    defaults = {"--policy": "oracle", "--split": "val", "--out": str(tmp_path / "x.json")}
    for arg in args:
        defaults[arg.split("=")[0]] = arg.split("=", 1)[1]
    proc = _cli(*(f"{k}={v}" for k, v in defaults.items()))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_an_output_path_that_cannot_be_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    evaluation.check_output_path(str(tmp_path / "new" / "deeper" / "out.json"))  # made later
    for bad, message in [
        (tmp_path, "is a directory"),
        (tmp_path / "afile" / "out.json", "is a file, not a directory"),
        (f"{tmp_path}/not_yet/", "names a directory"),
    ]:
        with pytest.raises(ValueError, match=message):
            evaluation.check_output_path(str(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.make_data", f"--out={tmp_path / 'afile'}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode != 0 and "is a file; give a directory" in proc.stderr
    assert (tmp_path / "afile").read_text() == "x"
