"""Environment benchmark: `python -m launch.bench env --out=FILE.json`.

Figures, on the shipped world (data/world), all 1100 tasks:
- `oracle_tool_calls_per_s`, `oracle_episodes_per_s`: whole oracle episodes
  (reset, policy, every step, the final reward) per wall-clock second, fastest
  of `REPEATS` passes; `*_per_cpu_s` divide by the process's CPU time instead
  (`time.process_time`), which leaves out time spent waiting for a shared core.
- `us_per_tool_call`: one `Environment.step` with a tool call, argument
  validation included: the oracle's calls (search, form, phone) replayed in a
  warm environment; also per tool.
- `us_per_tool_execute`: `Tool.execute` alone on the same calls (validation and
  the tool's work, without the environment's step bookkeeping).
- `us_per_validation`: argument validation alone, on the same arguments.
- `us_per_reward`: one `compute_score_with_feedback` on a finished episode
  (oracle, heuristic and random episodes, so failures and feedback too).

Per-call timings use `time.perf_counter` around each call, `REPEATS` passes:
each call's time is its median over the passes (a pass that lost the core to
another process mid-call does not count), then the mean over calls.
References: tau-bench retail, ~16 us per tool call without validation and
~0.28 s per reward (it replays the episode's actions on a fresh database);
targets are >= 2x and >= 1000x faster.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from ctu.world import agents, data, evaluation, reward, tools
from ctu.world.env import Environment

# The shipped seed-0 world, found from the package (the repo is installed editable).
WORLD_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "data", "world")
# Passes per timing.
REPEATS = 7
TAU_BENCH_US_PER_TOOL_CALL = 16.0
TAU_BENCH_S_PER_REWARD = 0.28
TARGET_TOOL_CALL_SPEEDUP = 2.0
TARGET_REWARD_SPEEDUP = 1000.0


def _run_oracle(world: data.World, tasks) -> int:
    """Runs the oracle over `tasks`; returns the number of tool calls."""
    env = Environment(world, tasks)
    policy = agents.Oracle(world)
    tool_calls = 0
    for task in tasks:
        observation = env.reset(task.task_id)
        policy.reset(task.task_id, observation)
        while True:
            action = policy.act(observation)
            tool_calls += action.name != "respond"
            result = env.step(action)
            observation = result.observation
            if result.done:
                break
    return tool_calls


def _record(world: data.World, tasks, name: str) -> list[tuple[data.Task, list, object]]:
    """(task, actions, finished episode) for each task under a scripted policy."""
    env = Environment(world, tasks)
    recorded = []
    for task in tasks:
        policy = agents.make_policy(name, world, seed=task.task_id)
        observation = env.reset(task.task_id)
        policy.reset(task.task_id, observation)
        actions = []
        while True:
            actions.append(policy.act(observation))
            result = env.step(actions[-1])
            observation = result.observation
            if result.done:
                break
        recorded.append((task, actions, env.episode))
    return recorded


def _tool_step_times(env: Environment, recorded) -> list[tuple[str, float]]:
    """(tool name, seconds) of every tool-call step in one replay of `recorded`."""
    clock = time.perf_counter
    times = []
    for task, actions, _ in recorded:
        env.reset(task.task_id)
        for action in actions:
            if action.name == "respond":
                env.step(action)
                continue
            start = clock()
            env.step(action)
            times.append((action.name, clock() - start))
    return times


def _tool_execute_times(env: Environment, recorded) -> list[float]:
    """Seconds of each `Tool.execute` (validation + the tool's work, no env bookkeeping).

    The bench's own tool instances join each episode through their lifecycle
    (`create`, `release`); the state they act on (user, phone) is the episode's.
    """
    clock = time.perf_counter
    times = []
    episode_tools = {name: cls() for name, cls in tools.TOOL_CLASSES.items()}
    for task, actions, _ in recorded:
        env.reset(task.task_id)
        for tool in episode_tools.values():
            tool.create(env.episode)
        for action in actions:
            tool = episode_tools.get(action.name)
            if tool is not None:
                start = clock()
                tool.execute(action.kwargs)
                times.append(clock() - start)
        for tool in episode_tools.values():
            tool.release()
    return times


def _per_call_us(passes: list[list[float]]) -> list[float]:
    """Each call's median over passes, in microseconds."""
    return [1e6 * statistics.median(times) for times in zip(*passes, strict=True)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _episode_rates(world: data.World, tasks) -> dict:
    cpu, wall = [], []
    for _ in range(REPEATS):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        tool_calls = _run_oracle(world, tasks)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    wall_s, cpu_s = min(wall), statistics.median(cpu)
    return {
        "oracle_tool_calls_per_s": round(tool_calls / wall_s, 1),
        "oracle_episodes_per_s": round(len(tasks) / wall_s, 1),
        "oracle_tool_calls_per_cpu_s": round(tool_calls / cpu_s, 1),
        "oracle_episodes_per_cpu_s": round(len(tasks) / cpu_s, 1),
    }


def _tool_call_timings(world: data.World, tasks, recorded) -> dict:
    # One environment for every pass, warmed by an untimed pass: in training the
    # same tasks repeat, so its memoised company searches are the steady state.
    env = Environment(world, tasks)
    _tool_step_times(env, recorded)
    passes = [_tool_step_times(env, recorded) for _ in range(REPEATS)]
    names = [name for name, _ in passes[0]]
    per_call = _per_call_us([[seconds for _, seconds in p] for p in passes])
    by_tool = {
        tool: round(_mean(us for name, us in zip(names, per_call, strict=True) if name == tool), 3)
        for tool in tools.TOOL_NAMES
    }

    _tool_execute_times(env, recorded)
    execute_us = _per_call_us([_tool_execute_times(env, recorded) for _ in range(REPEATS)])

    validators = {name: cls().validator for name, cls in tools.TOOL_CLASSES.items()}
    arguments = [
        (validators[a.name], a.kwargs)
        for _, actions, _ in recorded
        for a in actions
        if a.name in validators
    ]
    clock = time.perf_counter
    validation_passes = []
    for _ in range(REPEATS):
        times = []
        for validator, kwargs in arguments:
            start = clock()
            validator.error(kwargs)
            times.append(clock() - start)
        validation_passes.append(times)
    return {
        "tool_calls_timed": len(per_call),
        "us_per_tool_call": round(_mean(per_call), 3),
        "us_per_tool_call_by_tool": by_tool,
        "us_per_tool_execute": round(_mean(execute_us), 3),
        "us_per_validation": round(_mean(_per_call_us(validation_passes)), 3),
    }


def _reward_timings(world: data.World, finished) -> dict:
    clock = time.perf_counter
    passes = []
    for _ in range(REPEATS):
        times = []
        for task, _, episode in finished:
            start = clock()
            reward.compute_score_with_feedback(task, world, episode)
            times.append(clock() - start)
        passes.append(times)
    return {"rewards_timed": len(finished), "us_per_reward": round(_mean(_per_call_us(passes)), 3)}


def run(out_path: str, *, max_tasks: int | None = None) -> dict:
    """Benchmarks every task of the shipped world (the first `max_tasks` if given)."""
    world_dir = os.path.normpath(WORLD_DIR)
    world = data.load_world(world_dir)
    tasks = list(world.tasks.values())[:max_tasks]
    oracle = _record(world, tasks, "oracle")
    finished = oracle + _record(world, tasks, "heuristic") + _record(world, tasks, "random")

    results = {
        "benchmark": "env",
        "world": "data/world",
        "tasks": len(tasks),
        "repeats": REPEATS,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
        f"{platform.python_implementation()} {platform.python_version()}",
        **_episode_rates(world, tasks),
        **_tool_call_timings(world, tasks, oracle),
        **_reward_timings(world, finished),
        "reference": {
            "source": "tau-bench retail",
            "us_per_tool_call_without_validation": TAU_BENCH_US_PER_TOOL_CALL,
            "s_per_reward": TAU_BENCH_S_PER_REWARD,
        },
        "targets": {
            "tool_call_speedup": TARGET_TOOL_CALL_SPEEDUP,
            "reward_speedup": TARGET_REWARD_SPEEDUP,
        },
    }
    tool_call_speedup = TAU_BENCH_US_PER_TOOL_CALL / results["us_per_tool_call"]
    reward_speedup = TAU_BENCH_S_PER_REWARD * 1e6 / results["us_per_reward"]
    results["tool_call_speedup"] = round(tool_call_speedup, 2)
    results["reward_speedup"] = round(reward_speedup, 1)
    results["meets_targets"] = {
        "tool_call": tool_call_speedup >= TARGET_TOOL_CALL_SPEEDUP,
        "reward": reward_speedup >= TARGET_REWARD_SPEEDUP,
    }
    evaluation.write_json_atomic(out_path, results)
    return results
