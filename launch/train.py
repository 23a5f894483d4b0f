r"""Trains a policy: `python -m launch.train --config=configs/feedback_dapo.py --workdir=DIR`.

Runs the warm start when the config asks for it (reused from the workdir), then
RL. Rerunning the same command on the same workdir resumes.
"""

from absl import app, flags
from ml_collections import config_flags

from ctu import train

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run lives.", required=True)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir under a config that differs from its config.json in keys that "
    "change what is trained (by default an error that lists them).",
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.train_and_evaluate(
        flags.FLAGS.config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
    )


if __name__ == "__main__":
    app.run(main)
