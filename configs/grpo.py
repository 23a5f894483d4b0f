r"""GRPO: per-sequence mean loss, symmetric clip, k3 KL to the frozen reference.

  python -m launch.train --config=configs/grpo.py --workdir=runs/grpo

No dynamic sampling, overlong shaping or feedback guidance (plain GRPO as in
DeepSeekMath). Variants and overrides as in configs/feedback_dapo.py.
"""

from configs import feedback_dapo


def get_config(arg=None):
    config = feedback_dapo.get_config(arg)
    config.algorithm.loss = "grpo"
    config.algorithm.eps_low = 0.2
    config.algorithm.eps_high = 0.2
    config.algorithm.kl_coef = 0.04
    config.algorithm.advantage = "grpo"
    config.algorithm.dynamic_sampling.enable = False
    config.algorithm.overlong.enable = False
    config.algorithm.feedback_guidance.enable = False
    return config
