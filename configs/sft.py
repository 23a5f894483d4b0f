r"""The warm start alone: supervised fine-tuning on heuristic demonstrations.

  python -m launch.sft --config=configs/sft.py --workdir=runs/sft

Uses the model, data and warm_start sections of configs/feedback_dapo.py, so a
later `launch.train` on the same workdir reuses the result. Variants and
overrides as there.
"""

from configs import feedback_dapo


def get_config(arg=None):
    return feedback_dapo.get_config(arg)
