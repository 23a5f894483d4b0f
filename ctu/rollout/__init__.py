"""Rollouts: engines (JAX, vLLM), the multi-turn runner, feedback-guided groups, evaluation.

    engine = JaxEngine(model, SamplingConfig(max_new_tokens=96, stop_token_ids=(eot,)))
    result = run_groups(engine, task_ids, world=world, tokenizer=tokenizer, rng=key,
                        settings=GroupSettings(num_rollouts=8, wave_size=2),
                        feedback=FeedbackGuidanceConfig(...), runner=RunnerSettings(...))
    result.groups[g][k]            # RolloutRecord of task g, rollout k + 1
    engine.update_weights(model)   # after each RL step; no recompiles

- engine.py: `RolloutEngine` / `EngineSession` protocols, `JaxEngine`.
- vllm_engine.py: `VllmEngine` (GPU; vLLM imported lazily).
- runner.py: `run_episodes(engine, specs, ...)`: every episode of a batch in one session.
- records.py: `EpisodeSpec`, `RunnerSettings`, `RolloutRecord`, `RunStats`.
- groups.py: `run_groups`: n rollouts per task, feedback-guided, in waves.
- evaluate.py: `evaluate_model`: cold or one failure then a retry with its critique.
"""

from ctu.rollout.engine import EngineSession, JaxEngine, RolloutEngine
from ctu.rollout.evaluate import evaluate_model, run_model_episodes
from ctu.rollout.groups import (
    GroupSettings,
    GroupsResult,
    WaveStats,
    choose_feedback_groups,
    plan_waves,
    run_groups,
)
from ctu.rollout.records import (
    TOKEN_LIMIT,
    EpisodeSpec,
    RolloutRecord,
    RunnerSettings,
    RunStats,
)
from ctu.rollout.runner import MALFORMED_ACTION, run_episodes
from ctu.rollout.vllm_engine import VllmEngine

__all__ = [
    "MALFORMED_ACTION",
    "TOKEN_LIMIT",
    "EngineSession",
    "EpisodeSpec",
    "GroupSettings",
    "GroupsResult",
    "JaxEngine",
    "RolloutEngine",
    "RolloutRecord",
    "RunStats",
    "RunnerSettings",
    "VllmEngine",
    "WaveStats",
    "choose_feedback_groups",
    "evaluate_model",
    "plan_waves",
    "run_episodes",
    "run_groups",
    "run_model_episodes",
]
