r"""Evaluate a scripted policy on a split of a world.

    python -m launch.evaluate --policy=heuristic --split=val --data=data/world \
        --trials=4 --mode=feedback --out=/tmp/eval_heuristic_val.json

Writes the metrics JSON atomically to --out and prints a short table.
"""

import sys

from absl import app, flags

from ctu.world import evaluation

_POLICY = flags.DEFINE_enum(
    "policy", None, list(evaluation.POLICY_FACTORIES), "Policy to run.", required=True
)
_SPLIT = flags.DEFINE_enum("split", "val", list(evaluation.SPLIT_NAMES), "Task split.")
_DATA = flags.DEFINE_string("data", "data/world", "World directory (launch.make_data output).")
_TRIALS = flags.DEFINE_integer(
    "trials", 1, "Trials per task (for pass^k).", lower_bound=1, upper_bound=evaluation.MAX_TRIALS
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the environment and the policy.")
_MODE = flags.DEFINE_enum(
    "mode", "cold", evaluation.MODES, "cold: no feedback; feedback: retry failures with critique."
)
_OUT = flags.DEFINE_string("out", None, "Where to write the metrics JSON.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        evaluation.evaluate_and_write(
            _POLICY.value,
            _SPLIT.value,
            _DATA.value,
            _OUT.value,
            trials=_TRIALS.value,
            seed=_SEED.value,
            mode=_MODE.value,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
