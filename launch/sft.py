r"""The warm start alone: `python -m launch.sft --config=configs/sft.py --workdir=DIR`.

Supervised fine-tuning on the heuristic agent's demonstrations; the result goes
to DIR/warm_start (a Hugging Face folder), which `launch.train` on the same
workdir reuses.
"""

from absl import app, flags
from ml_collections import config_flags

from ctu import train

config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run lives.", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.run_sft(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
