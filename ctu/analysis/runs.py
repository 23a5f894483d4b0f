"""Training runs read back from their workdirs, and the numbers compared across them.

A workdir (ctu/train.py) holds `config.json`, `metrics.jsonl` (one row per write; a step
may have several rows with different keys, merged here by step, later values winning)
and, after `launch.evaluate --out=WORKDIR/eval*.json`, evaluation JSONs.

What "samples" and "tasks" count: rollouts *generated* (every episode the policy played
for training, including groups that dynamic sampling then dropped), and the tasks they
were played on. Per step, with dynamic sampling: `dynamic_sampling/generated` groups ×
`rollout.group_size` rollouts; without it: `batch/rows` rollouts (all were trained on),
`batch/rows / group_size` tasks. Step 0 (the evaluation after the warm start) costs
nothing; `samples_at(step)` is the sum over steps 1..step.

Runs are grouped by algorithm: the loss and whether feedback guidance is on
(`algorithm.feedback_guidance.enable`), e.g. "DAPO + feedback" vs "DAPO", and within
that by every other setting that changes what is trained: runs of one group differ only
by seed and by how long, where and how often they ran, logged and evaluated
(`SEED_LIKE_KEYS`), and are aggregated as mean ± standard deviation (over seeds,
ddof=0). Where runs of one algorithm differ in a setting, each group's name says its
value, e.g. "DAPO (optimizer.learning_rate=0.0001)".
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import numpy as np

from ctu.metrics import CONFIG_FILE, METRICS_FILE
from ctu.workdir import RESUMABLE_KEYS, covered, flatten

EVAL_GLOB = "eval*.json"
VAL_SUCCESS = "val/success"
VAL_SCORE = "val/score"
THRESHOLDS = (0.7, 0.9)
# Settings in which the runs of one group may differ: the seed, and what a resumed run
# may change (length, logging, devices), but for the evaluation: runs evaluated on
# other tasks are not seeds of one curve.
SEED_LIKE_KEYS = ("seed", *(key for key in RESUMABLE_KEYS if key != "eval."))


class RunError(ValueError):
    """A workdir that cannot be read as a run at all."""


@dataclasses.dataclass
class Run:
    workdir: str
    name: str  # the workdir's base name
    group: str  # "DAPO + feedback" | "DAPO" | ...
    seed: int | None
    group_size: int | None
    tasks_per_step: int | None
    rows: dict[int, dict]  # step -> merged metrics
    evals: dict[str, dict]  # eval JSON file name -> its metrics
    notes: list[str]  # what is missing, in words
    config: dict = dataclasses.field(default_factory=dict)  # its config.json

    def steps(self, key: str) -> list[int]:
        """Steps whose merged row has a finite value for `key`."""
        return [s for s in sorted(self.rows) if _finite(self.rows[s].get(key))]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps = self.steps(key)
        return steps, [float(self.rows[s][key]) for s in steps]

    def keys(self) -> set[str]:
        return {k for row in self.rows.values() for k in row}

    def per_step_cost(self, step: int) -> tuple[float, float] | None:
        """(rollouts, tasks) generated at a training step; None if the row lacks both
        `dynamic_sampling/generated` and `batch/rows` (or the config lacks group_size)."""
        row = self.rows.get(step, {})
        if self.group_size is None:
            return None
        if _finite(row.get("dynamic_sampling/generated")):
            groups = float(row["dynamic_sampling/generated"])
            return groups * self.group_size, groups
        if _finite(row.get("batch/rows")):
            rows = float(row["batch/rows"])
            return rows, rows / self.group_size
        return None

    def cumulative_cost(self) -> dict[int, tuple[float, float]] | None:
        """step -> (samples, tasks) generated in steps 1..step; None when any training
        step's cost is unknown (a curve against samples would then be wrong)."""
        total_samples = total_tasks = 0.0
        out = {}
        for step in sorted(self.rows):
            if step > 0:
                cost = self.per_step_cost(step)
                if cost is None:
                    return None
                total_samples += cost[0]
                total_tasks += cost[1]
            out[step] = (total_samples, total_tasks)
        return out


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _read_rows(path: str, name: str, notes: list[str]) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON object with a step (e.g.
    torn by a run that is still writing) is skipped with a note."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                notes.append(f"{name}: {METRICS_FILE} line {number} is not a metrics row; skipped")
                continue
            rows.append(row)
    return rows


def merge_rows(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows -> step -> one dict of every key written at that step."""
    merged: dict[int, dict] = {}
    for row in rows:
        step = int(row["step"])
        merged.setdefault(step, {}).update({k: v for k, v in row.items() if k != "step"})
    return merged


def group_name(config: dict) -> str:
    algorithm = config.get("algorithm", {})
    loss = str(algorithm.get("loss", "?")).upper()
    feedback = algorithm.get("feedback_guidance", {}).get("enable")
    return f"{loss} + feedback" if feedback else loss


def load_run(workdir: str) -> Run:
    """Reads one workdir; raises RunError only when it is not a directory. Anything
    missing inside it becomes a note and leaves the run with less data."""
    if not os.path.isdir(workdir):
        raise RunError(f"no run directory at {workdir}")
    name = os.path.basename(os.path.normpath(workdir))
    notes = []
    config = {}
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as error:
            notes.append(f"{name}: {config_path} is not valid JSON ({error}); read without it")
        if not isinstance(config, dict):
            if config:
                notes.append(f"{name}: {config_path} is not a JSON object; read without it")
            config = {}
    else:
        notes.append(f"{name}: no {CONFIG_FILE}: group, seed, group size unknown")
    rollout = config.get("rollout", {})
    rows = {}
    metrics_path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(metrics_path):
        rows = merge_rows(_read_rows(metrics_path, name, notes))
        if not rows:
            notes.append(f"{name}: {METRICS_FILE} is empty")
    else:
        notes.append(f"{name}: no {METRICS_FILE}: no learning curves or training numbers")
    evals = {}
    for path in sorted(glob.glob(os.path.join(workdir, EVAL_GLOB))):
        try:
            with open(path, encoding="utf-8") as f:
                metrics = json.load(f)
        except json.JSONDecodeError as error:
            notes.append(f"{name}: {os.path.basename(path)} is not valid JSON ({error}); skipped")
            continue
        if isinstance(metrics, dict):
            evals[os.path.basename(path)] = metrics
        else:
            notes.append(
                f"{name}: {os.path.basename(path)} is not a JSON object (launch.evaluate "
                "writes one); skipped"
            )
    run = Run(
        workdir=workdir,
        name=name,
        group=group_name(config) if config else "unknown",
        seed=config.get("seed"),
        group_size=rollout.get("group_size"),
        tasks_per_step=rollout.get("tasks_per_step"),
        rows=rows,
        evals=evals,
        notes=notes,
        config=config,
    )
    if rows and not run.steps(VAL_SUCCESS):
        notes.append(f"{name}: no {VAL_SUCCESS} in {METRICS_FILE}: no learning curve")
    if rows and run.cumulative_cost() is None:
        notes.append(
            f"{name}: a training step lacks dynamic_sampling/generated and batch/rows (or "
            "config.json lacks rollout.group_size): samples and tasks unknown, curves by step"
        )
    return run


def _trained_settings(config: dict) -> dict[str, str]:
    """The run's settings but the seed-like ones, dotted, each as JSON text."""
    return {
        key: json.dumps(value)
        for key, value in flatten(config).items()
        if not covered(key, SEED_LIKE_KEYS)
    }


def groups_of(runs: list[Run]) -> dict[str, list[Run]]:
    """Group name -> its runs. Runs of one algorithm (`group_name`) that differ in a
    setting other than `SEED_LIKE_KEYS` go to separate groups, each named with its
    values of the settings that differ (those every run's config.json holds; a setting
    newer than some runs' files is not compared). Sets each run's `group` to its name."""
    by_algorithm: dict[str, list[Run]] = {}
    for run in runs:
        by_algorithm.setdefault(group_name(run.config) if run.config else "unknown", []).append(run)
    out: dict[str, list[Run]] = {}
    for algorithm, members in by_algorithm.items():
        settings = [_trained_settings(run.config) for run in members]
        shared = set.intersection(*(set(s) for s in settings))
        differing = sorted(k for k in shared if len({s[k] for s in settings}) > 1)
        for run, values in zip(members, settings, strict=True):
            if differing:
                named = ", ".join(f"{k}={json.loads(values[k])}" for k in differing)
                run.group = f"{algorithm} ({named})"
            else:
                run.group = algorithm
            out.setdefault(run.group, []).append(run)
    return out


def shared_seeds(groups: dict[str, list[Run]]) -> list[str]:
    """Notes for groups in which runs share a seed: they are not independent seeds."""
    notes = []
    for group, members in sorted(groups.items()):
        by_seed: dict = {}
        for run in members:
            by_seed.setdefault(run.seed, []).append(run.name)
        for seed, names in sorted(by_seed.items(), key=str):
            if len(names) > 1 and seed is not None:
                notes.append(
                    f"group {group}: runs {', '.join(names)} share seed {seed}; its spread "
                    "is not a spread over seeds"
                )
    return notes


# ---- numbers per run --------------------------------------------------------------------


def to_reach(run: Run, threshold: float) -> tuple[float, float, int] | None:
    """(samples, tasks, step) at the first evaluation with val/success >= threshold."""
    cost = run.cumulative_cost()
    if cost is None:
        return None
    for step, value in zip(*run.series(VAL_SUCCESS), strict=True):
        if value >= threshold - 1e-9:
            return (*cost[step], step)
    return None


def final_value(run: Run, key: str) -> float | None:
    steps, values = run.series(key)
    return values[-1] if values else None


def improvement(run: Run, key: str = VAL_SUCCESS) -> float | None:
    """Final `key` (val/success, val/score) minus step 0's: the warm-started policy
    before RL."""
    steps, values = run.series(key)
    if not steps or steps[0] != 0 or len(steps) < 2:
        return None
    return values[-1] - values[0]


def mean_of(run: Run, key: str, *, min_step: int = 1) -> float | None:
    values = [v for s, v in zip(*run.series(key), strict=True) if s >= min_step]
    return float(np.mean(values)) if values else None


def feedback_eval(run: Run) -> tuple[str, dict] | None:
    """The run's evaluation JSON to report: the last (by name) in feedback mode, else the
    last one."""
    if not run.evals:
        return None
    names = sorted(run.evals)
    feedback = [n for n in names if run.evals[n].get("mode") == "feedback"]
    name = (feedback or names)[-1]
    return name, run.evals[name]


# ---- seeds of a group -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curve:
    """A metric of a group against step (and samples), mean and std over its seeds."""

    steps: np.ndarray
    samples: np.ndarray | None  # mean over seeds; None when some seed's samples are unknown
    mean: np.ndarray
    std: np.ndarray
    seeds: int


def group_curve(runs: list[Run], key: str) -> Curve | None:
    """`key` at the steps every run of the group has it, mean ± std over the runs."""
    per_run = [dict(zip(*r.series(key), strict=True)) for r in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return None
    with_key = [r for r in runs if r.steps(key)]
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    values = np.array([[p[s] for s in steps] for p in per_run])
    costs = [r.cumulative_cost() for r in with_key]
    samples = None
    if all(c is not None for c in costs):
        samples = np.mean([[c[s][0] for s in steps] for c in costs], axis=0)
    return Curve(np.array(steps), samples, values.mean(0), values.std(0), len(per_run))


def group_scalar(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, std, count) over the seeds that have a value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return float(np.mean(present)), float(np.std(present)), len(present)
