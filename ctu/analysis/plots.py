"""PNG plots comparing runs (matplotlib, Agg backend: no display needed).

Each function draws one figure from `ctu.analysis.runs` data, writes it to `path` and
returns the path, or returns None (drawing nothing) when no run has the data it needs.
Groups of runs (same algorithm, different seeds) are drawn as their mean over seeds with
a ±1 standard deviation band (or error bar).
"""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ctu.analysis import runs as runs_lib  # noqa: E402

LEVEL_KEY = re.compile(r"^val/success_level_(\d+)$")
POSITION_KEY = re.compile(r"^success_at_rollout/(\d+)$")
DPI = 120


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # a legend outside the axes included
    plt.close(fig)
    return path


def _seeds_label(group: str, count: int) -> str:
    return f"{group} ({count} seed{'s' if count != 1 else ''})"


def _band(ax, x, curve, scale: float, color: str, label: str) -> None:
    ax.plot(x, scale * curve.mean, marker="o", color=color, label=label)
    low, high = scale * (curve.mean - curve.std), scale * (curve.mean + curve.std)
    ax.fill_between(x, low, high, color=color, alpha=0.2)


def learning_curves(groups: dict[str, list[runs_lib.Run]], path: str) -> str | None:
    """val/success against rollouts generated and against training step, and the mean
    validation score (partial credit, which moves before success does) against
    rollouts generated."""
    curves = {g: runs_lib.group_curve(rs, runs_lib.VAL_SUCCESS) for g, rs in groups.items()}
    curves = {g: c for g, c in curves.items() if c is not None}
    if not curves:
        return None
    scores = {g: runs_lib.group_curve(rs, runs_lib.VAL_SCORE) for g, rs in groups.items()}
    any_samples = any(c.samples is not None for c in scores.values() if c is not None)
    fig, (by_samples, by_step, score) = plt.subplots(1, 3, figsize=(18, 4.5))
    for index, (group, curve) in enumerate(sorted(curves.items())):
        color, label = f"C{index}", _seeds_label(group, curve.seeds)
        if curve.samples is not None:
            _band(by_samples, curve.samples, curve, 100, color, label)
        _band(by_step, curve.steps, curve, 100, color, label)
        score_curve = scores.get(group)
        if score_curve is not None:
            if any_samples:  # one unit on the axis: groups without counts are left out
                if score_curve.samples is not None:
                    _band(score, score_curve.samples, score_curve, 1, color, label)
            else:
                _band(score, score_curve.steps, score_curve, 1, color, label)
    for threshold in runs_lib.THRESHOLDS:
        for ax in (by_samples, by_step):
            ax.axhline(100 * threshold, color="grey", linestyle=":", linewidth=1)
    by_samples.set_xlabel("rollouts generated (episodes)")
    by_step.set_xlabel("training step")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (by_samples, by_step):
        ax.set_ylabel("validation success (%)")
        ax.set_ylim(-2, 102)
    by_samples.set_title("Validation success vs samples (mean ± std over seeds)")
    by_step.set_title("Validation success vs step (step 0 = after warm start)")
    score.set_xlabel("rollouts generated (episodes)" if any_samples else "training step")
    score.set_ylabel("validation mean score (0-1)")
    score.set_ylim(-0.02, 1.02)
    score.set_title("Validation mean score (partial credit)")
    for ax, corner in (
        (by_samples, "lower right"),
        (by_step, "lower right"),
        (score, "upper left"),
    ):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=corner)
    if all(curve.samples is None for curve in curves.values()):
        by_samples.text(
            0.5, 0.5, "rollout counts unknown", ha="center", transform=by_samples.transAxes
        )
    return _save(fig, path)


def _indexed_keys(runs: list[runs_lib.Run], pattern: re.Pattern) -> list[tuple[int, str]]:
    found = {(int(m.group(1)), key) for r in runs for key in r.keys() if (m := pattern.match(key))}
    return sorted(found)


def _grouped_bars(ax, groups, keys, value_of, ylabel: str) -> bool:
    """Bars per key (x) and group (colour), mean ± std over the group's seeds."""
    drawn = False
    width = 0.8 / max(len(groups), 1)
    for index, (group, runs) in enumerate(sorted(groups.items())):
        means, stds, xs, count = [], [], [], 0
        for x, key in enumerate(keys):
            stat = runs_lib.group_scalar([value_of(r, key) for r in runs])
            if stat is None:
                continue
            means.append(100 * stat[0])
            stds.append(100 * stat[1])
            xs.append(x + (index - (len(groups) - 1) / 2) * width)
            count = max(count, stat[2])
        if xs:
            label = _seeds_label(group, count)
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=f"C{index}", label=label)
            drawn = True
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    if drawn:
        ax.legend()
    return drawn


def success_by_rollout_position(groups: dict[str, list[runs_lib.Run]], path: str) -> str | None:
    """Training success of rollout k = 1..n of a group (rollouts k >= start_rollout read
    the critiques of earlier failures when feedback guidance is on), averaged over steps."""
    all_runs = [r for rs in groups.values() for r in rs]
    keys = _indexed_keys(all_runs, POSITION_KEY)
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = _grouped_bars(
        ax,
        groups,
        [key for _, key in keys],
        lambda run, key: runs_lib.mean_of(run, key),
        "training success (%), mean over steps",
    )
    ax.set_xticks(range(len(keys)), [str(k) for k, _ in keys])
    ax.set_xlabel("rollout position in its group (1 = first try)")
    ax.set_title("Success by rollout position (mean ± std over seeds)")
    return _save(fig, path) if drawn else plt.close(fig)


def success_per_level(groups: dict[str, list[runs_lib.Run]], path: str) -> str | None:
    """Validation success per task level: after the warm start (step 0, hatched) and at the
    last evaluation (solid)."""
    all_runs = [r for rs in groups.values() for r in rs]
    keys = _indexed_keys(all_runs, LEVEL_KEY)
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    drawn = _grouped_bars(
        ax,
        groups,
        [key for _, key in keys],
        runs_lib.final_value,
        "validation success (%)",
    )
    # Step 0 (after warm start) as hollow markers over the bars.
    width = 0.8 / max(len(groups), 1)
    for index, (_, runs) in enumerate(sorted(groups.items())):
        for x, (_, key) in enumerate(keys):
            stat = runs_lib.group_scalar([r.rows.get(0, {}).get(key) for r in runs])
            if stat is not None:
                ax.plot(
                    x + (index - (len(groups) - 1) / 2) * width,
                    100 * stat[0],
                    marker="_",
                    markersize=14,
                    color="black",
                )
    ax.plot([], [], marker="_", linestyle="none", color="black", label="step 0 (after warm start)")
    if drawn:
        ax.legend()
    ax.set_xticks(range(len(keys)), [f"level {k}" for k, _ in keys])
    ax.set_title("Validation success per level at the last evaluation (mean ± std over seeds)")
    return _save(fig, path) if drawn else plt.close(fig)


def failure_modes(shares: dict[str, dict[str, float]], path: str) -> str | None:
    """Stacked horizontal bars: per source (a run's evaluation), the share of episodes
    ending in each failure type (success included)."""
    shares = {label: s for label, s in shares.items() if s}
    if not shares:
        return None
    types = sorted({t for s in shares.values() for t in s}, key=lambda t: (t != "success", t))
    labels = sorted(shares)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(labels)))
    left = np.zeros(len(labels))
    cmap = plt.get_cmap("tab20")
    for index, failure in enumerate(types):
        values = np.array([100 * shares[label].get(failure, 0.0) for label in labels])
        ax.barh(labels, values, left=left, color=cmap(index % 20), label=failure)
        left += values
    ax.set_xlabel("share of episodes (%)")
    ax.set_xlim(0, 100)
    ax.set_title("Failure modes (outcome of each episode)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(fig, path)
