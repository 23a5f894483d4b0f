"""launch.compare on hand-written runs: sample efficiency, seed bands and the summary
table against hand-computed numbers; missing data gives notes, not crashes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctu.analysis import compare, plots
from ctu.analysis import runs as runs_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    root,
    name,
    *,
    feedback=True,
    seed=0,
    group_size=4,
    val=None,
    train=None,
    config=True,
    optimizer=None,
):
    """A workdir as ctu.train writes it. `val`: step -> val/success; `train`: step -> dict
    of training metrics. Each step's training row and its val row are separate lines
    (as train.py writes them), with a timing row after, so merging by step is exercised."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    if config:
        payload = {
            "seed": seed,
            "algorithm": {"loss": "dapo", "feedback_guidance": {"enable": feedback}},
            "rollout": {"group_size": group_size, "tasks_per_step": 2},
            "optimizer": optimizer or {"learning_rate": 3e-5},
            "total_steps": 4,
        }
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(payload, f)
    if val is None and train is None:
        return workdir
    rows = []
    for step in sorted(set(val or {}) | set(train or {})):
        if step in (train or {}):
            rows.append({"step": step, **train[step]})
        if step in (val or {}):
            levels = {f"val/success_level_{lvl}": val[step] / lvl for lvl in (1, 2)}
            score = {"val/score": 0.1 + 0.8 * val[step]}  # partial credit, above success
            rows.append({"step": step, "val/success": val[step], **score, **levels})
        rows.append({"step": step, "timing_s/checkpoint": 1.0})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return workdir


def _train(step_times, *, generated=None, rows=None, positions=(0.2, 0.5)):
    out = {}
    for i, seconds in enumerate(step_times):
        row = {"timing_s/step": seconds, "success/first_try": 0.25, "success/with_feedback": 0.5}
        row.update({f"success_at_rollout/{k + 1}": p for k, p in enumerate(positions)})
        if generated is not None:
            row["dynamic_sampling/generated"] = generated[i]
        if rows is not None:
            row["batch/rows"] = rows[i]
        out[i + 1] = row
    return out


@pytest.fixture
def three_runs(tmp_path):
    # A: dynamic sampling, 3, 2, 4, 2 groups of 4 -> cumulative samples 12, 20, 36, 44.
    a = write_run(
        tmp_path,
        "fd_s0",
        seed=0,
        val={0: 0.5, 2: 0.72, 4: 0.95},
        train=_train([10, 20, 30, 40], generated=[3, 2, 4, 2]),
    )
    # B: no dynamic sampling, 8 rows per step -> cumulative samples 8, 16, 24, 32.
    b = write_run(
        tmp_path,
        "fd_s1",
        seed=1,
        val={0: 0.4, 2: 0.7, 4: 0.8},
        train=_train([5, 5, 5, 5], rows=[8, 8, 8, 8], positions=(0.4, 0.7)),
    )
    c = write_run(
        tmp_path,
        "base_s0",
        feedback=False,
        val={0: 0.3, 2: 0.5, 4: 0.6},
        train=_train([2, 2, 2, 2], rows=[8, 8, 8, 8]),
    )
    return [a, b, c]


def table_rows(markdown: str, section: str) -> dict[str, dict[str, str]]:
    """The markdown table under `## section`, as first column -> header -> cell."""
    lines = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_rows_of_a_step_are_merged_and_samples_counted_as_documented(three_runs):
    a = runs_lib.load_run(three_runs[0])
    assert a.rows[2]["val/success"] == 0.72 and a.rows[2]["timing_s/step"] == 20
    assert a.rows[2]["timing_s/checkpoint"] == 1.0
    assert a.cumulative_cost() == {0: (0, 0), 1: (12, 3), 2: (20, 5), 3: (36, 9), 4: (44, 11)}
    assert runs_lib.to_reach(a, 0.7) == (20, 5, 2)
    assert runs_lib.to_reach(a, 0.9) == (44, 11, 4)
    b = runs_lib.load_run(three_runs[1])
    assert runs_lib.to_reach(b, 0.7) == (16, 4, 2)  # exactly 0.7 counts as reached
    assert runs_lib.to_reach(b, 0.9) is None
    assert runs_lib.improvement(a) == pytest.approx(0.45)


def test_group_curve_is_mean_and_std_over_seeds(three_runs):
    runs = [runs_lib.load_run(w) for w in three_runs]
    groups = runs_lib.groups_of(runs)
    assert sorted(groups) == ["DAPO", "DAPO + feedback"]
    curve = runs_lib.group_curve(groups["DAPO + feedback"], "val/success")
    np.testing.assert_array_equal(curve.steps, [0, 2, 4])
    np.testing.assert_allclose(curve.mean, [0.45, 0.71, 0.875])
    np.testing.assert_allclose(curve.std, [0.05, 0.01, 0.075])
    np.testing.assert_allclose(curve.samples, [0, 18, 38])  # (20 + 16) / 2, (44 + 32) / 2
    assert curve.seeds == 2


def test_compare_writes_pngs_and_a_table_of_hand_computed_values(three_runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare.compare(three_runs, str(out))
    assert sorted(result.plots) == [
        "learning_curves",
        "success_by_rollout_position",
        "success_per_level",
    ]
    for path in result.plots.values():
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    # No eval JSONs: the failure-mode plot is skipped with a note that says how to get one.
    assert any("failure_modes.png not drawn" in n and "launch.evaluate" in n for n in result.notes)
    summary = (out / "summary.md").read_text()
    runs = table_rows(summary, "Runs")
    assert runs["fd_s0"]["samples to 70%"] == "20" and runs["fd_s0"]["tasks to 70%"] == "5"
    assert runs["fd_s0"]["samples to 90%"] == "44" and runs["fd_s0"]["tasks to 90%"] == "11"
    assert runs["fd_s1"]["samples to 70%"] == "16" and runs["fd_s1"]["tasks to 70%"] == "4"
    assert runs["fd_s1"]["samples to 90%"] == "not reached"
    assert runs["base_s0"]["samples to 70%"] == "not reached"
    assert runs["fd_s0"]["final val success"] == "95.0%"
    assert runs["fd_s0"]["base-policy improvement"] == "+45.0 pts"
    assert runs["base_s0"]["base-policy improvement"] == "+30.0 pts"
    assert runs["fd_s0"]["final val score"] == "0.860"
    assert runs["fd_s0"]["score improvement"] == "+0.360"
    assert runs["fd_s0"]["mean step time (s)"] == "25.00"
    assert runs["fd_s0"]["group"] == "DAPO + feedback" and runs["base_s0"]["group"] == "DAPO"
    groups = table_rows(summary, "Groups")
    feedback = groups["DAPO + feedback"]
    assert feedback["seeds"] == "2"
    assert feedback["samples to 70%"] == "18 ± 2" and feedback["tasks to 70%"] == "4.5 ± 0.5"
    assert feedback["samples to 90%"] == "not reached (1/2 seeds)"
    assert feedback["final val success"] == "87.5% ± 7.5%"
    assert feedback["base-policy improvement"] == "+42.5 pts ± 2.5 pts"
    assert feedback["final val score"] == "0.800 ± 0.060"  # 0.86 and 0.74
    assert feedback["score improvement"] == "+0.340 ± 0.020"  # 0.36 and 0.32
    assert feedback["mean step time (s)"] == "15.00 ± 10.00"
    training = table_rows(summary, "Cold start vs with feedback")
    assert training["fd_s0"]["train first-try success"] == "25.0%"
    assert training["fd_s0"]["train with-feedback success"] == "50.0%"
    assert training["fd_s0"]["with-feedback success"] == "n/a"


def test_failure_modes_come_from_eval_jsons(three_runs, tmp_path):
    with open(os.path.join(three_runs[0], "eval_val.json"), "w") as f:
        json.dump(
            {
                "mode": "feedback",
                "success_rate": 0.5,
                "mean_score": 0.625,
                "failure_types": {"success": 2, "missing_auth": 1, "wrong_department": 1},
                "with_feedback": {"success_rate": 0.75, "mean_score": 0.8},
            },
            f,
        )
    shares = compare.failure_shares([runs_lib.load_run(w) for w in three_runs])
    assert shares == {
        "fd_s0: eval_val.json": {"success": 0.5, "missing_auth": 0.25, "wrong_department": 0.25}
    }
    result = compare.compare(three_runs, str(tmp_path / "cmp"))
    assert "failure_modes" in result.plots
    training = table_rows(open(result.summary_path).read(), "Cold start vs with feedback")
    assert training["fd_s0"]["cold-start success"] == "50.0%"
    assert training["fd_s0"]["with-feedback success"] == "75.0%"
    assert training["fd_s0"]["cold-start score"] == "0.625"
    assert training["fd_s0"]["with-feedback score"] == "0.800"
    assert training["fd_s1"]["cold-start score"] == "n/a"  # no evaluation JSON


def test_runs_that_train_differently_are_not_seeds_of_one_group(tmp_path):
    """Only the seed and how long, where and how often a run went may differ within a
    group; a learning rate names its own group, and shared seeds are noted."""
    val = {0: 0.2, 4: 0.3}
    a = write_run(tmp_path, "lr_a", seed=0, val=val)
    b = write_run(tmp_path, "lr_b", seed=1, val=val, optimizer={"learning_rate": 1e-4})
    c = write_run(tmp_path, "lr_c", seed=1, val=val, optimizer={"learning_rate": 1e-4})
    base = write_run(tmp_path, "base", feedback=False, val=val)
    with open(os.path.join(c, "config.json")) as f:
        config = json.load(f)
    config["total_steps"] = 8  # a longer run is still a seed of the same group
    with open(os.path.join(c, "config.json"), "w") as f:
        json.dump(config, f)
    runs = [runs_lib.load_run(w) for w in (a, b, c, base)]
    groups = runs_lib.groups_of(runs)
    assert {g: [r.name for r in rs] for g, rs in groups.items()} == {
        "DAPO + feedback (optimizer.learning_rate=3e-05)": ["lr_a"],
        "DAPO + feedback (optimizer.learning_rate=0.0001)": ["lr_b", "lr_c"],
        "DAPO": ["base"],
    }
    assert runs_lib.shared_seeds(groups) == [
        "group DAPO + feedback (optimizer.learning_rate=0.0001): runs lr_b, lr_c share "
        "seed 1; its spread is not a spread over seeds"
    ]


def test_training_failure_modes_include_the_successes(three_runs):
    """A step's failure/<type> metrics are shares of all its rollouts, the successes
    (success/rate) the rest: the training bar is their mean over steps."""
    path = os.path.join(three_runs[2], "metrics.jsonl")
    rows = [
        {"step": 1, "success/rate": 0.25, "failure/missing_auth": 0.75},
        {"step": 2, "success/rate": 0.5, "failure/missing_auth": 0.25, "failure/wrong_order": 0.25},
    ]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    shares = compare.failure_shares([runs_lib.load_run(three_runs[2])])
    assert shares["base_s0: training"] == pytest.approx(
        {"success": 0.375, "missing_auth": 0.5, "wrong_order": 0.125}
    )
    # A run older than the failure metrics has success rates alone: no training bar,
    # rather than one that reads 100% success.
    with open(os.path.join(three_runs[0], "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "success/rate": 0.3}) + "\n")
    shares = compare.failure_shares([runs_lib.load_run(three_runs[0])])
    assert "fd_s0: training" not in shares
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "success/rate": 1.0}) + "\n")  # all succeeded
    shares = compare.failure_shares([runs_lib.load_run(three_runs[2])])
    assert shares["base_s0: training"]["success"] == pytest.approx((0.75 + 1.0) / 3)


def test_missing_data_gives_notes_and_the_plots_that_can_be_made(tmp_path):
    only_config = write_run(tmp_path, "only_config")
    no_val = write_run(tmp_path, "no_val", train=_train([1, 1]))  # no val, no sample counts
    no_config = write_run(tmp_path, "no_config", val={0: 0.1, 1: 0.2}, config=False)
    result = compare.compare([only_config, no_val, no_config], str(tmp_path / "cmp"))
    notes = "\n".join(result.notes)
    assert "only_config: no metrics.jsonl" in notes
    assert "no_val: no val/success" in notes
    assert "no_val: a training step lacks dynamic_sampling/generated and batch/rows" in notes
    assert "no_config: no config.json" in notes
    # no_config still has a curve (by step; its samples are unknown).
    assert "learning_curves" in result.plots and "success_by_rollout_position" in result.plots
    runs = table_rows(open(result.summary_path).read(), "Runs")
    assert runs["no_config"]["samples to 70%"] == "n/a"
    assert runs["no_config"]["final val success"] == "20.0%"
    assert runs["only_config"]["final val success"] == "n/a"
    assert "## Missing data" in open(result.summary_path).read()


def test_torn_lines_and_bad_eval_json_are_skipped_with_a_note(three_runs):
    with open(os.path.join(three_runs[0], "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "val/succ')  # a run still writing
    with open(os.path.join(three_runs[0], "eval_val.json"), "w") as f:
        f.write("{")
    run = runs_lib.load_run(three_runs[0])
    assert max(run.rows) == 4 and run.evals == {}
    assert any("metrics.jsonl line" in n for n in run.notes)
    assert any("eval_val.json is not valid JSON" in n for n in run.notes)
    # Valid JSON of the wrong shape, and a broken config.json: notes, not tracebacks.
    with open(os.path.join(three_runs[0], "eval_val.json"), "w") as f:
        f.write("[1, 2]")
    with open(os.path.join(three_runs[0], "config.json"), "w") as f:
        f.write('{"seed": ')
    run = runs_lib.load_run(three_runs[0])
    assert run.evals == {} and run.group == "unknown"
    assert any("eval_val.json is not a JSON object" in n for n in run.notes)
    assert any("config.json is not valid JSON" in n for n in run.notes)


def test_nothing_to_draw_skips_every_plot(tmp_path):
    result = compare.compare([write_run(tmp_path, "empty")], str(tmp_path / "cmp"))
    assert result.plots == {}
    assert os.path.exists(result.summary_path)
    assert plots.learning_curves({}, str(tmp_path / "x.png")) is None


def test_cli_errors_and_writes(three_runs, tmp_path):
    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "launch.compare", *args],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )

    missing = cli(three_runs[0], str(tmp_path / "nope"), f"--out={tmp_path / 'a'}")
    assert missing.returncode != 0 and f"no run directory at {tmp_path / 'nope'}" in missing.stderr
    none = cli(f"--out={tmp_path / 'b'}")
    assert none.returncode != 0 and "no run workdirs" in none.stderr
    (tmp_path / "file").write_text("")
    into_file = cli(three_runs[0], f"--out={tmp_path / 'file'}")
    assert into_file.returncode != 0 and "is a file; give a directory" in into_file.stderr
    ok = cli(*three_runs, f"--out={tmp_path / 'c'}")
    assert ok.returncode == 0, ok.stderr
    assert "note: failure_modes.png not drawn" in ok.stdout
    assert (tmp_path / "c" / "learning_curves.png").exists()
