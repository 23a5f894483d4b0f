"""Can an architecture learn to copy by content, and how fast? The induction probe.

A span of random tokens from the first half of a sequence reappears at a random place
in the second half; only the span's tokens after its first carry loss. Nothing but the
content says where the span came from, so position alone cannot predict it: a model
must form an induction circuit (a previous-token head and a head that attends to the
token after the last occurrence of the current one). A span repeated at a fixed
offset, by contrast, is solved by one head attending a fixed distance back, without
any content matching.

Before the circuit forms the loss sits at log(vocab) (a uniform guess); when it forms
the loss falls steeply within a few hundred steps. `steps_to_copy` reports the first
logged step whose loss is below half of log(vocab). Copying names, numbers and auth
values from the conversation is most of the agent's job, so this measures how many
updates an architecture needs before any of that can be learned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
from flax import nnx

from ctu.models import ModelConfig, Qwen
from ctu.rl.optim import OptimConfig, make_optimizer

# Token ids below this are left out of the random tokens (special and markup tokens).
FIRST_TOKEN = 16


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The copy task's shape and the optimizer's settings."""

    vocab: int = 64  # distinct random tokens
    length: int = 64
    span: int = 10
    batch: int = 32
    steps: int = 2000
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    log_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("vocab", "span", "batch", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"induction probe: {name} must be >= 1, got {getattr(self, name)}")
        if self.length < 4 * self.span:
            raise ValueError(
                f"induction probe: length={self.length} must be at least 4 * span="
                f"{4 * self.span}, so the span fits in each half with room to move"
            )


def copy_batch(rng: np.random.Generator, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens `[batch, length]` (ids FIRST_TOKEN .. FIRST_TOKEN + vocab - 1) in
    which a span of the first half is repeated at a random place in the second half,
    and the float mask of the span's repeated tokens after its first."""
    half, span = config.length // 2, config.span
    tokens = rng.integers(FIRST_TOKEN, FIRST_TOKEN + config.vocab, (config.batch, config.length))
    mask = np.zeros((config.batch, config.length), np.float32)
    sources = rng.integers(0, half - span + 1, config.batch)
    targets = rng.integers(half, config.length - span + 1, config.batch)
    for row, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        tokens[row, dst : dst + span] = tokens[row, src : src + span]
        mask[row, dst + 1 : dst + span] = 1.0
    return tokens.astype(np.int32), mask


def train_copy(model: nnx.Module, config: ProbeConfig, log=print) -> list[dict]:
    """Trains `model` in place on `config.steps` batches of the copy task (AdamW with
    warmup, no weight decay; the loss is the warm start's `ctu.sft.sft_loss`, token-mean
    NLL over the mask). Returns the loss curve, one point per `log_every` steps."""
    if model.config.vocab_size < FIRST_TOKEN + config.vocab:
        raise ValueError(
            f"induction: the copy task draws ids up to {FIRST_TOKEN + config.vocab - 1}, "
            f"beyond the model's vocabulary of {model.config.vocab_size}; lower vocab"
        )
    optim = OptimConfig(
        learning_rate=config.learning_rate, warmup_steps=config.warmup_steps, weight_decay=0.0
    )
    from ctu.sft import sft_loss  # ctu.sft runs this before its demonstrations

    optimizer = nnx.Optimizer(model, make_optimizer(optim), wrt=nnx.Param)
    loss_fn = functools.partial(sft_loss, prefix_len=0)

    @nnx.jit
    def train_step(model, optimizer, tokens, mask):
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens, mask)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(config.seed)
    chance = math.log(config.vocab)
    curve = []
    for step in range(1, config.steps + 1):
        loss = train_step(model, optimizer, *copy_batch(rng, config))
        if step % config.log_every == 0 or step == config.steps:
            curve.append({"step": step, "loss": float(loss)})
            log(f"step {step}: copy loss {float(loss):.3f} (chance {chance:.3f})")
    return curve


def run_probe(model_config: ModelConfig, config: ProbeConfig, log=print) -> dict:
    """Trains a fresh model on the copy task; returns its loss curve and steps to copy.

    The model's vocabulary is grown to hold the probe's tokens when it is smaller."""
    if model_config.vocab_size < FIRST_TOKEN + config.vocab:
        model_config = dataclasses.replace(model_config, vocab_size=FIRST_TOKEN + config.vocab)
    started = time.perf_counter()
    curve = train_copy(Qwen(model_config, rngs=nnx.Rngs(config.seed)), config, log)
    chance = math.log(config.vocab)
    copied = [point["step"] for point in curve if point["loss"] < 0.5 * chance]
    return {
        "chance_loss": chance,
        "steps_to_copy": copied[0] if copied else None,
        "final_loss": curve[-1]["loss"],
        "seconds": time.perf_counter() - started,
        "curve": curve,
    }
