"""The env benchmark writes consistent figures against the tau-bench references."""

import json

import pytest

from ctu.bench import env as bench_env


def test_env_benchmark_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_env, "REPEATS", 1)
    out = tmp_path / "bench_env.json"
    results = bench_env.run(str(out), max_tasks=300)
    assert json.loads(out.read_text()) == results

    assert results["tasks"] == 300
    for key in (
        "oracle_tool_calls_per_s",
        "oracle_episodes_per_s",
        "us_per_tool_call",
        "us_per_tool_execute",
        "us_per_validation",
        "us_per_reward",
    ):
        assert results[key] > 0, key
    # Every oracle episode is a search, a form and one call per request.
    assert results["tool_calls_timed"] >= 3 * results["tasks"]
    assert results["rewards_timed"] == 3 * results["tasks"]
    ratio = results["oracle_tool_calls_per_s"] / results["oracle_episodes_per_s"]
    assert ratio == pytest.approx(results["tool_calls_timed"] / results["tasks"], rel=1e-3)

    reference = results["reference"]
    assert reference["us_per_tool_call_without_validation"] == 16.0
    assert reference["s_per_reward"] == 0.28
    assert results["tool_call_speedup"] == pytest.approx(16.0 / results["us_per_tool_call"], 0.01)
    assert results["reward_speedup"] == pytest.approx(0.28e6 / results["us_per_reward"], 0.01)
    assert results["meets_targets"]["tool_call"] == (results["tool_call_speedup"] >= 2.0)
    # The reward target has a wide margin (>10x over 1000x), so it holds even on a busy machine.
    assert results["meets_targets"]["reward"]
