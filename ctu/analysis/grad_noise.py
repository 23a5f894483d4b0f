"""How much of an RL update's gradient is signal: the gradient noise scale at a policy.

An update's gradient averages the gradients of its groups (DAPO's token mean weighs each
group by its tokens; here each group counts once). From N independent groups' gradients
g_i, the unbiased estimates of the simple noise scale (McCandlish et al., 2018, "An
Empirical Model of Large-Batch Training") are

    tr(Sigma) = sum_i |g_i - mean|^2 / (N - 1)   the spread of one group's gradient
    |G|^2     = |mean|^2 - tr(Sigma) / N         the true gradient's squared norm
    B_noise   = tr(Sigma) / |G|^2                groups per update at which the
                                                 gradient's noise equals its signal.

A gradient over B groups has squared norm |G|^2 + tr(Sigma) / B in expectation, so its
cosine with the true gradient is about 1 / sqrt(1 + B_noise / B), and two such gradients
from disjoint groups have a cosine of about 1 / (1 + B_noise / B) with each other;
an SGD step at its best learning rate gains 1 / (1 + B_noise / B) of what a noise-free
step would. `measure` samples groups with the run's own rollout settings, keeps those
whose rewards differ (as dynamic sampling does; the others have no gradient), and
reports these quantities with a jackknife interval over groups.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctu import train
from ctu.analysis import policy_loading
from ctu.models import from_hf
from ctu.models.shared_prefix import common_prefix_length
from ctu.rl import batching, credit, train_step
from ctu.rl.dynamic_sampling import has_signal
from ctu.rollout.records import TURN_KINDS
from ctu.sft import WARM_START_DIR

# Every group's gradient is held in host memory (float32) until the end; above this the
# measurement refuses to start rather than swap. A 0.6B model allows ~6 groups.
MAX_GRADIENT_BYTES = 16 * 2**30


def _signal_and_trace(gram: np.ndarray) -> tuple[float, float]:
    """Unbiased |G|^2 and tr(Sigma) from the Gram matrix of N per-unit gradients."""
    n = len(gram)
    mean_sq = gram.sum() / n**2  # |mean|^2
    trace = (np.trace(gram) - n * mean_sq) / (n - 1)  # sum |g_i - mean|^2 / (n - 1)
    return float(mean_sq - trace / n), float(trace)


def noise_scale(grads: np.ndarray) -> dict[str, float]:
    """Unbiased |G|^2 and tr(Sigma) from `[N, P]` independent per-unit gradients, and
    B_noise = tr(Sigma) / |G|^2 (inf when the signal estimate is not positive)."""
    grads = np.asarray(grads, np.float64)
    if grads.shape[0] < 2:
        raise ValueError(f"the noise scale needs at least 2 gradients, got {grads.shape[0]}")
    signal, trace = _signal_and_trace(grads @ grads.T)
    return {
        "signal_sq_norm": signal,
        "noise_trace": trace,
        "b_noise": trace / signal if signal > 0 else float("inf"),
    }


def jackknife_b_noise(grads: np.ndarray, *, z: float = 1.645) -> list[float]:
    """An interval of B_noise (90% by default): a normal interval rho_hat +- z * se for
    rho = |G|^2 / tr(Sigma), with the jackknife's standard error, inverted (inf where
    rho may be 0 or below).

    Not a bootstrap: a resample repeats gradients, which adds about tr(Sigma) / N to its
    |mean|^2, far more than |G|^2 itself when noise dominates, so resampled estimates
    sit nowhere near the estimate they should spread around. Leaving one out keeps
    every estimate unbiased.
    """
    grads = np.asarray(grads, np.float64)
    n = grads.shape[0]
    if n < 3:
        raise ValueError(f"the jackknife needs at least 3 gradients, got {n}")
    gram = grads @ grads.T  # every statistic below is a function of the Gram matrix

    def rho(g):
        signal, trace = _signal_and_trace(g)
        return signal / trace

    estimate = rho(gram)
    keep = ~np.eye(n, dtype=bool)
    leave_one_out = np.array([rho(gram[np.ix_(keep[i], keep[i])]) for i in range(n)])
    se = np.sqrt((n - 1) / n * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    rho_low, rho_high = estimate - z * se, estimate + z * se
    return [
        float(1 / rho_high) if rho_high > 0 else float("inf"),
        float(1 / rho_low) if rho_low > 0 else float("inf"),
    ]


def disjoint_batch_cosines(grads: np.ndarray, batch: int) -> list[float]:
    """Cosines between the mean gradients of disjoint batches of `batch` consecutive
    units: a direct reading of how much two updates agree."""
    grads = np.asarray(grads, np.float64)
    means = [grads[i : i + batch].mean(0) for i in range(0, len(grads) - batch + 1, batch)]
    out = []
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            a, b = means[i], means[j]
            out.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return out


def group_gradient_fn(learner: train_step.Learner, settings, pad_id: int) -> Callable:
    """(group, kind=None) -> the flat gradient of a group's DAPO loss, computed as the
    learner's update computes it (the behaviour log-probs recomputed first); with
    `kind` (a `RolloutRecord.turn_kinds` value), the part of it that the turns of that
    kind contribute (the other kinds weighted 0 through `algorithm.turn_weights`, the
    token mean unchanged), so the parts of all kinds add up to the whole."""
    config = learner.config

    def settings_of(kind: str | None):
        if kind is None:
            return settings.algorithm
        weights = {k: w if k == kind else 0.0 for k, w in settings.algorithm.turn_weights.items()}
        return dataclasses.replace(settings.algorithm, turn_weights=weights)

    @nnx.jit(static_argnums=2)
    def flat(model, batch, prefix_len):
        grads, _ = train_step.mini_batch_gradients(model, batch, config, prefix_len)
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    def gradient(group, kind: str | None = None) -> np.ndarray:
        batch, _ = batching.build_batch(
            [group],
            settings=settings_of(kind),
            rows_multiple=1,
            pad_id=pad_id,
            length_multiple=settings.train.length_bucket,
        )
        prefix_len = common_prefix_length(batch.tokens, batch.mask)
        prepared = learner.prepare(learner.shard_batch(batch), prefix_len)
        with jax.set_mesh(learner.mesh):
            return np.asarray(flat(learner.model, prepared, prefix_len))

    return gradient


def kind_shares(total: np.ndarray, parts: dict[str, np.ndarray]) -> dict[str, dict]:
    """How the signal |G|^2 and the noise tr(Sigma) of `[N, P]` per-group gradients
    split over parts that add up to them (`parts[kind]`, `[N, P]` each): a part's
    share of the signal is <G_kind, G> / |G|^2 and of the noise tr Cov(g_kind, g) /
    tr(Sigma), both estimated without bias, so each set of shares sums to 1. A part
    with a large share of the noise and a small one of the signal is what an update
    would be better without."""
    total = np.asarray(total, np.float64)
    signal, trace = _signal_and_trace(total @ total.T)
    out = {}
    for kind, part in parts.items():
        part = np.asarray(part, np.float64)
        cross_signal, cross_trace = _signal_and_trace(part @ total.T)
        own = noise_scale(part)
        out[kind] = {
            "signal_share": cross_signal / signal,
            "noise_share": cross_trace / trace,
            "signal_sq_norm": own["signal_sq_norm"],
            "noise_trace": own["noise_trace"],
            "b_noise": own["b_noise"],
        }
    return out


def load_run_policy(s: train.Setup, step: int | None):
    """The run's warm start (`step=None`) or its checkpoint at `step`."""
    workdir, model_settings = s.workdir, s.settings.model
    if step is None:
        path = os.path.join(workdir, WARM_START_DIR)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"no warm start at {path}; run `python -m launch.sft` or `launch.train` on "
                f"{workdir} first, or pass --step for a checkpoint"
            )
        dtypes = {"dtype": model_settings["dtype"], "param_dtype": model_settings["param_dtype"]}
        model, _ = from_hf(path, mesh=s.mesh, **dtypes)
        return model
    directory = os.path.join(os.path.abspath(workdir), train.CHECKPOINT_DIR)
    steps = policy_loading.checkpoint_steps(workdir)
    if step not in steps:
        raise FileNotFoundError(
            f"{workdir} has no checkpoint for step {step}; available: {steps or 'none'} "
            "(leave --step out for the warm start)"
        )
    return policy_loading.restore_model(directory, s.model_config, s.mesh, step)


def override_config(config, overrides: Sequence[str]):
    """`config` with each "KEY=VALUE" set (KEY dotted, e.g. algorithm.credit; VALUE read
    as JSON when it parses, else as a string). An unknown key or a value of the wrong
    type is a ValueError."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: write KEY=VALUE, e.g. algorithm.credit=progress")
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "get") or leaf not in node:
            raise ValueError(f"override {item!r}: the run's config has no key {key!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"override {item!r}: {error}") from None
    return config


def measure(
    workdir: str,
    *,
    step: int | None = None,
    num_groups: int = 32,
    seed: int = 0,
    overrides: Sequence[str] = (),
    by_turn: bool = False,
    log=print,
) -> dict:
    """The noise scale of the run's RL gradient at its warm start or a checkpoint, from
    `num_groups` groups with reward signal on train tasks (sampled as the run samples),
    under the run's config with `overrides` ("KEY=VALUE") applied; `by_turn` adds how
    signal and noise split over the kinds of turn (`kind_shares`)."""
    if num_groups < 3:
        raise ValueError(
            f"num_groups={num_groups}: need at least 3 (the jackknife interval leaves one "
            "group out of at least two)"
        )
    config = override_config(policy_loading.read_run_config(workdir), overrides)
    s = train.setup(config, workdir)
    settings = s.settings
    copies = 1 + len(TURN_KINDS) if by_turn else 1
    gradient_bytes = copies * num_groups * s.model_config.num_params() * 4
    if gradient_bytes > MAX_GRADIENT_BYTES:
        raise ValueError(
            f"{num_groups} groups' gradients of {s.model_config.num_params():,} parameters "
            f"({copies} per group{' with by_turn' if by_turn else ''}) take "
            f"{gradient_bytes / 2**30:.0f} GiB of memory (the limit is "
            f"{MAX_GRADIENT_BYTES / 2**30:.0f} GiB); measure fewer groups"
        )
    model = load_run_policy(s, step)
    learner = train_step.Learner(settings.train, model, s.mesh)
    engine, _ = train.rollout_engines(s, learner.model)
    train_ids = [t.task_id for t in s.world.split("train")]
    sample_seed = settings.seed + 1000 + seed  # a task order and rollouts not the run's
    stream = train.task_stream(train_ids, sample_seed, 0)
    sampler = train.GroupSampler(s, engine, stream, jax.random.key(seed), seed=sample_seed)
    per_round = settings.rollout.tasks_per_step
    kept, sampled = [], []
    while len(kept) < num_groups and len(sampled) < 8 * num_groups:
        groups = sampler(per_round)
        sampled += groups
        kept += [
            g
            for g in groups
            if has_signal(batching.trained_rewards(g, reward=settings.algorithm.reward))
        ]
        log(f"groups sampled {len(sampled)}, with signal {len(kept)}")
    if len(kept) < 3:
        raise RuntimeError(
            f"only {len(kept)} of {len(sampled)} groups had rewards that differ: the policy "
            "fails (or succeeds) on nearly every rollout, so there is no gradient to measure"
        )
    if len(kept) < num_groups:
        log(f"measuring {len(kept)} groups with signal, of {len(sampled)} sampled")
    kept = kept[:num_groups]
    gradient = group_gradient_fn(learner, settings, s.tokenizer.pad_token_id)
    grads = np.stack([gradient(g) for g in kept])
    if not np.any(grads):
        raise RuntimeError(
            f"every measured group's gradient is zero under these settings ({list(overrides)}):"
            " nothing would be trained (algorithm.turn_weights weighting every sampled turn 0?)"
        )
    scale = noise_scale(grads)
    by_kind = {}
    if by_turn:
        kept_records = [r for g in kept for r in g]
        kinds = [k for k in TURN_KINDS if any(k in r.turn_kinds() for r in kept_records)]
        parts = {k: np.stack([gradient(g, k) for g in kept]) for k in kinds}
        by_kind = kind_shares(grads, parts)
        tokens = {k: 0 for k in kinds}
        for r in kept_records:
            for (start, end), kind in zip(
                credit.turn_spans(r.loss_mask), r.turn_kinds(), strict=True
            ):
                tokens[kind] += end - start
        for k in kinds:
            by_kind[k]["token_share"] = tokens[k] / sum(tokens.values())
    b = per_round
    records = [r for g in sampled for r in g]
    b_noise = scale["b_noise"]
    return {
        "workdir": workdir,
        "policy": "warm_start" if step is None else f"checkpoint {step}",
        "overrides": list(overrides),
        "groups_sampled": len(sampled),
        "groups_with_signal": len(kept),
        "success_rate": float(np.mean([r.success for r in records])),
        "reward_mean": float(np.mean([r.reward for r in records])),
        "num_params": int(grads.shape[1]),
        "group_grad_norm_mean": float(np.linalg.norm(grads, axis=1).mean()),
        **scale,
        "b_noise_interval_90": jackknife_b_noise(grads),
        "groups_per_update": b,
        "expected_cosine_to_true_gradient": float(1 / np.sqrt(1 + b_noise / b)),
        "expected_cosine_between_updates": float(1 / (1 + b_noise / b)),
        "disjoint_update_cosines": disjoint_batch_cosines(grads, b),
        # What the run's updates add up to, in noise-free SGD steps at the best step size.
        "run_noise_free_steps": float(settings.total_steps * b / (b + b_noise)),
        **({"by_turn_kind": by_kind} if by_turn else {}),
    }
