r"""DAPO without feedback guidance: identical to feedback_dapo with feedback off.

  python -m launch.train --config=configs/baseline_dapo.py --workdir=runs/baseline_dapo

Variants and overrides as in configs/feedback_dapo.py.
"""

from configs import feedback_dapo


def get_config(arg=None):
    config = feedback_dapo.get_config(arg)
    config.algorithm.feedback_guidance.enable = False
    return config
