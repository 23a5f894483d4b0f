r"""Evaluate a policy on a split of a world: a scripted agent, a run's checkpoint, an HF model.

    python -m launch.evaluate --policy=heuristic --split=val --data=data/world \
        --trials=4 --mode=feedback --out=/tmp/eval_heuristic_val.json
    python -m launch.evaluate --policy=checkpoint:runs/feedback_dapo@20 --split=val \
        --trials=4 --mode=feedback --num_tasks=20 --out=runs/feedback_dapo/eval_val.json
    python -m launch.evaluate --policy=hf:runs/feedback_dapo/warm_start --out=/tmp/ws.json

--policy: oracle | heuristic | random | checkpoint:WORKDIR[@STEP] (the latest checkpoint
without @STEP) | hf:PATH (a Hugging Face folder with its tokenizer). Models decode
greedily, or sample with --temperature > 0 (and --top_p, --top_k, as training's rollouts
do). --data defaults to the run's world for a workdir, else data/world.

On CPU a model decodes on one XLA device per core, its rows split between them, as
training's sampler does (an XLA_FLAGS device count you set yourself is kept).

In --mode=feedback a model policy's critiques can be rewritten by an LLM behind an
OpenAI-compatible endpoint (--llm_base_url, --llm_model, --llm_api_key_env), as
training's `use_llm_enhancement` does; replies are cached in feedback_cache/ beside --out.

Writes the metrics JSON atomically to --out (keys: ctu/analysis/model_eval.py) and
prints a short table.
"""

import sys

from absl import app, flags

from ctu.analysis import model_eval
from ctu.backend import add_cpu_xla_flags, cpu_cores
from ctu.feedback_guidance import FeedbackGuidanceConfig
from ctu.world import evaluation

_POLICY = flags.DEFINE_string(
    "policy", None, "Policy: " + " | ".join(model_eval.policy_names()), required=True
)
_SPLIT = flags.DEFINE_enum("split", "val", list(evaluation.SPLIT_NAMES), "Task split.")
_DATA = flags.DEFINE_string(
    "data", None, "World directory (default: the run's for a workdir, else data/world)."
)
_TRIALS = flags.DEFINE_integer(
    "trials", 1, "Trials per task (for pass^k).", lower_bound=1, upper_bound=evaluation.MAX_TRIALS
)
_NUM_TASKS = flags.DEFINE_integer(
    "num_tasks", None, "Evaluate only the split's first N tasks.", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the environment and the policy.")
_MODE = flags.DEFINE_enum(
    "mode", "cold", evaluation.MODES, "cold: no feedback; feedback: retry failures with critique."
)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Model policies: 0 decodes greedily; > 0 samples.", lower_bound=0.0
)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Model policies, when sampling: nucleus mass.")
_TOP_K = flags.DEFINE_integer(
    "top_k",
    0,
    "Model policies, when sampling: keep the k likeliest tokens (0: all).",
    lower_bound=0,
)
_OUT = flags.DEFINE_string("out", None, "Where to write the metrics JSON.", required=True)
_LLM_BASE_URL = flags.DEFINE_string(
    "llm_base_url", None, "--mode=feedback: rewrite critiques with this endpoint's LLM (.../v1)."
)
_LLM_MODEL = flags.DEFINE_string("llm_model", None, "The model --llm_base_url serves.")
_LLM_KEY_ENV = flags.DEFINE_string(
    "llm_api_key_env", "", "Environment variable holding --llm_base_url's API key ('' none)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    add_cpu_xla_flags(devices=cpu_cores())  # before JAX opens its CPU backend
    try:
        evaluation.check_output_path(_OUT.value)  # before the evaluation, not after it
        critic = None
        if (_LLM_BASE_URL.value is None) != (_LLM_MODEL.value is None):
            raise ValueError("--llm_base_url and --llm_model go together: give both or neither")
        if _LLM_BASE_URL.value is not None:
            critic = FeedbackGuidanceConfig(
                use_llm_enhancement=True,
                llm_base_url=_LLM_BASE_URL.value or "",
                llm_model=_LLM_MODEL.value or "",
                llm_api_key_env=_LLM_KEY_ENV.value,
            )
        model_eval.evaluate_and_write(
            _POLICY.value,
            _SPLIT.value,
            _DATA.value,
            _OUT.value,
            trials=_TRIALS.value,
            seed=_SEED.value,
            mode=_MODE.value,
            num_tasks=_NUM_TASKS.value,
            temperature=_TEMPERATURE.value,
            top_p=_TOP_P.value,
            top_k=_TOP_K.value,
            critic=critic,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
