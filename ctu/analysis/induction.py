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

The recall variant (`task="recall"`) asks for a lookup instead: lines of a key (one or
two random tokens), separator tokens shared by every line of the sequence, and a value,
with random filler between them; then some keys again with the separators, and the loss
on their values, the first value token included. At the last separator every line looks
alike, so only the key a few tokens back says which value follows: the skill of
copying the phone number that follows "Fraud: +1-" out of a directory where every line
reads "Name: +1-...". The plain copy task never asks for it: its random tokens are
unique, so matching the current token alone finds the span. `"copy+recall"` gives each
batch half of each.
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
TASKS = ("copy", "recall", "copy+recall")
# The recall task's lines: key, shared separators, value, then filler before the next.
RECALL_KEY = (1, 2)
RECALL_SEPARATORS = (2, 4)
RECALL_VALUE = 4
RECALL_FILLER = (0, 3)


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
    task: str = "copy"  # copy | recall | copy+recall (half the rows each)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"induction probe: task={self.task!r}, choose one of {TASKS}")
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


def recall_batch(rng: np.random.Generator, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens `[batch, length]` holding key-separators-value lines, then keys of
    those lines again with the separators and their values; the float mask of those
    repeated values (module docstring)."""
    tokens = rng.integers(FIRST_TOKEN, FIRST_TOKEN + config.vocab, (config.batch, config.length))
    mask = np.zeros((config.batch, config.length), np.float32)

    def draw(count: int) -> list:
        return list(rng.integers(FIRST_TOKEN, FIRST_TOKEN + config.vocab, count))

    longest = RECALL_KEY[1] + RECALL_SEPARATORS[1] + RECALL_VALUE + RECALL_FILLER[1]
    for row in range(config.batch):
        separators = list(tokens[row, : rng.integers(*RECALL_SEPARATORS, endpoint=True)])
        lines, position = [], 0
        # Lines fill the first two thirds; queries of them the rest.
        while position + longest <= 2 * config.length // 3:
            key = draw(RECALL_KEY[1])[: rng.integers(*RECALL_KEY, endpoint=True)]
            if any(key == k for k, _ in lines):
                continue
            value = draw(RECALL_VALUE)
            line = key + separators + value
            tokens[row, position : position + len(line)] = line
            lines.append((key, value))
            position += len(line) + rng.integers(*RECALL_FILLER, endpoint=True)
        for index in rng.permutation(len(lines)):
            key, value = lines[index]
            query = key + separators + value
            if position + len(query) > config.length:
                break
            tokens[row, position : position + len(query)] = query
            mask[row, position + len(query) - len(value) : position + len(query)] = 1.0
            position += len(query) + rng.integers(*RECALL_FILLER, endpoint=True)
    return tokens.astype(np.int32), mask


def task_batch(rng: np.random.Generator, config: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """A batch of `config.task`: copy, recall, or half of each (copy rows first)."""
    if config.task != "copy+recall":
        return (copy_batch if config.task == "copy" else recall_batch)(rng, config)
    half = dataclasses.replace(config, batch=config.batch // 2)
    rest = dataclasses.replace(config, batch=config.batch - half.batch)
    parts = [copy_batch(rng, half), recall_batch(rng, rest)]
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


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
        loss = train_step(model, optimizer, *task_batch(rng, config))
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
