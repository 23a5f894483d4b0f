"""Warm start: supervised fine-tuning on the heuristic agent's demonstrations.

A tiny model starts from nothing, so before RL it imitates the heuristic scripted
agent (ctu.world.agents.Heuristic) — not the oracle: the heuristic guesses auth
fields from the department-type prior and learns routing from the phone, so RL
still has the per-company requirements and the routing to learn.

Some demonstrations read a `<previous_attempts>` block and act on it
(ctu.demonstrations builds them, as token ids with a loss mask on the agent's turns).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ctu import feedback_guidance as fg
from ctu import sharding
from ctu import workdir as workdir_lib
from ctu.analysis import induction
from ctu.analysis.copy_probe import ACTION_KINDS, teacher_forced_probe
from ctu.demonstrations import Demonstration, heuristic_demonstrations
from ctu.models import from_hf, to_hf
from ctu.models.shared_prefix import common_prefix_length, shared_prefix_token_logp
from ctu.rl.optim import OptimConfig, make_optimizer
from ctu.text.conversation import agent_spans
from ctu.world import data, tools

# What an agent turn can do: call one of the tools, or answer the user.
TURN_KINDS = (*tools.TOOL_NAMES, tools.RESPOND)


LENGTH_BUCKET = 128  # default warm_start.length_bucket


@dataclasses.dataclass(frozen=True)
class WarmStartConfig:
    """`config.warm_start`, validated."""

    enable: bool = True
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    num_tasks: int = 0
    demos_per_task: int = 1
    feedback_demo_fraction: float = 0.3
    feedback_demo_attempts: int = 1
    max_len: int = 1024
    # Batches are padded to a multiple of this many tokens: each distinct length is one
    # compilation of the update, so an accelerator, where compiling dominates, wants
    # coarser buckets than a CPU, where padding does.
    length_bucket: int = LENGTH_BUCKET
    context_loss_weight: float = 0.0
    # Updates on the variable-offset copy task (ctu.analysis.induction) before the
    # demonstrations: a from-scratch model first learns to copy by content there.
    induction_steps: int = 0
    induction_learning_rate: float = 3e-3
    induction_task: str = "copy"  # copy | recall | copy+recall (ctu.analysis.induction)
    # Loss weight of each demonstrated agent turn by the tool it calls (`respond` for a
    # message to the user); a tool not named weighs 1. The loss is the weighted token
    # mean, so a weight shifts the loss between kinds of turn.
    turn_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # Demonstrated turns open with the heuristic's reason in a <think> block (which
    # department handles each request; which one it calls): the policy writes its
    # decision down next to the action that follows from it.
    thoughts: bool = False
    # With thoughts, a demonstration that reads a critique cites, in its first form's
    # thought, the right department it names and the task's fields it lists
    # (agents.Heuristic cite_feedback).
    feedback_thoughts: bool = False
    # With thoughts, a call's thought ends with the auth fields it passes ("Call Fraud:
    # +1-800-555-0100. Fields: name, phone."; agents.Heuristic call_fields): the fields a
    # department takes are decided in words, next to its name, before the JSON.
    call_fields_thoughts: bool = False

    def __post_init__(self):
        if self.num_tasks < 0:
            raise ValueError(f"warm_start.num_tasks must be >= 0 (0 = all), got {self.num_tasks}")
        names = ("steps", "batch_size", "demos_per_task", "feedback_demo_attempts", "max_len")
        for name in (*names, "length_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"warm_start.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.feedback_demo_fraction <= 1.0:
            raise ValueError(
                "warm_start.feedback_demo_fraction must be in [0, 1], got "
                f"{self.feedback_demo_fraction}"
            )
        if self.context_loss_weight < 0:
            raise ValueError(
                f"warm_start.context_loss_weight must be >= 0, got {self.context_loss_weight}"
            )
        if self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError("warm_start.warmup_steps must be >= 0 and learning_rate > 0")
        for name in ("feedback_thoughts", "call_fields_thoughts"):
            if getattr(self, name) and not self.thoughts:
                raise ValueError(
                    f"warm_start.{name} adds to the demonstrations' thoughts, so it needs "
                    f"warm_start.thoughts=True (or set {name}=False)"
                )
        for tool, weight in dict(self.turn_weights).items():
            if tool not in TURN_KINDS:
                raise ValueError(
                    f"warm_start.turn_weights names {tool!r}, which is no tool; use one of "
                    f"{', '.join(TURN_KINDS)}"
                )
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(
                    f"warm_start.turn_weights.{tool} must be a finite weight >= 0, got {weight}"
                )
        # Weight 1 is every turn's default: only the others change a batch.
        weights = {tool: w for tool, w in dict(self.turn_weights).items() if w != 1.0}
        object.__setattr__(self, "turn_weights", weights)
        if self.induction_steps < 0 or self.induction_learning_rate <= 0:
            raise ValueError(
                "warm_start.induction_steps must be >= 0 and induction_learning_rate > 0, got "
                f"{self.induction_steps} and {self.induction_learning_rate}"
            )
        if self.induction_task not in induction.TASKS:
            raise ValueError(
                f"warm_start.induction_task={self.induction_task!r}: choose one of "
                f"{induction.TASKS}"
            )


# ---- supervised fine-tuning ---------------------------------------------------------


def world_split_for_probe(world: data.World) -> str:
    """The split the copy probe reads after a warm start: val, else train (tiny worlds)."""
    return "val" if world.split("val") else "train"


WARM_START_DIR = "warm_start"
# Written into WARM_START_DIR last: the settings it was trained under (`fingerprint`).
WARM_START_SETTINGS = "ctu_warm_start.json"


def bucketed_length(
    demos: Sequence[Demonstration], max_len: int, bucket: int = LENGTH_BUCKET
) -> int:
    longest = max(len(d.tokens) for d in demos)
    return min(-(-longest // bucket) * bucket, max_len)


def pad_batch(
    demos: Sequence[Demonstration],
    length: int,
    pad_id: int,
    rows_multiple: int = 1,
    turn_weights: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Right-pads demonstrations to `length` and the rows, with all-masked rows, to a
    multiple of `rows_multiple`: tokens int32, and float32 masks of the agent's tokens
    (`loss_mask`, each turn's tokens at `turn_weights[its tool]`, default 1) and of the
    environment's tokens after the system turn (`context_mask`: the user's words, tool
    results)."""
    rows = -(-len(demos) // rows_multiple) * rows_multiple
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.float32)
    context = np.zeros((rows, length), np.float32)
    for row, demo in enumerate(demos):
        agent = np.asarray(demo.loss_mask, np.float32)
        tokens[row, : len(demo.tokens)] = demo.tokens
        context[row, demo.context_start : len(demo.tokens)] = 1.0 - agent[demo.context_start :]
        if turn_weights:
            for (start, end), tool in zip(
                agent_spans(demo.loss_mask), demo.turn_tools, strict=True
            ):
                agent[start:end] = turn_weights.get(tool, 1.0)
        mask[row, : len(agent)] = agent
    return {"tokens": tokens, "loss_mask": mask, "context_mask": context}


def sft_loss(
    model: nnx.Module,
    tokens: jax.Array,
    loss_mask: jax.Array,
    context_mask: jax.Array | None = None,
    *,
    context_weight: float = 0.0,
    prefix_len: int = 0,
):
    """Token-mean negative log-likelihood over the agent's tokens (`loss_mask` > 0,
    weighted by it), plus `context_weight` times the token-mean over the environment's
    tokens.

    The context term is language modelling on the world's text (what users say, what
    the tools answer) that a from-scratch model has never read; copying names, numbers
    and fields from it is most of the agent's job. It weights tokens the policy never
    samples, so it belongs to the warm start only, never to RL.

    The first `prefix_len` tokens, shared by all rows and carrying no loss, run once
    (ctu.models.shared_prefix); the result is the same as a plain forward's."""
    logp = shared_prefix_token_logp(model, tokens, prefix_len)
    total_weight = jnp.maximum(loss_mask.sum(), 1e-9)
    agent_loss = -(logp * loss_mask).sum() / total_weight
    accuracy_proxy = (jnp.exp(logp) * loss_mask).sum() / total_weight
    metrics = {
        "sft/loss": agent_loss,
        "sft/mean_token_prob": accuracy_proxy,
        "sft/tokens": (loss_mask > 0).sum().astype(jnp.float32),
    }
    loss = agent_loss
    if context_mask is not None and context_weight > 0:
        context_loss = -(logp * context_mask).sum() / jnp.maximum(context_mask.sum(), 1.0)
        metrics["sft/context_loss"] = context_loss
        loss = loss + context_weight * context_loss
    return loss, metrics


class SftTrainer:
    """The warm start's model, optimizer and jitted step on one mesh.

    `model` must already be on `mesh`. The optimizer state is born sharded and every
    step returns model and optimizer state with exactly the shardings they were born
    with, so each batch shape compiles once (not again when the first step's outputs
    come back placed differently) and the placement never drifts between steps.
    """

    def __init__(self, model: nnx.Module, config: WarmStartConfig, mesh):
        optim = OptimConfig(
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            schedule="cosine",
            decay_steps=max(config.steps, config.warmup_steps + 1),
            final_lr_fraction=0.1,
            weight_decay=0.0,
            max_grad_norm=1.0,
        )
        self.model = model
        self.mesh = mesh
        self.optimizer = sharding.create_sharded_optimizer(model, make_optimizer(optim), mesh)
        self._graphdef = nnx.graphdef((model, self.optimizer))
        self._shardings = jax.tree.map(lambda x: x.sharding, self.state())
        self._step = jax.jit(
            self._train_step, donate_argnums=0, static_argnames=("prefix_len", "context_weight")
        )

    def state(self) -> nnx.State:
        return nnx.state((self.model, self.optimizer))

    def _train_step(self, state, batch, *, prefix_len: int, context_weight: float):
        model, optimizer = nnx.merge(self._graphdef, state)
        loss_fn = functools.partial(sft_loss, context_weight=context_weight, prefix_len=prefix_len)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(
            model, batch["tokens"], batch["loss_mask"], batch.get("context_mask")
        )
        metrics["sft/grad_norm"] = optax.tree.norm(grads)
        optimizer.update(model, grads)
        new_state = nnx.state((model, optimizer))
        return jax.lax.with_sharding_constraint(new_state, self._shardings), metrics

    def step(
        self, batch: dict[str, np.ndarray], *, prefix_len: int = 0, context_weight: float = 0.0
    ) -> dict[str, jax.Array]:
        """One update on `batch` (host arrays, rows a multiple of the batch shards)."""
        batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        with jax.set_mesh(self.mesh):
            state, metrics = self._step(
                self.state(), batch, prefix_len=prefix_len, context_weight=context_weight
            )
        nnx.update((self.model, self.optimizer), state)
        return metrics


def batches(demos: Sequence[Demonstration], batch_size: int, *, seed: int, window: int = 16):
    """Endless mini-batches of demonstrations in a new shuffled order every epoch.

    Within each window of `window` batches, demonstrations of the same kind (with or
    without a critique in the prompt) and similar length go together, and the window's
    batches are then shuffled: less padding, and a longer prompt prefix shared by the
    batch's rows (`ctu.models.shared_prefix`). A window's incomplete last batch is
    skipped (other demonstrations fill it in other epochs).
    """
    if len(demos) < batch_size:
        raise ValueError(
            f"{len(demos)} demonstrations cannot fill a batch of {batch_size}; lower "
            "warm_start.batch_size or demonstrate more tasks."
        )
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(demos)).tolist()
        for start in range(0, len(order), batch_size * window):
            block = sorted(
                order[start : start + batch_size * window],
                key=lambda i: (demos[i].with_feedback, len(demos[i].tokens)),
            )
            chunks = [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
            for j in rng.permutation(len(chunks)):
                if len(chunks[j]) == batch_size:
                    yield [demos[i] for i in chunks[j]]


def saved_warm_start(workdir: str) -> bool:
    """Whether WORKDIR holds a warm start that `warm_start` would reuse."""
    return os.path.exists(os.path.join(workdir, WARM_START_DIR, "config.json"))


def fingerprint(
    model_config, config: WarmStartConfig, guidance: fg.FeedbackGuidanceConfig, tokenizer, seed
) -> dict:
    """The settings a warm start is trained under: its model (dtypes aside, which a
    reload may change), its own settings, the critiques its demonstrations read, the
    tokenizer's vocabulary and the seed."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    architecture = dataclasses.asdict(model_config)
    for key in ("dtype", "param_dtype"):
        architecture.pop(key, None)
    settings = dataclasses.asdict(config)
    settings.pop("enable")
    settings.pop("length_bucket")  # padding only
    # A kind of turn not named weighs 1: named at 1 or not named is the same.
    settings["turn_weights"] = {k: float(w) for k, w in config.turn_weights.items() if w != 1.0}
    return {
        "model": architecture,
        "warm_start": settings,
        "feedback_guidance": {
            "accumulation_mode": guidance.accumulation_mode,
            "max_feedback_tokens": guidance.max_feedback_tokens,
        },
        "tokenizer_sha256": hashlib.sha256(vocab).hexdigest(),
        "seed": seed,
    }


def warm_start(
    model: nnx.Module,
    model_config,
    *,
    config: WarmStartConfig,
    guidance: fg.FeedbackGuidanceConfig,
    world: data.World,
    tokenizer,
    workdir: str,
    mesh,
    writer,
    seed: int,
    log=print,
    max_new_tokens: int | None = None,
    allow_other_settings: bool = False,
) -> nnx.Module:
    """Fine-tunes `model` on heuristic demonstrations, or reuses WORKDIR/warm_start
    when it was trained under the same settings (`fingerprint`; an error otherwise,
    a warning with `allow_other_settings`).

    `max_new_tokens` is the rollouts' per-turn limit: a warning names the demonstrated
    turns longer than it, which the policy could never finish.

    The result is saved as a Hugging Face folder (with the tokenizer), so a resumed
    run, `launch.evaluate --policy=hf:WORKDIR/warm_start` and anyone with
    transformers can load it (a smear model: ctu's `from_hf` only).
    """
    out = os.path.join(workdir, WARM_START_DIR)
    settings = fingerprint(model_config, config, guidance, tokenizer, seed)
    if saved_warm_start(workdir):
        workdir_lib.check_reuse(
            out,
            WARM_START_SETTINGS,
            settings,
            remedy=(
                f"delete {out} to train one under these settings, use a new --workdir, or "
                "pass --allow_config_change (launch.train) to reuse it anyway"
            ),
            allow=allow_other_settings,
        )
        log(f"warm start: reusing {out}")
        restored, _ = from_hf(
            out, dtype=model_config.dtype, param_dtype=model_config.param_dtype, mesh=mesh
        )
        return restored
    started = time.perf_counter()
    tasks = world.split("train")
    demos = heuristic_demonstrations(
        world, tasks[: config.num_tasks or len(tasks)], tokenizer, config, guidance, seed=seed
    )
    if not demos:
        raise ValueError(
            f"warm start: no demonstration fits warm_start.max_len={config.max_len} tokens; "
            "raise it."
        )
    with_feedback = sum(d.with_feedback for d in demos)
    log(
        f"warm start: {len(demos)} demonstrations ({with_feedback} acting on feedback), "
        f"mean heuristic score {np.mean([d.score for d in demos]):.3f}"
    )
    if max_new_tokens is not None:
        turns = [end - start for d in demos for start, end in agent_spans(d.loss_mask)]
        over = sum(n > max_new_tokens for n in turns)
        if over:
            logging.warning(
                "warm start: %d of %d demonstrated agent turns (the longest %d tokens) are "
                "longer than rollout.max_new_tokens=%d, so the policy is cut off before it "
                "can finish them; raise rollout.max_new_tokens.",
                over,
                len(turns),
                max(turns),
                max_new_tokens,
            )
    if config.induction_steps:
        copy_task = induction.ProbeConfig(
            vocab=len(tokenizer) - induction.FIRST_TOKEN,
            steps=config.induction_steps,
            learning_rate=config.induction_learning_rate,
            log_every=50,
            seed=seed,
            task=config.induction_task,
        )
        curve = induction.train_copy(
            model, copy_task, log=lambda m: log(f"warm start copy task {m}")
        )
        for point in curve:
            writer.write_scalars(point["step"], {"warm_start/copy_task_loss": point["loss"]})
    trainer = SftTrainer(model, config, mesh)
    stream = batches(demos, config.batch_size, seed=seed)
    for step in range(1, config.steps + 1):
        chunk = next(stream)
        batch = pad_batch(
            chunk,
            bucketed_length(chunk, config.max_len, config.length_bucket),
            tokenizer.pad_token_id,
            rows_multiple=sharding.batch_shards(mesh),
            turn_weights=config.turn_weights,
        )
        weighted = batch["loss_mask"] + config.context_loss_weight * batch["context_mask"]
        metrics = trainer.step(
            batch,
            prefix_len=common_prefix_length(batch["tokens"], weighted),
            context_weight=config.context_loss_weight,
        )
        if step % 10 == 0 or step == config.steps:
            scalars = {k: float(v) for k, v in metrics.items()}
            writer.write_scalars(step, scalars)
            log(f"warm start step {step}/{config.steps}: loss {scalars['sft/loss']:.3f}")
    probe = teacher_forced_probe(
        model,
        tokenizer,
        world,
        world_split_for_probe(world),
        seed=seed,
        thoughts=config.thoughts,
        call_fields=config.call_fields_thoughts,
    )
    copying = {k: v for k, v in probe.items() if k.startswith("copy/")}
    kinds = sorted(k.split("/")[1] for k in copying if k.count("/") == 1)
    log(
        "warm start: teacher-forced copying on held-out episodes: "
        + ", ".join(
            f"{kind} {copying[f'copy/{kind}']:.0%} (first token "
            f"{copying[f'copy/{kind}/first_token']:.0%}, later tokens "
            f"{copying.get(f'copy/{kind}/later_tokens', float('nan')):.0%})"
            for kind in kinds
        )
    )
    log(
        "warm start: teacher-forced actions on held-out episodes (every token right): "
        + ", ".join(
            f"{kind} {probe[f'action/{kind}']:.0%}"
            for kind in ACTION_KINDS
            if f"action/{kind}" in probe
        )
    )
    writer.write_scalars(
        config.steps,
        {"timing_s/warm_start": time.perf_counter() - started}
        | {f"warm_start/{k}": v for k, v in probe.items()},
    )
    to_hf(model, model_config, out)
    tokenizer.save_pretrained(out)
    workdir_lib.write_json(os.path.join(out, WARM_START_SETTINGS), settings)
    return model
