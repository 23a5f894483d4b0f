"""The policy update: one jitted, sharded optimizer step per mini-batch.

A rollout batch (`RolloutBatch`, per-token arrays `[B, T]` aligned with the tokens as
in docs/architecture.md) is trained on for `ppo_epochs` passes of `num_mini_batches`
optimizer updates each (`Learner.update`). Before the first update the behaviour
log-probs are recomputed with the training forward (`recompute_old_logp`), so the
first mini-batch step has importance ratio 1 up to float rounding, and the reference
log-probs come from a frozen copy of the initial policy, which exists only when the
loss has a KL term (`kl_coef > 0`, e.g. GRPO).

Inside the step a mini-batch is split into `num_micro_batches` micro-batches whose
gradients are summed with `jax.lax.scan`. Every micro-batch loss is divided by the
denominator of the whole mini-batch (`losses.loss_normalizer`: its valid token count
for DAPO's token-mean), so the accumulated gradient equals the full mini-batch's.

A step whose loss or gradients hold NaN/inf leaves parameters and optimizer state
untouched (the old state is selected inside the jitted step) and reports
`nonfinite=1`; after `max_consecutive_nonfinite` such steps in a row `Learner.update`
raises `NonFiniteError` before the caller can checkpoint, so the last good checkpoint
stays the latest. A step whose gradient is exactly zero (no valid token with an
advantage, no KL) also leaves the state untouched, Adam's momentum included, and
reports `zero_gradient=1`; it is not a failure and does not count towards the stop.

Platform, XLA:CPU flags and multi-host start-up: ctu.backend.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from ctu import metrics as ctu_metrics
from ctu import sharding
from ctu.models.shared_prefix import (
    common_prefix_length,
    shared_prefix_sampled_logp,
    shared_prefix_token_logp_and_entropy,
)
from ctu.rl import losses
from ctu.rl.optim import (
    OptimConfig,
    check_trainable,
    learning_rate_schedule,
    make_optimizer,
    trainable_filter,
)
from ctu.sampling.settings import SamplingConfig

# Metrics that are sums over the micro-batches; all others are token-weighted means.
_SUMMED_METRICS = ("loss", "tokens/valid", "sequences/valid", "tokens/guided")
# Means over the guided tokens only: a micro-batch weighs by its share of those.
_GUIDED_MEANS = ("guided/ratio_mean", "guided/clip_ratio/high", "guided/clip_ratio/low")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the policy update.

    Attributes:
      loss: a registered loss name ("dapo", "grpo", "dr_grpo").
      loss_settings: fields of that loss's settings (ctu.rl.losses.make_settings),
        e.g. {"eps_low": 0.2, "eps_high": 0.28} or {"kl_coef": 0.04}.
      ppo_epochs: passes over each rollout batch.
      num_mini_batches: optimizer updates per pass; the rollout batch is split into
        this many mini-batches (shuffled per pass when `shuffle`).
      num_micro_batches: gradient-accumulation chunks per mini-batch.
      length_bucket: rollout batches are padded to a multiple of this many tokens
        (ctu.rl.batching.build_batch); each distinct length compiles the step once.
      shuffle: reorder rows before each pass (deterministically from the update's key).
      recompute_old_logp: recompute the behaviour log-probs with the training forward
        before the first update instead of using the sampler's.
      max_consecutive_nonfinite: stop after this many skipped (NaN/inf) steps in a row.
      optim: optimizer settings.
      peak_flops_per_device: FLOP/s for `perf/mfu` when the device is not in
        ctu.metrics.PEAK_BF16_FLOPS (e.g. a CPU); None reports null there.
      temperature: the rollouts' sampling temperature. Every log-prob the learner
        computes (policy, recomputed behaviour, reference) divides the logits by it,
        so it is of the distribution the sampler drew from and reported (the JAX
        sampler and vLLM's processed log-probs alike); 1 for plain or greedy sampling.
      top_p, top_k: the support the learner trains, as `SamplingConfig`'s (1 and 0: the
        whole distribution, as verl and TRL train). Set to the rollouts' own, the learner
        trains the distribution they were drawn from: before the first update each
        token's support under the current weights is found (its `support_floor`), the
        behaviour log-probs are recomputed under it, and every update's log-probs
        renormalise over that same support. Trained on the whole distribution instead,
        negative advantages move probability into tokens the sampler never draws
        (docs/results.md section 2).
    """

    loss: str = "dapo"
    loss_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ppo_epochs: int = 1
    num_mini_batches: int = 1
    num_micro_batches: int = 1
    length_bucket: int = 128
    shuffle: bool = True
    recompute_old_logp: bool = True
    max_consecutive_nonfinite: int = 3
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    peak_flops_per_device: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        # Validates the loss name and its settings (raises ValueError naming them).
        losses.make_settings(self.loss, **self.loss_settings)
        for name in ("ppo_epochs", "num_mini_batches", "num_micro_batches", "length_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(
                "train.max_consecutive_nonfinite must be >= 1, got "
                f"{self.max_consecutive_nonfinite}"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"train.temperature must be > 0 (the rollouts' sampling temperature; 1 for "
                f"greedy rollouts), got {self.temperature!r}"
            )
        try:
            _ = self.sampling  # validates top_p and top_k
        except ValueError as e:
            raise ValueError(f"train.top_p / train.top_k: {e}") from None
        if not isinstance(self.optim, OptimConfig):
            raise TypeError(f"train.optim must be an OptimConfig, got {type(self.optim)}")

    @property
    def sampling(self) -> SamplingConfig:
        """The distribution the learner trains, as sampler settings."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss has a KL term to a frozen reference policy."""
        return losses.make_settings(self.loss, **self.loss_settings).kl_coef > 0

    def rows_multiple(self) -> int:
        """The rollout batch size must be a multiple of this."""
        return self.num_mini_batches * self.num_micro_batches


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    """Per-token training data, `[B, T]` aligned with `tokens` (position 0 has mask 0).

    `old_logp` is the behaviour policy's log-prob of each token (from the sampler; it
    is replaced when `recompute_old_logp`). `advantages` is `[B]` or `[B, T]`.
    `ref_logp` is filled by the learner when the loss needs it, and `support_floor` when
    it trains a top-k / top-p distribution (`TrainConfig.top_p`).
    """

    tokens: jax.Array
    mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array | None = None
    guided: jax.Array | None = None
    support_floor: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


def token_logp_and_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token log-prob and entropy, aligned with `tokens` (docs/architecture.md).

    The value at `t` is about token `t` and comes from the logits at `t - 1`;
    position 0 has no prediction and gets 0. Computed in float32.
    """
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    pad = ((0, 0), (1, 0))
    return jnp.pad(logp, pad), jnp.pad(entropy, pad)


def _split_rows(tree: Any, num_chunks: int) -> Any:
    """[B, ...] -> [num_chunks, B / num_chunks, ...], chunk c holding rows c, c + k, ...

    Strided, so each chunk keeps rows from every data shard and stays balanced.
    """
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]).swapaxes(0, 1),
        tree,
    )


def _merge_rows(x: jax.Array) -> jax.Array:
    """Inverse of `_split_rows` for one array."""
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all()


def _constrain_rows(tree: Any) -> Any:
    """Rows over ("data", "fsdp") under the current mesh; a no-op without one."""
    return jax.tree.map(
        lambda x: sharding.shard(x, (sharding.BATCH_AXES,) + (None,) * (x.ndim - 1)), tree
    )


def mini_batch_gradients(
    model: nnx.Module, mini: RolloutBatch, config: TrainConfig, prefix_len: int = 0
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """Gradients of the mini-batch loss w.r.t. the model's `nnx.Param`s, and metrics.

    The first `prefix_len` tokens are shared by every row and carry no loss; they run
    once (ctu.models.shared_prefix), which gives the same loss and gradients.

    The mini-batch is split into `config.num_micro_batches` micro-batches; each one's
    loss is divided by the whole mini-batch's denominator (`losses.loss_normalizer`),
    so the summed micro-batch gradients equal the gradient of the full mini-batch
    loss. Summed metrics (`loss`, counts) add up; the others are token-mean metrics
    of each micro-batch weighted by its share of the valid tokens.
    """
    normalizer = losses.loss_normalizer(config.loss, mini.mask, **config.loss_settings)
    total_tokens = jnp.maximum(jnp.sum(mini.mask.astype(jnp.float32)), 1.0)
    graphdef, params, rest = nnx.split(model, trainable_filter(config.optim), ...)

    def micro_loss(params, micro):
        logp, entropy = shared_prefix_token_logp_and_entropy(
            nnx.merge(graphdef, params, rest),
            micro.tokens,
            prefix_len,
            config.temperature,
            micro.support_floor,
        )
        return losses.policy_loss(
            config.loss,
            logp=logp,
            old_logp=micro.old_logp,
            advantages=micro.advantages,
            mask=micro.mask,
            ref_logp=micro.ref_logp,
            entropy=entropy,
            guided=micro.guided,
            normalizer=normalizer,
            **config.loss_settings,
        )

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(grads, micro):
        micro = _constrain_rows(micro)
        (_, micro_metrics), micro_grads = grad_fn(params, micro)
        grads = jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads)
        weight = jnp.sum(micro.mask.astype(jnp.float32)) / total_tokens
        return grads, (micro_metrics, weight)

    # Accumulate in float32 whatever the parameter dtype.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (micro_metrics, weights) = jax.lax.scan(
        accumulate, zeros, _split_rows(mini, config.num_micro_batches)
    )
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    guided = micro_metrics.get("tokens/guided")  # present with the guided means
    guided_weights = None if guided is None else guided / jnp.maximum(jnp.sum(guided), 1.0)

    def combine(name, values):
        if name in _SUMMED_METRICS:
            return jnp.sum(values)
        return jnp.sum(values * (guided_weights if name in _GUIDED_MEANS else weights))

    step_metrics = {name: combine(name, values) for name, values in micro_metrics.items()}
    return grads, step_metrics


class Learner:
    """Owns the policy, its optimizer and the jitted step functions on one mesh.

    `model` must already be placed on `mesh` (e.g. `ctu.sharding.create_sharded_model`
    or `ctu.models.from_hf(..., mesh=mesh)`) and hold the base weights: when the loss
    has a KL term the reference is copied from it here, so restore a checkpoint into
    `learner.model` / `learner.optimizer` only after construction. The count of
    consecutive non-finite steps is not checkpointed; it restarts at 0 on resume.
    """

    def __init__(self, config: TrainConfig, model: nnx.Module, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.model = model
        self._schedule = learning_rate_schedule(config.optim)
        check_trainable(config.optim, model)
        self.optimizer = sharding.create_sharded_optimizer(
            model, make_optimizer(config.optim), mesh, wrt=trainable_filter(config.optim)
        )
        # The frozen reference is a copy of the initial policy, kept only if needed.
        self.reference: nnx.State | None = None
        if config.needs_reference:
            self.reference = jax.tree.map(jnp.copy, nnx.state(model))
        self._graphdef = nnx.graphdef((self.model, self.optimizer))
        self._model_graphdef = nnx.graphdef(self.model)
        self._state_shardings = jax.tree.map(
            lambda x: x.sharding, nnx.state((self.model, self.optimizer))
        )
        self._step = jax.jit(self._train_step, donate_argnums=0, static_argnums=3)
        self._logp = jax.jit(self._compute_logp, static_argnums=2)
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0

    # ----------------------------------------------------------------------- data

    def shard_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """Places host arrays (this process's rows) on the mesh, rows over (data, fsdp).

        Leaves that are already `jax.Array`s are left as they are.
        """

        def place(x):
            if isinstance(x, jax.Array):
                return x
            x = np.asarray(x)
            spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES, *([None] * (x.ndim - 1)))
            named = jax.sharding.NamedSharding(self.mesh, spec)
            return jax.make_array_from_process_local_data(named, x)

        return jax.tree.map(place, batch)

    # ----------------------------------------------------------------------- jitted

    def _compute_logp(
        self, model_state: nnx.State, tokens: jax.Array, prefix_len: int = 0
    ) -> tuple[jax.Array, jax.Array | None]:
        """Per-token log-probs of `tokens` under `model_state`, micro-batch by micro-batch,
        and the support floors they are under (None: the whole distribution).

        Chunks have the training micro-batch's rows, so the logits fit where training's do.
        """
        model = nnx.merge(self._model_graphdef, model_state)
        chunks = _split_rows(tokens, self.config.rows_multiple())
        sampling = self.config.sampling

        def forward(chunk):
            chunk = _constrain_rows(chunk)
            if sampling.filtered:
                return shared_prefix_sampled_logp(model, chunk, prefix_len, sampling)
            logp, _ = shared_prefix_token_logp_and_entropy(
                model, chunk, prefix_len, sampling.temperature
            )
            return logp, None

        return jax.tree.map(_merge_rows, jax.lax.map(forward, chunks))

    def _train_step(
        self, state: nnx.State, batch: RolloutBatch, rows: jax.Array, prefix_len: int = 0
    ) -> tuple[nnx.State, dict[str, jax.Array]]:
        """One optimizer update on the mini-batch `batch[rows]`; NaN/inf steps are dropped."""
        # merge() may hand `state`'s Variables to the model, which the update mutates:
        # keep the old arrays aside to select them when the step is not finite.
        old_leaves = jax.tree.leaves(state)
        model, optimizer = nnx.merge(self._graphdef, state)
        mini = _constrain_rows(jax.tree.map(lambda x: x[rows], batch))
        grads, step_metrics = mini_batch_gradients(model, mini, self.config, prefix_len)
        finite = _all_finite(grads) & jnp.isfinite(step_metrics["loss"])
        grad_norm = optax.tree.norm(grads)
        # No token with an advantage (or a KL to pay): nothing to learn. Adam would
        # still move along its momentum and decay the weights; leave the state as it is.
        zero = finite & (grad_norm == 0)
        step_metrics["grad_norm"] = grad_norm
        step_metrics["learning_rate"] = self._schedule(optimizer.step[...])
        step_metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        step_metrics["zero_gradient"] = zero.astype(jnp.float32)
        optimizer.update(model, grads)
        new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
        applied = finite & ~zero
        new_state = jax.tree.unflatten(treedef, _select(applied, new_leaves, old_leaves))
        return jax.lax.with_sharding_constraint(new_state, self._state_shardings), step_metrics

    # ----------------------------------------------------------------------- public

    def compute_logp(
        self, tokens: jax.Array, *, reference: bool = False, prefix_len: int = 0
    ) -> tuple[jax.Array, jax.Array | None]:
        """Per-token log-probs `[B, T]` of sharded `tokens` under the policy (or reference)
        and the support floors they were taken under (None for the whole distribution)."""
        if reference and self.reference is None:
            raise ValueError(f"loss {self.config.loss!r} has no KL term, so there is no reference")
        model_state = self.reference if reference else nnx.state(self.model)
        with jax.set_mesh(self.mesh):
            return self._logp(model_state, tokens, prefix_len)

    def prepare(self, batch: RolloutBatch, prefix_len: int = 0) -> RolloutBatch:
        """Fills `old_logp` (if recomputed), `support_floor` (if the learner trains a
        top-k / top-p distribution) and `ref_logp` (if the loss needs it).

        Rows marked `guided` keep the sampler's `old_logp`: they were sampled under
        another context (the prompt with the critique), which only the sampler saw. The
        reference's log-probs are under its own top-k / top-p support.
        """
        self._check_batch(batch)
        if self.config.recompute_old_logp or self.config.sampling.filtered:
            old_logp, floor = self.compute_logp(batch.tokens, prefix_len=prefix_len)
            if not self.config.recompute_old_logp:
                old_logp = batch.old_logp
            elif batch.guided is not None:
                guided = batch.guided if batch.guided.ndim == 2 else batch.guided[:, None]
                old_logp = jnp.where(guided, batch.old_logp, old_logp)
            batch = dataclasses.replace(batch, old_logp=old_logp, support_floor=floor)
        if self.reference is not None:
            ref_logp, _ = self.compute_logp(batch.tokens, reference=True, prefix_len=prefix_len)
            batch = dataclasses.replace(batch, ref_logp=ref_logp)
        return batch

    def train_step(
        self, batch: RolloutBatch, rows: jax.Array, prefix_len: int = 0
    ) -> dict[str, jax.Array]:
        """One optimizer update on rows `rows` of a prepared batch; device metrics."""
        state = nnx.state((self.model, self.optimizer))
        with jax.set_mesh(self.mesh):
            new_state, step_metrics = self._step(state, batch, rows, prefix_len)
        nnx.update((self.model, self.optimizer), new_state)
        return step_metrics

    def update(
        self, batch: RolloutBatch, rng: jax.Array, *, prefix_len: int | None = None
    ) -> dict[str, float | None]:
        """All the updates of one rollout batch: `ppo_epochs` x `num_mini_batches`.

        `batch` holds host arrays (this process's rows) or arrays already on the mesh.
        `prefix_len`: how many leading tokens every row shares (and carries no loss
        on); they run once per forward. None measures it from host arrays on a single
        process, else 0 (on several hosts each sees only its rows: pass it explicitly).

        Returns host metrics averaged over the updates, plus `nonfinite` (updates
        skipped for a NaN/inf) and `zero_gradient` (updates skipped for a gradient of
        exactly zero: no token with an advantage), `timing_s/update`, `perf/tokens_per_s` and `perf/mfu`.
        Raises NonFiniteError after `max_consecutive_nonfinite` skipped steps in a row.
        """
        config = self.config
        start = time.perf_counter()
        if prefix_len is None:
            on_host = isinstance(batch.tokens, np.ndarray) and jax.process_count() == 1
            prefix_len = common_prefix_length(batch.tokens, batch.mask) if on_host else 0
        batch = self.prepare(self.shard_batch(batch), prefix_len)
        rows_per_mini = batch.batch_size // config.num_mini_batches
        step_metrics = []
        for epoch_key in jax.random.split(rng, config.ppo_epochs):
            order = np.arange(batch.batch_size)
            if config.shuffle:
                order = np.asarray(jax.random.permutation(epoch_key, batch.batch_size))
            for mini in range(config.num_mini_batches):
                rows = order[mini * rows_per_mini : (mini + 1) * rows_per_mini]
                rows = jnp.asarray(rows, jnp.int32)
                step_metrics.append(self.train_step(batch, rows, prefix_len))
        step_metrics = jax.device_get(step_metrics)
        elapsed = time.perf_counter() - start

        for row in step_metrics:
            if row["nonfinite"]:
                self.consecutive_nonfinite += 1
                self.total_nonfinite += 1
                logging.warning(
                    "skipped an optimizer step with a NaN/inf loss or gradient "
                    "(%d in a row, %d in total)",
                    self.consecutive_nonfinite,
                    self.total_nonfinite,
                )
            else:
                self.consecutive_nonfinite = 0
            if self.consecutive_nonfinite >= config.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.consecutive_nonfinite} optimizer steps in a row had a NaN/inf loss "
                    "or gradient and were skipped; stopping with the last good checkpoint "
                    "intact. Lower optim.learning_rate or inspect the batch."
                )
        finite_rows = [row for row in step_metrics if not row["nonfinite"]] or step_metrics
        counts = ("nonfinite", "zero_gradient", "tokens/valid", "sequences/valid", "tokens/guided")
        guided = np.array([row.get("tokens/guided", 0.0) for row in finite_rows])

        def mean(name):
            values = [row[name] for row in finite_rows]
            if name in _GUIDED_MEANS:  # over guided tokens: weigh steps by theirs
                return float(np.dot(values, guided) / max(guided.sum(), 1.0))
            return float(np.mean(values))

        result: dict[str, float | None] = {
            name: mean(name) for name in finite_rows[0] if name not in counts
        }
        result["nonfinite"] = float(sum(row["nonfinite"] for row in step_metrics))
        result["zero_gradient"] = float(sum(row["zero_gradient"] for row in step_metrics))
        tokens = batch.tokens.size * config.ppo_epochs
        result["timing_s/update"] = elapsed
        result["perf/tokens_per_s"] = tokens / elapsed
        result["batch/shared_prefix_tokens"] = float(prefix_len)
        result["perf/mfu"] = self._mfu(tokens / elapsed, batch.tokens.shape[1])
        return result

    # ----------------------------------------------------------------------- helpers

    def _check_batch(self, batch: RolloutBatch) -> None:
        multiple = self.config.rows_multiple()
        if batch.batch_size % multiple:
            raise ValueError(
                f"rollout batch of {batch.batch_size} rows is not a multiple of "
                f"num_mini_batches x num_micro_batches = {multiple}"
            )
        if batch.tokens.shape != batch.mask.shape or batch.tokens.shape != batch.old_logp.shape:
            raise ValueError(
                f"tokens {batch.tokens.shape}, mask {batch.mask.shape} and old_logp "
                f"{batch.old_logp.shape} must all be [B, T]"
            )

    def _mfu(self, tokens_per_s: float, seq_len: int) -> float | None:
        model_config = getattr(self.model, "config", None)
        if model_config is None:
            return None
        flops = ctu_metrics.train_flops_per_token(
            num_params=model_config.num_params(),
            num_layers=model_config.num_layers,
            num_heads=model_config.num_heads,
            head_dim=model_config.head_dim,
            seq_len=seq_len,
        )
        peak = ctu_metrics.peak_flops_per_device(
            self.mesh.devices.flat[0], override=self.config.peak_flops_per_device
        )
        return ctu_metrics.mfu(
            tokens_per_s=tokens_per_s,
            flops_per_token=flops,
            num_devices=self.mesh.devices.size,
            peak_flops=peak,
        )
