"""`launch.compare`: plots and a markdown summary comparing training runs.

    compare(["runs/fd_s0", "runs/fd_s1", "runs/base_s0"], "runs/compare")

reads each workdir (`ctu.analysis.runs`: merged metrics.jsonl, config.json, eval*.json)
and writes into the output directory:

- learning_curves.png: val/success against rollouts generated and against step, and
  val/score (partial credit) against rollouts generated, one line per group (e.g.
  "DAPO + feedback" vs "DAPO") with a ±std band over seeds;
- success_by_rollout_position.png: training success of rollout 1..n of a group
  (`success_at_rollout/k`, mean over steps);
- success_per_level.png: val/success_level_L at the last evaluation, step 0 marked;
- failure_modes.png: failure-type shares from the runs' evaluation JSONs (and from
  `failure/<type>` training metrics, if a run logs them);
- summary.md: sample efficiency (rollouts and tasks generated until val/success first
  reaches 70% and 90%; "not reached" when it never does), final val success, base-policy
  improvement (final minus step-0 val/success), mean `timing_s/step`, the evaluation
  JSONs' cold and with-feedback success, and what was missing.

A run that lacks something gives a note naming the run and what it lacks; the plots and
numbers that can be made are made.
"""

from __future__ import annotations

import collections
import dataclasses
import os

from ctu.analysis import plots
from ctu.analysis import runs as runs_lib

SUMMARY_FILE = "summary.md"
FAILURE_METRIC_PREFIX = "failure/"


@dataclasses.dataclass
class Comparison:
    runs: list[runs_lib.Run]
    plots: dict[str, str]  # plot name -> path of the PNG written
    summary_path: str
    notes: list[str]


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _fmt_count(value: float | None) -> str:
    """Whole counts as integers; a mean over seeds may need a decimal."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _fmt_score(value: float | None, sign: str = "") -> str:
    return "n/a" if value is None else f"{value:{sign}.3f}"


def _fmt_points(value: float, sign: str = "+") -> str:
    return f"{100 * value:{sign}.1f} pts"


def _fmt_stat(stat, fmt, std_fmt=None) -> str:
    """ "mean ± std" over seeds ("mean" alone when they agree)."""
    if stat is None:
        return "n/a"
    mean, std, _ = stat
    return fmt(mean) if std == 0 else f"{fmt(mean)} ± {(std_fmt or fmt)(std)}"


def failure_shares(runs: list[runs_lib.Run]) -> dict[str, dict[str, float]]:
    """label -> outcome ("success" or a failure type) -> share of episodes, from eval
    JSONs (first tries) and from training: each step's `success/rate` and
    `failure/<type>` (shares of all its rollouts), averaged over steps."""
    out = {}
    for run in runs:
        for name, metrics in sorted(run.evals.items()):
            counts = metrics.get("failure_types") or {}
            total = sum(counts.values())
            if total:
                out[f"{run.name}: {name}"] = {k: v / total for k, v in counts.items()}
        counts = collections.Counter()
        for row in run.rows.values():
            success = row.get("success/rate")
            failures = {
                key[len(FAILURE_METRIC_PREFIX) :]: value
                for key, value in row.items()
                if key.startswith(FAILURE_METRIC_PREFIX) and isinstance(value, int | float)
            }
            # A training step with its outcomes: failure shares, or all successes. (Runs
            # older than the failure metrics have neither, and no training bar.)
            if isinstance(success, int | float) and (failures or success >= 1.0):
                counts["success"] += success
                counts.update(failures)
        total = sum(counts.values())
        if total:
            out[f"{run.name}: training"] = {k: v / total for k, v in counts.items()}
    return out


# ---- summary.md ---------------------------------------------------------------------------


def _reach_cells(run: runs_lib.Run) -> list[str]:
    cells = []
    for threshold in runs_lib.THRESHOLDS:
        if run.cumulative_cost() is None or not run.steps(runs_lib.VAL_SUCCESS):
            cells += ["n/a", "n/a"]
            continue
        reached = runs_lib.to_reach(run, threshold)
        if reached is None:
            cells += ["not reached", "not reached"]
        else:
            cells += [_fmt_count(reached[0]), _fmt_count(reached[1])]
    return cells


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# The columns the per-run and per-group tables share, after their identifying ones.
_METRIC_COLUMNS = (
    "samples to 70%",
    "tasks to 70%",
    "samples to 90%",
    "tasks to 90%",
    "final val success",
    "base-policy improvement",
    "final val score",
    "score improvement",
    "mean step time (s)",
)


def run_table(runs: list[runs_lib.Run]) -> list[str]:
    header = [
        "run",
        "group",
        "seed",
        "last step",
        *_METRIC_COLUMNS,
    ]
    rows = []
    for run in runs:
        steps = sorted(run.rows)
        improvement = runs_lib.improvement(run)
        rows.append(
            [
                run.name,
                run.group,
                "n/a" if run.seed is None else str(run.seed),
                str(steps[-1]) if steps else "n/a",
                *_reach_cells(run),
                _fmt_pct(runs_lib.final_value(run, runs_lib.VAL_SUCCESS)),
                "n/a" if improvement is None else _fmt_points(improvement),
                _fmt_score(runs_lib.final_value(run, runs_lib.VAL_SCORE)),
                _fmt_score(runs_lib.improvement(run, runs_lib.VAL_SCORE), "+"),
                _fmt_seconds(runs_lib.mean_of(run, "timing_s/step")),
            ]
        )
    return _table(header, rows)


def feedback_table(runs: list[runs_lib.Run]) -> list[str]:
    header = [
        "run",
        "evaluation",
        "cold-start success",
        "with-feedback success",
        "cold-start score",
        "with-feedback score",
        "train first-try success",
        "train with-feedback success",
    ]
    rows = []
    for run in runs:
        chosen = runs_lib.feedback_eval(run)
        name, metrics = chosen if chosen else ("none", {})
        retried = metrics.get("with_feedback", {})
        rows.append(
            [
                run.name,
                name,
                _fmt_pct(metrics.get("success_rate")),
                _fmt_pct(retried.get("success_rate")),
                _fmt_score(metrics.get("mean_score")),
                _fmt_score(retried.get("mean_score")),
                _fmt_pct(runs_lib.mean_of(run, "success/first_try")),
                _fmt_pct(runs_lib.mean_of(run, "success/with_feedback")),
            ]
        )
    return _table(header, rows)


def _group_reach(runs: list[runs_lib.Run], threshold: float, index: int) -> str:
    values = [runs_lib.to_reach(r, threshold) for r in runs]
    if any(r.cumulative_cost() is None or not r.steps(runs_lib.VAL_SUCCESS) for r in runs):
        return "n/a"
    missing = sum(v is None for v in values)
    if missing:
        return f"not reached ({missing}/{len(runs)} seeds)"
    return _fmt_stat(runs_lib.group_scalar([v[index] for v in values]), _fmt_count)


def group_table(groups: dict[str, list[runs_lib.Run]]) -> list[str]:
    header = [
        "group",
        "seeds",
        *_METRIC_COLUMNS,
    ]
    rows = []
    for group, runs in sorted(groups.items()):
        improvement = runs_lib.group_scalar([runs_lib.improvement(r) for r in runs])
        rows.append(
            [
                group,
                str(len(runs)),
                *(_group_reach(runs, t, i) for t in runs_lib.THRESHOLDS for i in (0, 1)),
                _fmt_stat(
                    runs_lib.group_scalar(
                        [runs_lib.final_value(r, runs_lib.VAL_SUCCESS) for r in runs]
                    ),
                    _fmt_pct,
                ),
                _fmt_stat(improvement, _fmt_points, lambda v: _fmt_points(v, "")),
                _fmt_stat(
                    runs_lib.group_scalar(
                        [runs_lib.final_value(r, runs_lib.VAL_SCORE) for r in runs]
                    ),
                    _fmt_score,
                ),
                _fmt_stat(
                    runs_lib.group_scalar(
                        [runs_lib.improvement(r, runs_lib.VAL_SCORE) for r in runs]
                    ),
                    lambda v: _fmt_score(v, "+"),
                    _fmt_score,
                ),
                _fmt_stat(
                    runs_lib.group_scalar([runs_lib.mean_of(r, "timing_s/step") for r in runs]),
                    _fmt_seconds,
                ),
            ]
        )
    return _table(header, rows)


def summary_markdown(
    runs: list[runs_lib.Run], groups, plot_paths: dict[str, str], notes: list[str]
) -> str:
    lines = [
        "# Run comparison",
        "",
        "Samples and tasks count rollouts (episodes) and tasks *generated* for training up",
        "to the first evaluation with val/success at or above the threshold (dynamic",
        "sampling: `dynamic_sampling/generated` groups × group size; else `batch/rows`).",
        "Group values are mean ± std over seeds. Base-policy improvement is the final",
        "val/success minus step 0's (after the warm start); score improvement the same for",
        "val/score, the mean partial credit (0 to 1). Training first-try and",
        "with-feedback success are means over training steps.",
        "",
        "## Runs",
        "",
        *run_table(runs),
        "",
        "## Groups",
        "",
        *group_table(groups),
        "",
        "## Cold start vs with feedback",
        "",
        *feedback_table(runs),
        "",
        "## Plots",
        "",
        *(f"![{name}]({os.path.basename(path)})" for name, path in sorted(plot_paths.items())),
        "",
    ]
    if notes:
        lines += ["## Missing data", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def _unique_names(runs: list[runs_lib.Run]) -> None:
    counts = collections.Counter(r.name for r in runs)
    for run in runs:
        if counts[run.name] > 1:
            run.name = os.path.normpath(run.workdir)


def _uneven_seeds(groups: dict[str, list[runs_lib.Run]]) -> list[str]:
    """Notes for groups whose seeds evaluated at different steps: their curves keep only
    the steps every seed has."""
    notes = []
    for group, runs in sorted(groups.items()):
        steps = {r.name: set(r.steps(runs_lib.VAL_SUCCESS)) for r in runs}
        steps = {name: s for name, s in steps.items() if s}
        if len(steps) > 1 and len({frozenset(s) for s in steps.values()}) > 1:
            shared = set.intersection(*steps.values())
            last = max(shared) if shared else None
            notes.append(
                f"group {group}: seeds were evaluated at different steps "
                f"({', '.join(f'{n} to step {max(s)}' for n, s in sorted(steps.items()))}); "
                f"its curve keeps the {len(shared)} steps all share (last: {last})"
            )
    return notes


def compare(workdirs: list[str], out_dir: str) -> Comparison:
    """Reads the runs, writes the plots and summary.md into `out_dir`.

    Raises RunError (a ValueError) for no workdirs or one that does not exist; anything
    missing inside a run becomes a note (printed and listed in summary.md).
    """
    if not workdirs:
        raise runs_lib.RunError("no run workdirs given; pass one or more WORKDIRs")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise runs_lib.RunError(f"--out={out_dir} is a file; give a directory for the plots")
    runs = [runs_lib.load_run(w) for w in workdirs]
    _unique_names(runs)
    notes = [note for run in runs for note in run.notes]
    groups = runs_lib.groups_of(runs)
    notes += _uneven_seeds(groups) + runs_lib.shared_seeds(groups)
    os.makedirs(out_dir, exist_ok=True)
    drawers = {
        "learning_curves": lambda p: plots.learning_curves(groups, p),
        "success_by_rollout_position": lambda p: plots.success_by_rollout_position(groups, p),
        "success_per_level": lambda p: plots.success_per_level(groups, p),
        "failure_modes": lambda p: plots.failure_modes(failure_shares(runs), p),
    }
    missing = {
        "learning_curves": "no run has val/success in metrics.jsonl",
        "success_by_rollout_position": "no run has success_at_rollout/k metrics",
        "success_per_level": "no run has val/success_level_L metrics",
        "failure_modes": "no run has an eval*.json with failure_types (write one with "
        "`python -m launch.evaluate --policy=checkpoint:WORKDIR --out=WORKDIR/eval_val.json`)",
    }
    written = {}
    for name, draw in drawers.items():
        path = draw(os.path.join(out_dir, f"{name}.png"))
        if path is None:
            notes.append(f"{name}.png not drawn: {missing[name]}")
        else:
            written[name] = path
    summary_path = os.path.join(out_dir, SUMMARY_FILE)
    with open(summary_path, "w", encoding="utf-8") as f:
        f.write(summary_markdown(runs, groups, written, notes))
    return Comparison(runs, written, summary_path, notes)
