"""Rollouts: engines (JAX, vLLM), the multi-turn runner, feedback-guided groups, evaluation."""

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
