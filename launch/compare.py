r"""Compare training runs: learning curves, success by rollout position and per level,
failure modes (PNG) and a markdown summary with sample efficiency.

    python -m launch.compare runs/feedback_dapo_s0 runs/feedback_dapo_s1 \
        runs/baseline_dapo_s0 runs/baseline_dapo_s1 --out=runs/compare

Runs are grouped by algorithm (config.json) and every other setting that changes what
is trained (ctu.analysis.runs.groups_of), with seeds as mean ± std; evaluation JSONs
are read from WORKDIR/eval*.json (`launch.evaluate --out=WORKDIR/eval_val.json`).
What is drawn and counted: ctu/analysis/compare.py.
"""

import sys

from absl import app, flags

from ctu.analysis import compare

_OUT = flags.DEFINE_string("out", None, "Directory for the PNGs and summary.md.", required=True)


def main(argv):
    try:
        result = compare.compare(argv[1:], _OUT.value)
    except ValueError as error:
        sys.exit(f"error: {error}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(result.plots)} plots and {result.summary_path}")


if __name__ == "__main__":
    app.run(main)
