"""The training program: warm start, then feedback-guided DAPO (or GRPO) on
multi-turn rollouts in the simulated world.

`train_and_evaluate(config, workdir)` reads top to bottom: settings, backend and
mesh, world and tokenizer, model, warm start, learner and checkpoint restore,
rollout engine, then the loop (sample groups in waves -> batch -> update ->
metrics, evaluation, checkpoint). Rerunning it on the same workdir resumes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from ctu import metrics as metrics_lib
from ctu import sft, sharding
from ctu import workdir as workdir_lib
from ctu.backend import cpu_cores, initialize_backend
from ctu.feedback_guidance import FEEDBACK_CACHE_DIR
from ctu.models import ModelConfig, from_hf
from ctu.rl import batching
from ctu.rl.checkpoint import Checkpointer
from ctu.rl.dynamic_sampling import dynamic_sample
from ctu.rl.train_step import Learner
from ctu.rollout import evaluate as rollout_eval
from ctu.rollout.engine import JaxEngine, RolloutEngine
from ctu.rollout.groups import run_groups
from ctu.rollout.vllm_engine import VllmEngine
from ctu.run_config import RunSettings, settings_from_config
from ctu.text.chat_template import END_OF_TURN
from ctu.text.tokenizer import load_tokenizer, make_world_tokenizer
from ctu.world import data, reward, tools

TOKENIZER_DIR = workdir_lib.TOKENIZER_DIR
TOKENIZER_SETTINGS = "ctu_tokenizer.json"  # what a workdir's world tokenizer was built with
CHECKPOINT_DIR = "checkpoints"
VLLM_POLICY_DIR = "vllm_policy"  # the Hugging Face export vLLM samples from


@dataclasses.dataclass
class Setup:
    """What every program of a run shares: settings, mesh, world, tokenizer, model."""

    settings: RunSettings
    workdir: str
    mesh: jax.sharding.Mesh  # the learner's
    sampler_mesh: jax.sharding.Mesh  # the in-process sampler's (see rollout.cpu_devices)
    world: data.World
    tokenizer: object
    model_config: ModelConfig
    model: nnx.Module


def _tokenizer(settings: RunSettings, workdir: str):
    """The run's tokenizer (`workdir.tokenizer_dir`): model.tokenizer, a checkpoint's
    own, or the world tokenizer built into WORKDIR/tokenizer, reused while its settings
    hold."""
    path = workdir_lib.tokenizer_dir(settings.model, workdir)
    if settings.model["tokenizer"]:
        return load_tokenizer(path)
    init = settings.model["init"]
    if path != os.path.join(workdir, TOKENIZER_DIR):  # an hf: checkpoint's own
        if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
            raise ValueError(
                f"model.init={init!r} with model.tokenizer='': a checkpoint's token ids mean "
                f"something only under its own tokenizer, and {path} has none; set "
                "--config.model.tokenizer=DIR to the folder of the tokenizer it was trained "
                "with."
            )
        logging.info("using the checkpoint's tokenizer, %s", path)
        return load_tokenizer(path)
    if init.startswith("hf:"):  # tokenizer_dir found one an older ctu built
        logging.warning(
            "model.init=%s: keeping %s, the world tokenizer an older ctu built for this run "
            "(a new run uses the checkpoint's own)",
            init,
            path,
        )
        return load_tokenizer(path)
    wanted = {
        key: settings.model[key]
        for key in ("tokenizer_vocab_size", "tokenizer_episodes", "tokenizer_max_digits")
    }
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        workdir_lib.check_reuse(
            path,
            TOKENIZER_SETTINGS,
            {"model": wanted},
            remedy="use a new --workdir, or the settings it was made with",
        )
        return load_tokenizer(path)
    logging.info("building a tokenizer from the world into %s", path)
    # Built aside and renamed into place: a run killed meanwhile leaves no tokenizer
    # for the next one to reuse, rather than half of one.
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_world_tokenizer(
        settings.data_dir,
        tmp,
        settings.model["tokenizer_vocab_size"],
        tools.TOOL_SCHEMAS,
        num_episodes=settings.model["tokenizer_episodes"],
        max_digits=settings.model["tokenizer_max_digits"],
    )
    workdir_lib.write_json(os.path.join(tmp, TOKENIZER_SETTINGS), {"model": wanted})
    shutil.rmtree(path, ignore_errors=True)  # an interrupted older build, if any
    os.replace(tmp, path)
    return load_tokenizer(path)


def setup(config, workdir: str) -> Setup:
    """Settings, backend, mesh, world, tokenizer and the initial model of a run."""
    settings = settings_from_config(config)
    if settings.rollout.engine == "vllm":
        # JAX would take 75% of the GPU at start-up, before vLLM asks for its share.
        jax_share = 0.95 - settings.rollout.vllm_gpu_memory_utilization
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{jax_share:.2f}")
    cpu_devices = (settings.rollout.cpu_devices or cpu_cores()) if settings.backend == "cpu" else 1
    initialize_backend(settings.backend, distributed=settings.distributed, cpu_devices=cpu_devices)
    os.makedirs(workdir, exist_ok=True)
    if cpu_devices > 1:  # the learner on the first CPU device, the sampler on all of them
        mesh = sharding.make_mesh(settings.mesh, devices=jax.devices()[:1])
        sampler_mesh = sharding.make_mesh(
            sharding.DATA_PARALLEL, devices=jax.devices()[:cpu_devices]
        )
    else:
        mesh = sampler_mesh = sharding.make_mesh(settings.mesh)
    world = data.load_world(settings.data_dir)
    tokenizer = _tokenizer(settings, workdir)
    model_settings = settings.model
    dtypes = {"dtype": model_settings["dtype"], "param_dtype": model_settings["param_dtype"]}
    if model_settings["init"].startswith("hf:"):
        model, model_config = from_hf(model_settings["init"][3:], mesh=mesh, **dtypes)
    else:
        model_config = ModelConfig.preset(
            model_settings["preset"],
            vocab_size=len(tokenizer),
            smear=model_settings["smear"],
            **dtypes,
        )
        model = sharding.create_sharded_model(model_config, mesh, nnx.Rngs(settings.seed))
    if model_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the model's vocabulary ({model_config.vocab_size}) is smaller than the "
            f"tokenizer's ({len(tokenizer)}); use the checkpoint's own tokenizer."
        )
    return Setup(settings, workdir, mesh, sampler_mesh, world, tokenizer, model_config, model)


def rollout_engines(s: Setup, model: nnx.Module) -> tuple[RolloutEngine, RolloutEngine]:
    """The engine that samples training rollouts and its greedy twin for evaluation;
    they share one set of weights (`update_weights` on the first serves both)."""
    rollout = s.settings.rollout
    eot = s.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    sampling = dataclasses.replace(rollout.sampling, stop_token_ids=(eot,))
    if rollout.engine == "vllm":
        engine = VllmEngine.from_model(
            model,
            s.model_config,
            os.path.join(s.workdir, VLLM_POLICY_DIR),
            sampling,
            seed=s.settings.seed,
            gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
            max_model_len=rollout.runner.max_total_tokens,
        )
    else:
        engine = JaxEngine(model, sampling, mesh=s.sampler_mesh)
    return engine, engine.with_sampling(dataclasses.replace(sampling, temperature=0.0))


def _warm_start(s: Setup, *, allow_other_settings: bool = False) -> nnx.Module:
    # A warm start that is reused keeps the logs of the run that trained it.
    logs = os.path.join(s.workdir, "warm_start_logs")
    reusing = sft.saved_warm_start(s.workdir)
    writer = metrics_lib.NullWriter() if reusing else metrics_lib.create_writer(logs)
    try:
        return sft.warm_start(
            s.model,
            s.model_config,
            config=s.settings.warm_start,
            guidance=s.settings.algorithm.feedback,
            world=s.world,
            tokenizer=s.tokenizer,
            workdir=s.workdir,
            mesh=s.mesh,
            writer=writer,
            seed=s.settings.seed,
            log=logging.info,
            max_new_tokens=s.settings.rollout.sampling.max_new_tokens,
            allow_other_settings=allow_other_settings,
        )
    finally:
        writer.close()


def run_sft(config, workdir: str) -> nnx.Module:
    """The warm start alone (`python -m launch.sft`)."""
    s = setup(config, workdir)
    model = _warm_start(s)
    # The warm start's own record; WORKDIR/config.json only for a new workdir, as a run
    # that already trained there is resumed against its own.
    metrics_lib.save_config(os.path.join(workdir, "warm_start_logs"), config)
    if not os.path.exists(os.path.join(workdir, metrics_lib.CONFIG_FILE)):
        metrics_lib.save_config(workdir, config)
    return model


# ---- data order ----------------------------------------------------------------------


def task_stream(task_ids: list[str], seed: int, position: int):
    """Train tasks in seeded epochs of shuffled order, from `position` on.

    Yields (next position, task id); the position is what a checkpoint saves.
    """
    while True:
        epoch, offset = divmod(position, len(task_ids))
        order = np.random.default_rng([seed, epoch]).permutation(len(task_ids))
        position += 1
        yield position, task_ids[order[offset]]


class GroupSampler:
    """Plays the groups of the next train tasks; a callable for `dynamic_sample`.

    Remembers every round's result (`results`) and the data position after it.
    """

    def __init__(self, s: Setup, engine, stream, key: jax.Array, *, seed: int, enhancer=None):
        self.s, self.engine, self.stream, self.key, self.seed = s, engine, stream, key, seed
        self.enhancer = enhancer  # rewrites failed rollouts' critiques (LLMFeedback)
        self.results = []
        self.position = None

    def __call__(self, count: int):
        ids = []
        for _ in range(count):
            self.position, task_id = next(self.stream)
            ids.append(task_id)
        settings = self.s.settings
        result = run_groups(
            self.engine,
            ids,
            world=self.s.world,
            tokenizer=self.s.tokenizer,
            rng=jax.random.fold_in(self.key, len(self.results)),
            settings=dataclasses.replace(settings.rollout.groups, seed=self.seed),
            feedback=settings.algorithm.feedback,
            runner=settings.rollout.runner,
            feedback_enhancer=self.enhancer,
        )
        self.results.append(result)
        return result.groups


# ---- metrics ---------------------------------------------------------------------------


def _parse_failure_rate(records) -> float:
    """Parse failures per assistant turn."""
    return sum(r.num_parse_failures for r in records) / max(sum(r.num_turns for r in records), 1)


def rollout_metrics(
    groups, group_size: int, *, start_rollout: int | None = None, feedback_groups=None
) -> dict[str, float]:
    """Batch reward metrics, success by rollout position, parse failures, and the share
    of rollouts ending in each failure type (`failure/missing_auth`, ...).

    Success and parse failures are also split three ways: `first_try`, the rollouts
    that could not have read a critique (before `start_rollout`, or in a group not
    eligible for feedback: `feedback_groups[i]` False; all of them when
    `start_rollout` is None, feedback off); `with_feedback`, those that read one; and
    `unguided_later`, the later rollouts of feedback groups that had no failure to read
    about (every earlier rollout succeeded, so their tasks are easier than most).
    """
    records = [r for g in groups for r in g]
    eligible = [True] * len(groups) if feedback_groups is None else list(feedback_groups)
    first_try, later = [], []
    for group, can_read in zip(groups, eligible, strict=True):
        for r in group:
            if start_rollout is None or not can_read or r.rollout < start_rollout:
                first_try.append(r)
            elif not r.guided:
                later.append(r)
    out = {
        "reward/mean": float(np.mean([r.reward for r in records])),
        "success/rate": float(np.mean([r.success for r in records])),
        "parse_failure_rate": _parse_failure_rate(records),
        "episode/turns": float(np.mean([r.num_turns for r in records])),
        "episode/sampled_tokens": float(np.mean([r.num_sampled_tokens for r in records])),
        "episode/truncated": float(np.mean([r.truncated for r in records])),
    }
    for kind, count in collections.Counter(r.failure_type for r in records).items():
        if kind != reward.SUCCESS:
            out[f"failure/{kind}"] = count / len(records)
    for k in range(1, group_size + 1):
        at_k = [r.success for r in records if r.rollout == k]
        if at_k:
            out[f"success_at_rollout/{k}"] = float(np.mean(at_k))
    for name, subset in (
        ("with_feedback", [r for r in records if r.guided]),
        ("first_try", first_try),
        ("unguided_later", later),
    ):
        if subset:
            out[f"success/{name}"] = float(np.mean([r.success for r in subset]))
            out[f"parse_failure_rate/{name}"] = _parse_failure_rate(subset)
    return out


def _example_text(tokenizer, record) -> str:
    """The user's request, the episode after it, and its reward (the system turn,
    the same in every episode but for a feedback block, is left out)."""
    prompt = tokenizer.decode(record.tokens[: record.prompt_length].tolist())
    request = prompt[prompt.rfind("<|im_start|>user") :]
    response = tokenizer.decode(record.tokens[record.prompt_length :].tolist())
    return (
        f"reward {record.reward:.2f} ({record.failure_type}); feedback: {record.feedback}\n"
        f"{record.feedback_block}\n--- prompt ---\n{request}\n--- response ---\n{response}"
    )


def _log_conversations(workdir: str, step: int, tokenizer, groups) -> None:
    path = os.path.join(workdir, "conversations", f"step_{step:06d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in (r for g in groups for r in g):
            row = {
                "task_id": record.task_id,
                "group": record.group,
                "rollout": record.rollout,
                "reward": record.reward,
                "failure_type": record.failure_type,
                "feedback": record.feedback,
                "text": tokenizer.decode(record.tokens.tolist()),
            }
            f.write(json.dumps(row) + "\n")


# ---- the program -----------------------------------------------------------------------


def evaluate(s: Setup, engine, step: int, writer) -> dict:
    """Cold-start success on the first `eval.num_tasks` tasks of the eval split."""
    tasks = s.world.split(s.settings.eval_split)[: s.settings.eval_num_tasks]
    result = rollout_eval.evaluate_model(
        engine,
        s.world,
        s.settings.eval_split,
        tokenizer=s.tokenizer,
        rng=jax.random.key(s.settings.seed + 1),
        tasks=tasks,
        seed=s.settings.seed,
        runner=s.settings.rollout.runner,
    )
    split = s.settings.eval_split  # "val" unless eval.split says otherwise
    scalars = {f"{split}/success": result["success_rate"], f"{split}/score": result["mean_score"]}
    for level, rate in result.get("per_level_success", {}).items():
        scalars[f"{split}/success_level_{level}"] = rate
    writer.write_scalars(step, scalars)
    return scalars


def check_resumable(config, workdir: str, *, allow_config_change: bool = False) -> None:
    """Refuses to resume `workdir` under a config that trains something else than the
    one it saved (only `workdir.RESUMABLE_KEYS` may change), unless allowed, which
    logs the changes instead."""
    path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not os.path.exists(path):
        return
    # Settings newer than the saved file take their defaults: a run that predates a
    # setting ran as its default does.
    saved, _ = workdir_lib.saved_config(path)
    diff = workdir_lib.changes(saved, config.to_dict(), allowed=workdir_lib.RESUMABLE_KEYS)
    if not diff:
        return
    message = f"resuming {workdir} with a config that differs from {path}: " + (
        workdir_lib.describe(diff)
    )
    if allow_config_change:
        logging.warning("%s (allowed by --allow_config_change)", message)
        return
    raise ValueError(
        f"{message}. A resumed run continues its saved task order, policy and optimizer "
        "under these settings; use a new --workdir, put the saved values back, or pass "
        "--allow_config_change to go on with the new ones."
    )


def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Runs (or resumes) the training job in `workdir`; returns the last metrics.

    A resumed run must have the config it saved, except for `workdir.RESUMABLE_KEYS`
    (length, evaluation, logging, devices), unless `allow_config_change`.
    """
    # Setup: settings, backend, mesh, world, tokenizer, model.
    s = setup(config, workdir)
    settings = s.settings
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), settings.checkpoint)
    resuming = checkpointer.latest_step() is not None
    if resuming:
        check_resumable(config, workdir, allow_config_change=allow_config_change)

    # Warm start. A resumed run's policy comes from its checkpoint, but a loss with a KL
    # term copies its reference from the model the learner is built on: the policy RL
    # began from, so the warm start again (reused from the workdir, not retrained).
    warm = settings.warm_start.enable and (not resuming or settings.train.needs_reference)
    model = _warm_start(s, allow_other_settings=allow_config_change) if warm else s.model
    learner = Learner(settings.train, model, s.mesh)

    # Restore.
    rng, position, start_step = jax.random.key(settings.seed), 0, 0
    if resuming:
        restored = checkpointer.restore(model=learner.model, optimizer=learner.optimizer)
        rng, position, start_step = (
            # orbax restores the key on a mesh of its own; use this run's.
            jax.device_put(restored.rng, sharding.replicated(s.mesh)),
            restored.data_position["position"],
            restored.step,
        )
        logging.info("resumed from step %d", start_step)
    writer = metrics_lib.create_writer(workdir, start_step=start_step, config=config)
    try:
        # Rollout engines: sampling for training, greedy for evaluation.
        engine, eval_engine = rollout_engines(s, learner.model)
        if start_step == 0:
            evaluate(s, eval_engine, 0, writer)

        enhancer = settings.algorithm.feedback.make_enhancer(
            os.path.join(workdir, FEEDBACK_CACHE_DIR)
        )
        train_ids = [t.task_id for t in s.world.split("train")]
        stream = task_stream(train_ids, settings.seed, position)
        last: dict = {}
        bar = tqdm(range(start_step + 1, settings.total_steps + 1), desc="train", unit="step")
        for step in bar:
            step_start = time.perf_counter()
            rng, sample_key, update_key = jax.random.split(rng, 3)

            # Rollouts: groups in waves, refilled by dynamic sampling.
            sampler = GroupSampler(
                s, engine, stream, sample_key, seed=settings.seed + step, enhancer=enhancer
            )
            rollout_start = time.perf_counter()
            if settings.algorithm.dynamic_sampling:
                groups, ds_stats = dynamic_sample(
                    sampler,
                    target_groups=settings.rollout.tasks_per_step,
                    max_rounds=settings.algorithm.max_rounds,
                    rewards_of=lambda g: batching.trained_rewards(
                        g, reward=settings.algorithm.reward
                    ),
                )
                if not groups:  # every group was constant: train on the last round's anyway
                    groups = sampler.results[-1].groups
            else:
                groups, ds_stats = sampler(settings.rollout.tasks_per_step), {}
            rollout_s = time.perf_counter() - rollout_start
            position = sampler.position
            all_groups = [g for result in sampler.results for g in result.groups]

            # Update.
            batch, batch_stats = batching.build_batch(
                groups,
                settings=settings.algorithm,
                rows_multiple=settings.train.rows_multiple() * sharding.batch_shards(s.mesh),
                pad_id=s.tokenizer.pad_token_id,
                length_multiple=settings.train.length_bucket,
            )
            update_metrics = learner.update(batch, update_key)
            sync_start = time.perf_counter()
            engine.update_weights(learner.model)  # and the evaluation engine's
            sync_s = time.perf_counter() - sync_start

            # Metrics.
            waves = [w for result in sampler.results for w in result.waves]
            runs = [w.run for w in waves]
            feedback = settings.algorithm.feedback
            scalars = {
                **rollout_metrics(
                    all_groups,
                    settings.rollout.groups.num_rollouts,
                    start_rollout=feedback.start_rollout if feedback.enable else None,
                    feedback_groups=[
                        i in result.feedback_groups
                        for result in sampler.results
                        for i in range(len(result.groups))
                    ],
                ),
                **ds_stats,
                **batch_stats,
                **update_metrics,
                "timing_s/rollout": rollout_s,
                "timing_s/generation": sum(r.generation_s for r in runs),
                "timing_s/environment": sum(r.env_s for r in runs),
                "timing_s/feedback": sum(w.feedback_s for w in waves),
                "timing_s/weight_sync": sync_s,
                "waves": float(len(waves)),
            }
            if step % settings.log_examples_every == 0:
                writer.write_texts(step, {"example": _example_text(s.tokenizer, groups[0][-1])})
            if settings.debug_conversations:
                _log_conversations(workdir, step, s.tokenizer, all_groups)
            if step % settings.eval_every == 0 or step == settings.total_steps:
                scalars.update(evaluate(s, eval_engine, step, writer))

            # Metrics first, then the checkpoint: a run killed after the checkpoint
            # commits must not lose this step's row.
            scalars["timing_s/step"] = time.perf_counter() - step_start
            writer.write_scalars(step, scalars)
            if step % settings.checkpoint_every == 0 or step == settings.total_steps:
                writer.flush()  # texts and events up to this step survive a kill after it
                checkpoint_start = time.perf_counter()
                checkpointer.save(
                    step,
                    model=learner.model,
                    optimizer=learner.optimizer,
                    rng=rng,
                    data_position={"position": position},
                    force=True,
                )
                writer.write_scalars(
                    step, {"timing_s/checkpoint": time.perf_counter() - checkpoint_start}
                )
            bar.set_postfix(
                reward=f"{scalars['reward/mean']:.2f}", success=f"{scalars['success/rate']:.2f}"
            )
            last = scalars
    finally:
        # Whatever ends the loop: pending checkpoints commit, logs reach the disk.
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
    return last
