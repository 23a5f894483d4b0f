r"""The gradient noise scale of a run's RL update at its warm start or a checkpoint.

    python -m launch.grad_noise --workdir=runs/feedback_dapo               # warm start
    python -m launch.grad_noise --workdir=runs/feedback_dapo --step=12 --groups=32
    python -m launch.grad_noise --workdir=runs/feedback_dapo --set=algorithm.credit=progress
    python -m launch.grad_noise --workdir=runs/feedback_dapo --by_turn

Samples train-task groups with the run's own settings (its config.json), computes each
group's DAPO gradient as the update does, and writes (atomically, to --out, default
WORKDIR/grad_noise_{warm_start|STEP}.json) the simple noise scale B_noise in groups
with a jackknife interval, the expected agreement of two updates of
rollout.tasks_per_step groups, and the cosines measured between disjoint ones
(ctu/analysis/grad_noise.py). --set changes a setting first, to see what it would do
to the noise before a run is spent on it (with the same --seed, a setting that does
not change sampling is measured on the same groups). --by_turn adds each kind of
turn's (search, form, call, message) share of the signal and of the noise. An analysis, not a benchmark: no timing.
"""

import json
import os
import sys

from absl import app, flags, logging

from ctu.analysis import grad_noise
from ctu.world.evaluation import check_output_path, write_json_atomic

_WORKDIR = flags.DEFINE_string("workdir", None, "A launch.train run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the warm start).")
_GROUPS = flags.DEFINE_integer("groups", 32, "Groups with reward signal to measure over.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled groups.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON.")
_BY_TURN = flags.DEFINE_bool(
    "by_turn", False, "Also split signal and noise over the kinds of turn (tool called)."
)
_SET = flags.DEFINE_multi_string(
    "set", [], "KEY=VALUE to change in the run's config first, e.g. algorithm.credit=progress."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _GROUPS.value < 3:
        raise app.UsageError(
            f"--groups={_GROUPS.value}: need at least 3 (the jackknife interval leaves one "
            "group out of at least two)"
        )
    name = "warm_start" if _STEP.value is None else str(_STEP.value)
    out = _OUT.value or os.path.join(_WORKDIR.value, f"grad_noise_{name}.json")
    try:
        check_output_path(out)
        result = grad_noise.measure(
            _WORKDIR.value,
            step=_STEP.value,
            num_groups=_GROUPS.value,
            seed=_SEED.value,
            overrides=_SET.value,
            by_turn=_BY_TURN.value,
            log=logging.info,
        )
    except (FileNotFoundError, RuntimeError, ValueError) as error:  # PolicySpecError too
        sys.exit(f"launch.grad_noise: {error}")
    write_json_atomic(out, result)
    summary = {k: v for k, v in result.items() if k != "disjoint_update_cosines"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
