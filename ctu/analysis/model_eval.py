"""`launch.evaluate` for every policy: scripted ones, a run's checkpoint, an HF folder.

    evaluate_and_write("checkpoint:runs/fd@20", "val", None, "/tmp/eval.json",
                       trials=4, mode="feedback", num_tasks=20)

Scripted policies (oracle, heuristic, random) go to `ctu.world.evaluation`. Model
policies (`ctu.analysis.policy_loading`) play their episodes with the rollout runner
(`ctu.rollout.evaluate.run_model_episodes`: the prompt, chat template, parser and limits
of training) under greedy decoding, or sampled (`temperature`, `top_p`, `top_k`: how a
policy's training rollouts fare), and are summarised by the same
`evaluation.summarize`, so every JSON has one layout:

- top level: the cold (first-try) outcome: `success_rate`, `mean_score`, `by_level`,
  `per_level_success`, `held_out_company`, `seen_company`, `pass_hat_k` (k = 1..trials),
  `failure_types` (counts per failure type), `ended_by`, `mean_actions`, `behaviour`
  (`info_gathering_completeness`, `call_order_correctness`, `tool_call_efficiency`,
  `over_collection_rate`, `malformed_call_rate`, `tool_calls_per_episode`);
- model policies add `parse_failure_rate` (per assistant turn), `truncated_rate`,
  `mean_turns`, `mean_sampled_tokens`, `policy_source` (what was loaded, decoding limits)
  and `examples` (decoded conversations);
- mode "feedback" adds `with_feedback`: each failure replaced by one retry that reads its
  critique (`success_rate`, `mean_score`, `by_level`, `retried`, `retry_success_rate`,
  `retry_failure_types`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax

from ctu.analysis import policy_loading
from ctu.feedback_guidance import FEEDBACK_CACHE_DIR, FeedbackGuidanceConfig
from ctu.rollout import evaluate as rollout_eval
from ctu.rollout.engine import JaxEngine
from ctu.rollout.records import RolloutRecord
from ctu.sampling.settings import SamplingConfig
from ctu.world import data, evaluation

DEFAULT_DATA_DIR = "data/world"
NUM_EXAMPLES = 4
# The user turn of a decoded prompt; what comes before it is the (long, fixed) system turn.
_USER_TURN = "<|im_start|>user"


def policy_names() -> list[str]:
    """What --policy accepts, for help texts and errors."""
    return [*evaluation.POLICY_FACTORIES, "checkpoint:WORKDIR[@STEP]", "hf:PATH"]


def _retry_trials(
    first: Sequence[RolloutRecord], retries: Sequence[RolloutRecord], num_tasks: int
) -> list[int]:
    """The trial of each retry: retries come trial by trial, one per failed first try."""
    failed = [i // num_tasks for i, r in enumerate(first) if not r.success]
    if len(failed) != len(retries):
        raise RuntimeError(f"{len(retries)} retries for {len(failed)} failed episodes")
    return failed


def conversation_text(record: RolloutRecord, tokenizer) -> str:
    """The user's request and the episode after it, decoded (the system turn left out)."""
    prompt = tokenizer.decode(record.tokens[: record.prompt_length].tolist())
    episode = tokenizer.decode(record.tokens[record.prompt_length :].tolist())
    return prompt[prompt.rfind(_USER_TURN) :] + episode


def examples(
    first: Sequence[RolloutRecord],
    retries: Sequence[RolloutRecord],
    tokenizer,
    num_tasks: int,
    limit: int = NUM_EXAMPLES,
) -> list[dict]:
    """A handful of decoded episodes: the first episode of each outcome (success or
    failure type), topped up with the next episodes in order, then (feedback mode) the
    first retry; deterministic for a run."""
    firsts, seen = [], set()
    for i, record in enumerate(first):
        if record.failure_type not in seen:
            seen.add(record.failure_type)
            firsts.append(i)
    firsts += [i for i in range(len(first)) if i not in firsts]
    firsts = firsts[: limit - 1 if retries else limit]
    chosen = [("first_try", i // num_tasks, first[i]) for i in sorted(firsts)]
    if retries:
        trials = _retry_trials(first, retries, num_tasks)
        chosen.append(("retry", trials[0], retries[0]))
    return [
        {
            "attempt": attempt,
            "task_id": record.task_id,
            "trial": trial,
            "score": record.reward,
            "failure_type": record.failure_type,
            "feedback": record.feedback,
            "feedback_block": record.feedback_block,
            "conversation": conversation_text(record, tokenizer),
        }
        for attempt, trial, record in chosen
    ]


def evaluate_loaded(
    policy: policy_loading.LoadedPolicy,
    world: data.World,
    split: str,
    *,
    trials: int = 1,
    seed: int = 0,
    mode: str = "cold",
    num_tasks: int | None = None,
    batch_size: int = evaluation.DEFAULT_BATCH_SIZE,
    feedback_enhancer=None,
) -> dict:
    """The metrics dict (module docstring) of a loaded model on a split; in feedback
    mode `feedback_enhancer` (`LLMFeedback`) rewrites the critiques retries read."""
    if mode not in evaluation.MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(evaluation.MODES)}")
    tasks = evaluation.first_tasks(evaluation.split_tasks(world, split), num_tasks)
    start = time.perf_counter()
    engine = JaxEngine(policy.model, policy.sampling, mesh=policy.mesh)
    played = rollout_eval.run_model_episodes(
        engine,
        world,
        tasks,
        tokenizer=policy.tokenizer,
        rng=jax.random.key(seed),
        mode=mode,
        trials=trials,
        seed=seed,
        batch_size=batch_size,
        runner=policy.runner,
        feedback_enhancer=feedback_enhancer,
    )
    records = played["records"]
    first = [rollout_eval.episode_result(r, world, i // len(tasks)) for i, r in enumerate(records)]
    metrics = evaluation.summarize(first, trials)
    metrics.update(rollout_eval.behaviour_metrics(records))
    metrics["per_level_success"] = {
        level: m["success_rate"] for level, m in metrics["by_level"].items()
    }
    retries = played.get("retries", [])
    if mode == "feedback":
        retry_trials = _retry_trials(records, retries, len(tasks))
        retried = [
            rollout_eval.episode_result(r, world, t)
            for r, t in zip(retries, retry_trials, strict=True)
        ]
        metrics["with_feedback"] = evaluation.summarize_retries(first, retried)
        metrics["with_feedback"]["parse_failure_rate"] = (
            rollout_eval.behaviour_metrics(retries)["parse_failure_rate"] if retries else None
        )
    metrics["examples"] = examples(records, retries, policy.tokenizer, len(tasks))
    metrics.update(
        split=evaluation.SPLIT_NAMES[split],
        mode=mode,
        seed=seed,
        policy_source=policy.describe(),
        wall_s=round(time.perf_counter() - start, 3),
    )
    return metrics


def _data_dir(data_dir: str | None, policy: policy_loading.LoadedPolicy | None) -> str:
    """--data, else the run's world (a checkpoint or a run's warm start), else data/world."""
    if data_dir:
        return data_dir
    if policy is not None and policy.run_config is not None:
        return policy.run_config.data.dir
    return DEFAULT_DATA_DIR


def _check_world_dir(data_dir: str) -> None:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"no world directory at {data_dir}; write one with "
            "`python -m launch.make_data --out=DIR` or pass --data=data/world"
        )


def evaluate_and_write(
    policy: str,
    split: str,
    data_dir: str | None,
    out_path: str,
    *,
    trials: int = 1,
    seed: int = 0,
    mode: str = "cold",
    num_tasks: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    critic: FeedbackGuidanceConfig | None = None,
) -> dict:
    """The `launch.evaluate` command: evaluate `policy`, write the JSON, print a table.

    `critic`: in feedback mode, a model policy's critiques are rewritten by its LLM
    endpoint (`use_llm_enhancement`), cached in `feedback_cache/` beside `out_path`.

    `data_dir` None: the run's world for a model policy from a workdir, else data/world.
    A model policy decodes greedily unless `temperature` > 0 (then `top_p`, `top_k`
    filter as in training; the draws follow `seed`).
    Raises FileNotFoundError / ValueError (PolicySpecError) with a message for a bad
    policy, workdir, step, directory, split, mode or sampling setting: checked before
    anything slow runs.
    """
    if split not in evaluation.SPLIT_NAMES:
        raise ValueError(
            f"unknown split {split!r}; choose one of {', '.join(evaluation.SPLIT_NAMES)}"
        )
    if mode not in evaluation.MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(evaluation.MODES)}")
    evaluation.first_tasks([], num_tasks)  # validates num_tasks
    if critic is not None and not (mode == "feedback" and policy_loading.is_model_policy(policy)):
        raise ValueError(
            "an LLM critic rewrites the critiques a model policy reads in --mode=feedback; "
            f"use both, or leave the --llm_* flags out (got --policy={policy} --mode={mode})"
        )
    decoding = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    if not policy_loading.is_model_policy(policy):
        if policy not in evaluation.POLICY_FACTORIES:
            raise ValueError(f"--policy={policy}: choose one of {', '.join(policy_names())}")
        if decoding != {"temperature": 0.0, "top_p": 1.0, "top_k": 0}:
            raise ValueError(
                f"--policy={policy} is scripted: --temperature, --top_p and --top_k apply "
                "to model policies (checkpoint:WORKDIR, hf:PATH) only; leave them out"
            )
        return evaluation.evaluate_and_write(
            policy,
            split,
            _data_dir(data_dir, None),
            out_path,
            trials=trials,
            seed=seed,
            mode=mode,
            num_tasks=num_tasks,
        )
    if temperature == 0.0 and (top_p, top_k) != (1.0, 0):
        raise ValueError("--top_p and --top_k need --temperature > 0 (0 decodes greedily)")
    SamplingConfig(**decoding)  # validates the values before anything is loaded
    spec = policy_loading.parse_policy(policy)
    if data_dir:
        _check_world_dir(data_dir)
    loaded = policy_loading.load_policy(spec)
    loaded = dataclasses.replace(loaded, sampling=dataclasses.replace(loaded.sampling, **decoding))
    data_dir = _data_dir(data_dir, loaded)
    _check_world_dir(data_dir)
    world = data.load_world(data_dir)
    metrics = {"policy": policy, "data": data_dir}
    if critic is not None:
        metrics["critic"] = critic.llm_model
    cache_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), FEEDBACK_CACHE_DIR)
    metrics.update(
        evaluate_loaded(
            loaded,
            world,
            split,
            trials=trials,
            seed=seed,
            mode=mode,
            num_tasks=num_tasks,
            feedback_enhancer=critic.make_enhancer(cache_dir) if critic else None,
        )
    )
    evaluation.write_json_atomic(out_path, metrics)
    print(format_table(metrics))
    return metrics


def format_table(metrics: dict) -> str:
    """The scripted policies' table plus the model's parse-failure and truncation rates."""
    table = evaluation.format_table(metrics)
    source = metrics["policy_source"]
    step = "" if source["step"] is None else f" step {source['step']}"
    return (
        f"{table}\nmodel: {source['kind']}{step}, parse failures "
        f"{100 * metrics['parse_failure_rate']:.1f}% of turns, truncated "
        f"{100 * metrics['truncated_rate']:.1f}% of episodes"
    )
