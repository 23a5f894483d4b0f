"""A run's config (ml_collections, configs/*.py) as typed, validated settings.

Every setting is read here, once, by name: a missing key is a config-file bug
and a bad value is a ValueError that names the key, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ctu.backend import BACKENDS
from ctu.feedback_guidance import FeedbackGuidanceConfig
from ctu.rl.checkpoint import CheckpointConfig
from ctu.rl.credit import CREDITS
from ctu.rl.optim import OptimConfig
from ctu.rl.train_step import TrainConfig
from ctu.rollout.groups import GroupSettings
from ctu.rollout.records import TURN_KINDS, RunnerSettings
from ctu.sampling.settings import SamplingConfig
from ctu.sft import WarmStartConfig
from ctu.world import data

ENGINES = ("jax", "vllm")
ADVANTAGES = ("grpo", "dr_grpo", "rloo")
# What the learner maximises: the reward function's partial-credit score, or task
# success alone (1 when the score is 1.0, else 0).
REWARDS = ("score", "success")
LEARNER_SUPPORTS = ("full", "sampled")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    engine: str
    tasks_per_step: int
    sampling: SamplingConfig
    runner: RunnerSettings
    groups: GroupSettings
    vllm_gpu_memory_utilization: float
    cpu_devices: int

    def __post_init__(self):
        if isinstance(self.cpu_devices, float) or self.cpu_devices < 0:
            raise ValueError(
                f"rollout.cpu_devices={self.cpu_devices!r}: CPU devices for the sampler, an "
                "int >= 1, or 0 for one per core."
            )
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine={self.engine!r}: choose one of {ENGINES}.")
        if not 0.0 < self.vllm_gpu_memory_utilization < 0.95:
            raise ValueError(
                f"rollout.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization}: "
                "vLLM's fraction of GPU memory, in (0, 0.95); JAX needs the rest."
            )
        if self.tasks_per_step < 1:
            raise ValueError(f"rollout.tasks_per_step={self.tasks_per_step}: must be >= 1.")


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings:
    advantage: str
    dynamic_sampling: bool
    max_rounds: int
    overlong: bool
    overlong_max_length: int
    overlong_cache_length: int
    mask_truncated: bool
    feedback: FeedbackGuidanceConfig
    reward: str = "score"
    credit: str = "episode"  # episode | progress (ctu.rl.credit)
    credit_lambda: float = 1.0  # progress credit: the weight of later turns' gains
    # Per kind of turn (RolloutRecord.turn_kinds), a factor on its tokens' advantages.
    turn_weights: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(TURN_KINDS, 1.0))

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"algorithm.reward={self.reward!r}: choose one of {REWARDS}.")
        if self.credit not in CREDITS:
            raise ValueError(f"algorithm.credit={self.credit!r}: choose one of {CREDITS}.")
        if not 0.0 <= self.credit_lambda <= 1.0:
            raise ValueError(
                f"algorithm.credit_lambda={self.credit_lambda}: a weight in [0, 1]; 1 credits "
                "a turn with everything the episode gains after it began."
            )
        unknown = sorted(set(self.turn_weights) - set(TURN_KINDS))
        if unknown:
            raise ValueError(
                f"algorithm.turn_weights has unknown kinds {unknown}; the kinds are {TURN_KINDS}."
            )
        negative = {k: w for k, w in self.turn_weights.items() if not w >= 0.0}
        if negative:
            raise ValueError(f"algorithm.turn_weights {negative}: weights must be >= 0.")
        if self.credit == "progress" and self.reward != "score":
            raise ValueError(
                "algorithm.credit=progress measures each turn against the partial-credit "
                f"score it started from; with algorithm.reward={self.reward!r} there is none. "
                "Use algorithm.reward=score or algorithm.credit=episode."
            )
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage={self.advantage!r}: choose one of {ADVANTAGES}.")
        if self.max_rounds < 1:
            raise ValueError(f"algorithm.dynamic_sampling.max_rounds={self.max_rounds}: >= 1.")
        if not 0 < self.overlong_cache_length <= self.overlong_max_length:
            raise ValueError(
                "algorithm.overlong: need 0 < cache_length <= max_length, got "
                f"cache_length={self.overlong_cache_length}, max_length={self.overlong_max_length}."
            )


@dataclasses.dataclass(frozen=True)
class RunSettings:
    seed: int
    backend: str
    distributed: bool
    data_dir: str
    model: dict[str, Any]
    mesh: dict[str, int]
    warm_start: WarmStartConfig
    rollout: RolloutSettings
    algorithm: AlgorithmSettings
    train: TrainConfig
    checkpoint: CheckpointConfig
    total_steps: int
    eval_every: int
    eval_split: str
    eval_num_tasks: int
    checkpoint_every: int
    log_examples_every: int
    debug_conversations: bool

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {BACKENDS}.")
        if self.eval_split not in data.SPLITS:
            raise ValueError(f"eval.split={self.eval_split!r}: choose one of {data.SPLITS}.")
        if self.eval_num_tasks < 1:
            raise ValueError(f"eval.num_tasks={self.eval_num_tasks}: must be >= 1.")
        for name in ("total_steps", "eval_every", "checkpoint_every", "log_examples_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1.")
        if self.backend == "cpu" and self.rollout.cpu_devices != 1:
            if self.distributed or any(size > 1 for size in self.mesh.values()):
                raise ValueError(
                    f"rollout.cpu_devices={self.rollout.cpu_devices} gives the sampler CPU "
                    "devices of its own and keeps the learner on one device of one process: "
                    f"it needs mesh sizes of 1 or -1 (got {self.mesh}) and distributed=False; "
                    "set --config.rollout.cpu_devices=1 to shard the learner instead."
                )
        group_size = self.rollout.groups.num_rollouts
        if group_size < 2:
            raise ValueError(
                f"rollout.group_size={group_size}: a rollout's advantage compares it with the "
                "other rollouts of its task, so a group of one has advantage 0 and teaches "
                "nothing; use 2 or more."
            )
        feedback = self.algorithm.feedback
        if feedback.enable and feedback.start_rollout > group_size:
            raise ValueError(
                f"algorithm.feedback_guidance.start_rollout={feedback.start_rollout} is past "
                f"rollout.group_size={group_size}: no rollout would read a critique, so the "
                "run would be the baseline; lower start_rollout or set "
                "algorithm.feedback_guidance.enable=False."
            )
        init = self.model["init"]
        if init != "scratch" and not init.startswith("hf:"):
            raise ValueError(f"model.init={init!r}: use 'scratch' or 'hf:PATH'.")
        smear = self.model.get("smear", 0)
        if isinstance(smear, float) or int(smear) < 0:
            raise ValueError(f"model.smear={smear!r}: the number of preceding tokens, an int >= 0.")
        if smear and self.rollout.engine == "vllm":
            raise ValueError(
                f"model.smear={smear} with rollout.engine='vllm': vLLM runs the Hugging Face "
                "architecture, which has no smear gates; use --config.model.smear=0 (a "
                "pretrained model.init=hf:PATH needs none) or --config.rollout.engine=jax."
            )
        if smear and init != "scratch":
            raise ValueError(
                f"model.smear={smear} with model.init={init!r}: a checkpoint's config.json says "
                "whether it smears; set model.smear only for a preset trained from scratch "
                "(--config.model.smear=0; and --config.warm_start.induction_steps=0, as a "
                "pretrained model copies already)."
            )


_LLM_KEYS = ("llm_base_url", "llm_model", "llm_api_key_env", "llm_timeout_s")


def settings_from_config(config) -> RunSettings:
    """Reads every key of a configs/*.py config into validated settings."""
    alg, opt, roll = config.algorithm, config.optimizer, config.rollout
    fg = alg.feedback_guidance
    feedback = FeedbackGuidanceConfig(
        enable=fg.enable,
        start_rollout=fg.start_rollout,
        accumulation_mode=fg.accumulation_mode,
        max_feedback_tokens=fg.max_feedback_tokens,
        use_llm_enhancement=fg.use_llm_enhancement,
        # Keys newer than some saved runs' config.json: their absence means the defaults.
        **{key: fg[key] for key in _LLM_KEYS if key in fg},
        mix=fg.mix,
        training_context=fg.training_context,
        shaping_gamma=fg.shaping_gamma,
    )
    loss_settings = {
        "eps_low": alg.eps_low,
        "eps_high": alg.eps_high,
        "dual_clip": alg.dual_clip or None,
        "kl_coef": alg.kl_coef,
        "guided_objective": fg.guided_objective,
        "shaping_gamma": fg.shaping_gamma,
    }
    if alg.loss == "dr_grpo":
        # Dr. GRPO divides each rollout's token sum by a constant generation budget, not
        # the batch's padded length (which changes with every batch): the most tokens a
        # rollout can sample.
        loss_settings["max_length"] = min(
            roll.max_turns * roll.max_new_tokens, roll.max_total_tokens
        )
    if alg.learner_support not in LEARNER_SUPPORTS:
        raise ValueError(
            f"algorithm.learner_support={alg.learner_support!r}: choose one of "
            f"{LEARNER_SUPPORTS} (the whole softmax, or the rollouts' top-k / top-p support)."
        )
    sampled = alg.learner_support == "sampled" and roll.temperature > 0
    train = TrainConfig(
        loss=alg.loss,
        loss_settings=loss_settings,
        ppo_epochs=opt.ppo_epochs,
        num_mini_batches=opt.num_mini_batches,
        num_micro_batches=opt.num_micro_batches,
        length_bucket=opt.length_bucket,
        # Recomputed with the training forward so plain rows start at ratio 1; the
        # learner keeps the sampler's log-probs for `guided` rows (trained under the
        # original prompt, sampled under the critique).
        recompute_old_logp=True,
        # Log-probs of the distribution the rollouts were drawn from (greedy: the raw one).
        temperature=roll.temperature if roll.temperature > 0 else 1.0,
        top_p=roll.top_p if sampled else 1.0,
        top_k=roll.top_k if sampled else 0,
        optim=OptimConfig(
            learning_rate=opt.learning_rate,
            warmup_steps=opt.warmup_steps,
            weight_decay=opt.weight_decay,
            max_grad_norm=opt.max_grad_norm,
            trainable=opt.trainable,
        ),
    )
    return RunSettings(
        seed=config.seed,
        backend=config.backend,
        distributed=config.distributed,
        data_dir=config.data.dir,
        model=dict(config.model),
        mesh={"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
        warm_start=WarmStartConfig(**dict(config.warm_start)),
        rollout=RolloutSettings(
            engine=roll.engine,
            tasks_per_step=roll.tasks_per_step,
            sampling=SamplingConfig(
                temperature=roll.temperature,
                top_p=roll.top_p,
                top_k=roll.top_k,
                max_new_tokens=roll.max_new_tokens,
            ),
            runner=RunnerSettings(max_total_tokens=roll.max_total_tokens, max_turns=roll.max_turns),
            groups=GroupSettings(
                num_rollouts=roll.group_size, wave_size=fg.wave_size, seed=config.seed
            ),
            vllm_gpu_memory_utilization=roll.vllm_gpu_memory_utilization,
            cpu_devices=roll.cpu_devices,
        ),
        algorithm=AlgorithmSettings(
            advantage=alg.advantage,
            dynamic_sampling=alg.dynamic_sampling.enable,
            max_rounds=alg.dynamic_sampling.max_rounds,
            overlong=alg.overlong.enable,
            overlong_max_length=alg.overlong.max_length,
            overlong_cache_length=alg.overlong.cache_length,
            mask_truncated=alg.overlong.mask_truncated,
            feedback=feedback,
            reward=alg.get("reward", "score"),  # absent from older runs' config.json
            credit=alg.get("credit", "episode"),
            credit_lambda=alg.get("credit_lambda", 1.0),
            turn_weights={
                **dict.fromkeys(TURN_KINDS, 1.0),
                **dict(alg.get("turn_weights", {})),
            },
        ),
        train=train,
        checkpoint=CheckpointConfig(max_to_keep=config.max_to_keep, save_interval_steps=1),
        total_steps=config.total_steps,
        eval_every=config.eval_every,
        eval_split=config.eval.split,
        eval_num_tasks=config.eval.num_tasks,
        checkpoint_every=config.checkpoint_every,
        log_examples_every=config.log_examples_every,
        debug_conversations=config.debug_conversations,
    )
