"""Run a policy over a split with K trials -> metrics dict.

A trial is one episode per task. Trial `t` runs the environment with seed
`env_seed(seed, t) = seed + t` (the user simulator's wording and choices) and
gives the policy the per-episode seed `"{seed}:{t}"`, so a run is
deterministic for a seed whatever the batch size. Model evaluation
(ctu/rollout/evaluate.py) uses the same environment seeds, so its numbers
compare with the scripted policies'.

Modes (SPEC "Evaluation"): `cold` runs each episode once with no feedback;
`feedback` then retries every failed episode once, same user, with the
critique of the failure given to the policy at reset, and reports both the
first-try metrics and the success after the retry.

Two policy interfaces plug in:
- a per-episode `Policy` (ctu/world/agents.py: `reset(task_id, observation,
  feedback=None)`, `act(observation) -> Action`), made by a factory
  `make(seed) -> Policy`;
- a `BatchPolicy` that acts for many episodes at once (a model sampling a
  batch): `reset(episodes)` with one `EpisodeStart` per row, then
  `act(rows, observations) -> list[Action]` for the rows still running.
`PerEpisode` adapts the first to the second; `evaluate` drives only the second.

Metrics: success (score 1.0) overall, per level and on held-out companies,
mean score, failure-type counts, mean actions per episode and
pass^k = mean over tasks of C(c, k) / C(n, k) for k = 1..n, n trials with c
successes (tau-bench).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from ctu.world import agents, data, phone, tools, users
from ctu.world.env import Action, Environment

# Splits by the names the command line accepts.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
# A score counts as success at 1.0 (within float noise of the reward's rounding).
SUCCESS_SCORE = 1.0 - 1e-6
# Episodes run side by side; a model policy samples them as one batch.
DEFAULT_BATCH_SIZE = 64
# Most trials per task a run accepts.
MAX_TRIALS = 1000
MODES = ("cold", "feedback")


@dataclasses.dataclass(frozen=True)
class EpisodeStart:
    task_id: str
    trial: int
    seed: str  # per-episode policy seed
    observation: str  # the user's opening message
    feedback: str | None = None  # on a retry, the critique of the failed attempt


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    task_id: str
    level: int
    held_out_company: bool
    trial: int
    score: float
    failure_type: str
    num_actions: int
    ended_by: str
    feedback: str = ""  # the critique of this episode
    # Behaviour (None where the producer did not record it).
    tool_calls: int | None = None
    phone_calls: int | None = None
    malformed_calls: int | None = None  # unknown tool or bad arguments
    order_violations: int | None = None  # calls refused for an unmet prerequisite
    auth_collected: float | None = None  # share of the needed auth fields collected
    minimal_actions: int | None = None  # the oracle's action count for the task
    over_collected: int | None = None  # fields asked for in a form that the task never needs
    completed: bool | None = None  # every request served (penalties or not)

    @property
    def success(self) -> bool:
        return self.score >= SUCCESS_SCORE


class BatchPolicy(Protocol):
    def reset(self, episodes: Sequence[EpisodeStart]) -> None: ...

    def act(self, rows: Sequence[int], observations: Sequence[str]) -> list[Action]: ...


class PerEpisode:
    """A BatchPolicy made of one per-episode policy per row."""

    def __init__(self, make: Callable[[str], agents.Policy]):
        self.make = make
        self.policies: list[agents.Policy] = []

    def reset(self, episodes: Sequence[EpisodeStart]) -> None:
        self.policies = []
        for episode in episodes:
            policy = self.make(episode.seed)
            policy.reset(episode.task_id, episode.observation, episode.feedback)
            self.policies.append(policy)

    def act(self, rows: Sequence[int], observations: Sequence[str]) -> list[Action]:
        return [self.policies[r].act(o) for r, o in zip(rows, observations, strict=True)]


def scripted_policy(name: str, world: data.World) -> BatchPolicy:
    """oracle | heuristic | random, as a BatchPolicy."""
    if name not in agents.POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(agents.POLICIES)}")
    return PerEpisode(lambda seed: agents.make_policy(name, world, seed))


# Policy name -> factory(world) -> BatchPolicy: the scripted names `launch.evaluate
# --policy` accepts (model policies, checkpoint:... and hf:..., are ctu/analysis's).
POLICY_FACTORIES: dict[str, Callable[[data.World], BatchPolicy]] = {
    name: functools.partial(scripted_policy, name) for name in agents.POLICIES
}


def env_seed(seed: int, trial: int) -> int:
    """The environment seed of trial `trial` in a run with seed `seed`."""
    return seed + trial


def split_tasks(world: data.World, split: str) -> list[data.Task]:
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    return world.split(SPLIT_NAMES[split])


def first_tasks(tasks: Sequence[data.Task], num_tasks: int | None) -> list[data.Task]:
    """The first `num_tasks` of `tasks` (all of them for None)."""
    if num_tasks is None:
        return list(tasks)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1 (or unset for the whole split), got {num_tasks}")
    return list(tasks[:num_tasks])


def run_episodes(
    policy: BatchPolicy,
    world: data.World,
    tasks: Sequence[data.Task],
    *,
    trials: int,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_turns: int | None = None,
) -> list[EpisodeResult]:
    """Every (trial, task) episode, in that order, run `batch_size` at a time."""
    if not 1 <= trials <= MAX_TRIALS:
        raise ValueError(f"trials must be in 1..{MAX_TRIALS}, got {trials}")
    queue = [(trial, task, None) for trial in range(trials) for task in tasks]
    return _run_queue(policy, world, queue, seed, batch_size, max_turns)


def retry_failures(
    policy: BatchPolicy,
    world: data.World,
    first: Sequence[EpisodeResult],
    *,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_turns: int | None = None,
) -> list[EpisodeResult]:
    """One retry of every failed episode in `first`, given its critique (same user seed)."""
    queue = [(r.trial, world.tasks[r.task_id], r.feedback) for r in first if not r.success]
    return _run_queue(policy, world, queue, seed, batch_size, max_turns)


def _run_queue(policy, world, queue, seed, batch_size, max_turns) -> list[EpisodeResult]:
    """Runs (trial, task, critique or None) episodes in lockstep batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    env_kwargs = {} if max_turns is None else {"max_turns": max_turns}
    tasks = list({task.task_id: task for _, task, _ in queue}.values())
    pool: dict[tuple[int, int], Environment] = {}  # (row, trial) -> a reusable environment
    results = []
    for start in range(0, len(queue), batch_size):
        chunk = queue[start : start + batch_size]
        for row, (trial, _, _) in enumerate(chunk):
            if (row, trial) not in pool:
                pool[row, trial] = Environment(
                    world, tasks, seed=env_seed(seed, trial), **env_kwargs
                )
        envs = [pool[row, trial] for row, (trial, _, _) in enumerate(chunk)]
        observations = [
            env.reset(task.task_id) for env, (_, task, _) in zip(envs, chunk, strict=True)
        ]
        policy.reset(
            [
                EpisodeStart(
                    task.task_id,
                    trial,
                    f"{seed}:{trial}" + (":retry" if critique is not None else ""),
                    observation,
                    critique,
                )
                for (trial, task, critique), observation in zip(chunk, observations, strict=True)
            ]
        )
        finished: dict[int, EpisodeResult] = {}
        active = list(range(len(chunk)))
        while active:
            actions = policy.act(active, [observations[r] for r in active])
            still_active = []
            for row, action in zip(active, actions, strict=True):
                step = envs[row].step(action)
                observations[row] = step.observation
                if step.done:
                    trial, task, _ = chunk[row]
                    finished[row] = _result(task, trial, step.info, envs[row])
                else:
                    still_active.append(row)
            active = still_active
        results += [finished[row] for row in range(len(chunk))]
    return results


def _result(task: data.Task, trial: int, info: dict, env: Environment) -> EpisodeResult:
    steps = env.episode.steps
    return EpisodeResult(
        task_id=task.task_id,
        level=task.level,
        held_out_company=task.held_out_company,
        trial=trial,
        score=float(info["score"]),
        failure_type=info["failure_type"],
        num_actions=len(steps),
        ended_by=info["ended_by"],
        feedback=info["feedback"],
        **behaviour_fields(env.world, task, steps, info["partial_scores"]),
    )


def behaviour_fields(world: data.World, task: data.Task, steps, partial_scores: dict) -> dict:
    """The behaviour fields of an EpisodeResult, read from an episode's steps (outcomes)
    and its reward's partial scores; shared by the scripted and the model evaluations."""
    calls = [s.outcome for s in steps if isinstance(s.outcome, phone.CallResult)]
    requested = set()
    for s in steps:
        if isinstance(s.outcome, users.FormReply):
            requested.update(s.outcome.provided, s.outcome.lacking, s.outcome.withheld)
    return {
        "tool_calls": sum(s.name in tools.TOOL_NAMES for s in steps),
        "phone_calls": len(calls),
        "malformed_calls": sum(isinstance(s.outcome, tools.Invalid) for s in steps),
        "order_violations": sum(c.status == phone.PREREQUISITE_NOT_MET for c in calls),
        "auth_collected": float(partial_scores["auth_collected"]),
        "minimal_actions": minimal_actions(world, task),
        "over_collected": len(requested - set(task.required_auth_fields)),
        "completed": partial_scores["requests_served"] >= 1.0,
    }


def minimal_actions(world: data.World, task: data.Task) -> int:
    """Search, form, a clarification if the user will ask one, one call per request, report."""
    user = world.users[task.user_id]
    asks = user.behavior == "needs_clarification" and any(
        f in users.JARGON_FIELDS and user.has(f) for f in task.required_auth_fields
    )
    return 3 + len(task.requests) + asks


def pass_hat_k(successes: Sequence[int], trials: int, k: int) -> float:
    """Mean over tasks of C(c, k) / C(n, k): the chance that k i.i.d. trials all succeed."""
    if not 1 <= k <= trials:
        raise ValueError(f"k must be in 1..{trials}, got {k}")
    return sum(math.comb(c, k) for c in successes) / (len(successes) * math.comb(trials, k))


def _rate(results: Sequence[EpisodeResult]) -> dict:
    n = len(results)
    return {
        "episodes": n,
        "success_rate": sum(r.success for r in results) / n if n else None,
        "mean_score": sum(r.score for r in results) / n if n else None,
    }


def summarize(results: Sequence[EpisodeResult], trials: int) -> dict:
    """The metrics dict of a run (JSON-ready)."""
    if not results:
        raise ValueError("no episodes to summarize")
    per_task = collections.Counter()
    for r in results:
        per_task[r.task_id] += r.success
    tasks = {r.task_id for r in results}
    successes = [per_task[t] for t in sorted(tasks)]
    by_level = collections.defaultdict(list)
    for r in results:
        by_level[r.level].append(r)
    return {
        **_rate(results),
        "num_tasks": len(tasks),
        "trials": trials,
        "pass_hat_k": {str(k): pass_hat_k(successes, trials, k) for k in range(1, trials + 1)},
        "by_level": {str(level): _rate(by_level[level]) for level in sorted(by_level)},
        "held_out_company": _rate([r for r in results if r.held_out_company]),
        "seen_company": _rate([r for r in results if not r.held_out_company]),
        "failure_types": dict(collections.Counter(r.failure_type for r in results).most_common()),
        "ended_by": dict(collections.Counter(r.ended_by for r in results).most_common()),
        "mean_actions": sum(r.num_actions for r in results) / len(results),
        "behaviour": behaviour(results),
    }


def behaviour(results: Sequence[EpisodeResult]) -> dict:
    """SPEC behaviour metrics, over the episodes that recorded them.

    info_gathering_completeness: mean share of the needed auth fields collected;
    call_order_correctness: share of phone calls not refused for an unmet
    prerequisite; tool_call_efficiency: mean of minimal / actual actions over the
    episodes that served every request (a short failed episode is not efficient, just
    short; a success has no needless action by the reward's definition, so successes
    alone would always give 1);
    over_collection_rate: share of episodes whose form asked for a field the task
    does not need; malformed_call_rate: share of actions that were malformed tool calls.
    """
    recorded = [r for r in results if r.tool_calls is not None]
    if not recorded:
        return {}
    phone_calls = sum(r.phone_calls for r in recorded)
    phone_refusals = sum(r.order_violations for r in recorded)
    actions = sum(r.num_actions for r in recorded)
    return {
        "info_gathering_completeness": _mean(r.auth_collected for r in recorded),
        "call_order_correctness": 1.0 - phone_refusals / phone_calls if phone_calls else None,
        "tool_call_efficiency": _mean(
            min(1.0, r.minimal_actions / r.num_actions) for r in recorded if r.completed
        ),
        "over_collection_rate": _mean(
            r.over_collected > 0 for r in recorded if r.over_collected is not None
        ),
        "malformed_call_rate": (
            sum(r.malformed_calls for r in recorded) / actions if actions else None
        ),
        "tool_calls_per_episode": sum(r.tool_calls for r in recorded) / len(recorded),
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def evaluate(
    policy: BatchPolicy,
    world: data.World,
    split: str,
    *,
    trials: int = 1,
    seed: int = 0,
    mode: str = "cold",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_tasks: int | None = None,
) -> dict:
    """Runs `policy` over a split (its first `num_tasks` tasks, default all) with
    `trials` trials; returns the metrics dict.

    With mode="feedback" the dict also has `with_feedback`: success and mean
    score after one critiqued retry of each failure, overall and per level.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    tasks = first_tasks(split_tasks(world, split), num_tasks)
    start = time.perf_counter()
    results = run_episodes(policy, world, tasks, trials=trials, seed=seed, batch_size=batch_size)
    metrics = summarize(results, trials)
    if mode == "feedback":
        retries = retry_failures(policy, world, results, seed=seed, batch_size=batch_size)
        metrics["with_feedback"] = summarize_retries(results, retries)
    metrics.update(
        split=SPLIT_NAMES[split], mode=mode, seed=seed, wall_s=round(time.perf_counter() - start, 3)
    )
    return metrics


def summarize_retries(first: Sequence[EpisodeResult], retries: Sequence[EpisodeResult]) -> dict:
    """Metrics of first tries where each failure is replaced by its retry."""
    retried = {(r.trial, r.task_id): r for r in retries}
    final = [retried.get((r.trial, r.task_id), r) for r in first]
    by_level = collections.defaultdict(list)
    for r in final:
        by_level[r.level].append(r)
    return {
        **_rate(final),
        "retried": len(retries),
        "retry_success_rate": _rate(retries)["success_rate"],
        "by_level": {str(level): _rate(by_level[level]) for level in sorted(by_level)},
        "retry_failure_types": dict(
            collections.Counter(r.failure_type for r in retries).most_common()
        ),
    }


def evaluate_and_write(
    policy_name: str,
    split: str,
    data_dir: str,
    out_path: str,
    *,
    trials: int = 1,
    seed: int = 0,
    mode: str = "cold",
    num_tasks: int | None = None,
) -> dict:
    """The `launch.evaluate` command for a scripted policy: load the world, evaluate,
    write JSON, print a table. (All policies: `ctu.analysis.model_eval.evaluate_and_write`.)

    Raises FileNotFoundError / ValueError with a message for a bad directory,
    split, mode or policy name.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"no world directory at {data_dir}; write one with "
            "`python -m launch.make_data --out=DIR` or pass --data=data/world"
        )
    # Checked before the (slow) world load.
    if policy_name not in POLICY_FACTORIES:
        raise ValueError(
            f"unknown policy {policy_name!r}; choose one of {', '.join(POLICY_FACTORIES)}"
        )
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    world = data.load_world(data_dir)
    policy = POLICY_FACTORIES[policy_name](world)
    metrics = {"policy": policy_name, "data": data_dir}
    metrics.update(
        evaluate(policy, world, split, trials=trials, seed=seed, mode=mode, num_tasks=num_tasks)
    )
    write_json_atomic(out_path, metrics)
    print(format_table(metrics))
    return metrics


def check_output_path(path: str) -> None:
    """A ValueError now, before any work, when `path` cannot become a file: it is a
    directory, or a file stands where one of its parent directories would be."""
    if path.endswith(("/", os.sep)):
        raise ValueError(f"--out={path} names a directory; give a file path such as {path}out.json")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--out={path} is a directory; give a file path such as {path}/out.json")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out={path}: {parent} is a file, not a directory")


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON to a temp file in the same directory, then renames it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def format_table(metrics: dict) -> str:
    """A short text table: overall, per level, held-out, pass^k, top failures."""

    def pct(value) -> str:
        return "   -" if value is None else f"{100 * value:5.1f}%"

    rows = [("all", metrics)]
    rows += [(f"level {lvl}", m) for lvl, m in metrics["by_level"].items()]
    rows += [("held-out co.", metrics["held_out_company"])]
    lines = [
        f"policy={metrics['policy']} split={metrics['split']} mode={metrics['mode']} "
        f"trials={metrics['trials']} seed={metrics['seed']} tasks={metrics['num_tasks']}",
        f"{'':14}{'episodes':>9}{'success':>9}{'score':>8}",
    ]
    for label, m in rows:
        score = "   -" if m["mean_score"] is None else f"{m['mean_score']:8.3f}"
        lines.append(f"{label:14}{m['episodes']:>9}{pct(m['success_rate']):>9}{score}")
    lines.append(
        "pass^k: " + "  ".join(f"k={k} {pct(v).strip()}" for k, v in metrics["pass_hat_k"].items())
    )
    failures = [(k, v) for k, v in metrics["failure_types"].items() if k != "success"]
    lines.append("failures: " + (", ".join(f"{k} {v}" for k, v in failures[:6]) or "none"))
    b = metrics["behaviour"]
    if b:
        lines.append(
            f"behaviour: auth collected {pct(b['info_gathering_completeness']).strip()}, "
            f"call order {pct(b['call_order_correctness']).strip()}, "
            f"efficiency {pct(b['tool_call_efficiency']).strip()}, "
            f"malformed {pct(b['malformed_call_rate']).strip()}"
        )
    if "with_feedback" in metrics:
        retry = metrics["with_feedback"]
        levels = " ".join(
            f"L{lvl} {pct(m['success_rate']).strip()}" for lvl, m in retry["by_level"].items()
        )
        lines.append(
            f"with feedback: success {pct(retry['success_rate']).strip()} ({levels}); "
            f"{retry['retried']} retried, {pct(retry['retry_success_rate']).strip()} of them solved"
        )
    return "\n".join(lines)
