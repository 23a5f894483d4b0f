"""Clipped policy-gradient losses (DAPO, GRPO, Dr. GRPO), registered by name.

Array conventions (docs/architecture.md, RL section): per-token arrays are
`[batch, length]`, aligned with the tokens; `mask` is 1 only on tokens the
policy produced. `advantages` are per sequence `[batch]` (broadcast over tokens)
or per token `[batch, length]`.

All three losses share one per-token objective and differ in how they average
it. With the importance ratio r_{i,t} = pi_theta(o_{i,t}) / pi_old(o_{i,t}) =
exp(logp - old_logp), advantage A_{i,t} and, when `kl_coef` > 0, the k3
estimator of KL(pi_theta || pi_ref) (DeepSeekMath eq. 4),

    k3_{i,t} = exp(ref_logp - logp) - (ref_logp - logp) - 1,

the per-token loss is

    l_{i,t} = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + kl_coef * k3_{i,t}

and with dual-clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games")
negative advantages are further bounded: for A < 0 the objective is
max(min(r A, clip(r) A), c A), i.e. the loss never exceeds -c A.

Feedback-guided rollouts trained under the original prompt (SPEC, "Feedback-
guided DAPO") are selected by the `guided` argument ([batch] or [batch, length]
bool). Their behaviour log-probs came from the prompt with the critique, their
trained log-probs from the plain prompt, so old_logp/logp is already the
importance ratio pi_theta(y|x) / pi_old(y|x+critique); the loss sees only
logp and old_logp. Setting `guided_objective`:
  * "clip": guided tokens use the clipped objective above, with the same
    eps_low / eps_high (and dual-clip) as every other token. The loss is then the
    same as without `guided`; only the `guided/*` metrics are added.
  * "shaped": policy shaping (LUFFY, arXiv 2504.14945, sec. 3; Critique-GRPO):
    guided tokens use f(r) A with f(r) = r / (r + gamma) and NO clipping, the
    regularised importance sampling that keeps gradients alive for tokens the
    critique made likely (f'(r) = gamma / (r + gamma)^2 favours low-r tokens).
    `shaped_ratio="importance"` (default) shapes r = pi_theta / pi_old, which we
    can compute because the behaviour log-probs are known; `"policy"` shapes
    pi_theta itself, LUFFY's choice of pi_phi = 1 for off-policy traces. The KL
    term, if any, applies to guided tokens unchanged.

Gradient accumulation: every loss is `numerator / denominator` where the
numerator is a sum over rows (sequences). Pass `normalizer=loss_normalizer(
name, full_mask, ...)` computed on the whole mini-batch to each micro-batch
(split along the batch axis) and the micro-batch losses sum exactly to the
full-batch loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

Array = jax.Array

GUIDED_OBJECTIVES = ("clip", "shaped")
SHAPED_RATIOS = ("importance", "policy")


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """Settings shared by the clipped losses (defaults: DAPO).

    eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high].
    dual_clip: c > 1 bounds the loss of negative-advantage tokens at -c A; None = off.
    kl_coef: beta of the k3 KL to the reference; > 0 requires `ref_logp`.
    guided_objective: "clip" or "shaped", for tokens selected by `guided`.
    shaping_gamma: gamma of f(r) = r / (r + gamma) ("shaped" only).
    shaped_ratio: "importance" (pi_theta / pi_old) or "policy" (pi_theta).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    kl_coef: float = 0.0
    guided_objective: str = "clip"
    shaping_gamma: float = 0.1
    shaped_ratio: str = "importance"

    def __post_init__(self):
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}.")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}.")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {self.dual_clip}.")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}.")
        if self.guided_objective not in GUIDED_OBJECTIVES:
            raise ValueError(
                f"guided_objective must be one of {GUIDED_OBJECTIVES}, "
                f"got {self.guided_objective!r}."
            )
        if self.shaping_gamma <= 0.0:
            raise ValueError(f"shaping_gamma must be > 0 (e.g. 0.1), got {self.shaping_gamma}.")
        if self.shaped_ratio not in SHAPED_RATIOS:
            raise ValueError(
                f"shaped_ratio must be one of {SHAPED_RATIOS}, got {self.shaped_ratio!r}."
            )


@dataclasses.dataclass(frozen=True)
class DapoSettings(ClipSettings):
    """DAPO (arXiv 2503.14476): clip-higher 0.2 / 0.28, no KL."""


@dataclasses.dataclass(frozen=True)
class GrpoSettings(ClipSettings):
    """GRPO (DeepSeekMath, arXiv 2402.03300): symmetric clip 0.2, k3 KL with beta 0.04."""

    eps_high: float = 0.2
    kl_coef: float = 0.04


@dataclasses.dataclass(frozen=True)
class DrGrpoSettings(ClipSettings):
    """Dr. GRPO (arXiv 2503.20783): symmetric clip 0.2, no KL, constant length normaliser.

    max_length: the generation budget each sequence's token sum is divided by;
    None uses the static length of the arrays (`logp.shape[1]`).
    """

    eps_high: float = 0.2
    max_length: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be a positive token count, got {self.max_length}.")


# ----------------------------------------------------------------------------- registry

# An aggregator maps (token_loss [B, T], mask [B, T] float, settings) to
# (numerator, denominator); the loss is numerator / denominator and the
# numerator is a sum over rows, so it adds up across micro-batches.
Aggregator = Callable[[Array, Array, Any], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    aggregate: Aggregator
    settings_cls: type


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, settings_cls: type) -> Callable[[Aggregator], Aggregator]:
    """Registers an aggregator under `name` with its settings dataclass."""

    def decorator(fn: Aggregator) -> Aggregator:
        if name in _LOSSES:
            raise ValueError(f"Loss {name!r} is already registered.")
        _LOSSES[name] = LossSpec(aggregate=fn, settings_cls=settings_cls)
        return fn

    return decorator


def available_losses() -> tuple[str, ...]:
    return tuple(sorted(_LOSSES))


def make_settings(name: str, **settings) -> ClipSettings:
    """Validated settings of loss `name`; unknown names or settings raise ValueError."""
    if name not in _LOSSES:
        raise ValueError(f"Unknown policy loss {name!r}; valid losses: {available_losses()}.")
    cls = _LOSSES[name].settings_cls
    valid = tuple(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {unknown} for loss {name!r}; valid settings: {valid}."
        )
    return cls(**settings)


@register_loss("dapo", DapoSettings)
def dapo_aggregate(token_loss: Array, mask: Array, settings: DapoSettings):
    """Token-mean over all response tokens of the batch (DAPO sec. 3.3).

    L = sum_i sum_t l_{i,t} m_{i,t} / sum_i sum_t m_{i,t}
    """
    del settings
    return jnp.sum(token_loss * mask), jnp.sum(mask)


@register_loss("grpo", GrpoSettings)
def grpo_aggregate(token_loss: Array, mask: Array, settings: GrpoSettings):
    """Per-sequence mean, then mean over sequences (DeepSeekMath eq. 3).

        L = 1/G sum_i 1/|o_i| sum_t l_{i,t} m_{i,t},  |o_i| = sum_t m_{i,t}

    G counts sequences with at least one valid token: all-masked rows (padding)
    contribute nothing and are not counted.
    """
    del settings
    lengths = jnp.sum(mask, axis=1)
    per_sequence = jnp.sum(token_loss * mask, axis=1) / jnp.maximum(lengths, 1.0)
    return jnp.sum(per_sequence), jnp.sum(lengths > 0).astype(token_loss.dtype)


@register_loss("dr_grpo", DrGrpoSettings)
def dr_grpo_aggregate(token_loss: Array, mask: Array, settings: DrGrpoSettings):
    """Token sum over a constant generation budget, mean over sequences (Dr. GRPO, arXiv 2503.20783).

        L = 1/G sum_i 1/L_max sum_t l_{i,t} m_{i,t}

    L_max = `max_length` (default: the array length); G counts sequences with at
    least one valid token.
    """
    max_length = token_loss.shape[1] if settings.max_length is None else settings.max_length
    num_sequences = jnp.sum(jnp.sum(mask, axis=1) > 0).astype(token_loss.dtype)
    return jnp.sum(token_loss * mask), num_sequences * max_length


# ----------------------------------------------------------------------------- per token


def k3_kl(logp: Array, ref_logp: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020).

    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1  >= 0
    """
    return _k3(ref_logp - logp)


def _k3(log_ratio: Array) -> Array:
    return jnp.exp(log_ratio) - log_ratio - 1.0


def clipped_objective(
    ratio: Array, advantages: Array, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Array, dict[str, Array]]:
    """Per-token PPO objective with clip-higher and optional dual-clip (to maximise).

        J = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
        J = max(J, c A)  for A < 0 when dual_clip = c

    Returns J and boolean indicators of where each clip is active, i.e. where the
    clipped branch is selected and the gradient w.r.t. r is zero:
      high: A > 0 and r > 1 + eps_high;  low: A < 0 and r < 1 - eps_low;
      dual: A < 0 and r > c.
    """
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    objective = jnp.minimum(unclipped, clipped)
    active = {
        "high": (advantages > 0) & (ratio > 1.0 + eps_high),
        "low": (advantages < 0) & (ratio < 1.0 - eps_low),
    }
    if dual_clip is not None:
        negative = advantages < 0
        objective = jnp.where(negative, jnp.maximum(objective, dual_clip * advantages), objective)
        active["dual"] = negative & (ratio > dual_clip)
    return objective, active


def shaped_objective(ratio: Array, advantages: Array, gamma: float) -> Array:
    """LUFFY policy shaping, no clip (to maximise): J = f(r) A, f(r) = r / (r + gamma)."""
    return ratio / (ratio + gamma) * advantages


# ----------------------------------------------------------------------------- entry points


def _masked_mean(x: Array, mask: Array) -> Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, entropy, guided) -> None:
    chex.assert_rank(logp, 2)
    chex.assert_type([logp, old_logp], float)
    chex.assert_equal_shape([logp, old_logp, mask])
    chex.assert_rank(advantages, {1, 2})
    if advantages.ndim == 1:
        chex.assert_axis_dimension(advantages, 0, logp.shape[0])
    else:
        chex.assert_equal_shape([advantages, logp])
    for extra in (ref_logp, entropy):
        if extra is not None:
            chex.assert_equal_shape([extra, logp])
    if guided is not None:
        chex.assert_rank(guided, {1, 2})
        chex.assert_equal_shape_prefix([guided, logp], guided.ndim)


def loss_normalizer(name: str, mask: Array, **settings) -> Array:
    """The denominator of loss `name` for `mask`: valid tokens for "dapo", valid
    sequences for "grpo", valid sequences x max_length for "dr_grpo".

    Compute it on the whole mini-batch and pass it as `normalizer` to every
    micro-batch's `policy_loss` so that the micro-batch losses sum to the
    mini-batch loss.
    """
    spec_settings = make_settings(name, **settings)
    chex.assert_rank(mask, 2)
    mask = jnp.asarray(mask, jnp.float32)
    return _LOSSES[name].aggregate(jnp.zeros_like(mask), mask, spec_settings)[1]


def policy_loss(
    name: str,
    *,
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    ref_logp: Array | None = None,
    entropy: Array | None = None,
    guided: Array | None = None,
    normalizer: Array | float | None = None,
    **settings,
) -> tuple[Array, dict[str, Array]]:
    """Policy loss `name` ("dapo" | "grpo" | "dr_grpo") and its metrics.

    Args:
      logp, old_logp: [B, T] log-probs of the sampled tokens under the policy
        being trained and under the behaviour policy (no gradient flows to it).
      advantages: [B] or [B, T]; no gradient flows to them.
      mask: [B, T], 1 on policy-produced tokens (bool, int or float).
      ref_logp: [B, T] reference log-probs; required when kl_coef > 0.
      entropy: [B, T] per-token policy entropy, for the `entropy` metric only.
      guided: [B] or [B, T] bool, feedback-guided tokens trained under the
        original prompt (see module docstring and `guided_objective`).
      normalizer: the loss denominator to use instead of this batch's own (see
        `loss_normalizer`), for exact gradient accumulation.
      **settings: fields of the loss's settings dataclass (`make_settings`).

    Returns:
      (loss, metrics). Metrics are means over this batch's valid tokens:
      `clip_ratio/high` and `clip_ratio/low` (fraction of valid tokens where the
      high / low clip is active: A > 0 and r > 1 + eps_high / A < 0 and
      r < 1 - eps_low; shaped guided tokens are never clipped), `clip_ratio/dual`
      (A < 0 and r > c; only with dual_clip), `approx_kl_old` (k3 estimate of
      KL(pi_old || pi_theta): exp(logp - old_logp) - (logp - old_logp) - 1; on
      guided tokens it also measures the shift from the critique context),
      `kl` (k3 to the reference; only with ref_logp), `entropy` (only with
      entropy), `ratio/mean`, `tokens/valid`, `sequences/valid`, and with
      `guided`: `tokens/guided` (valid guided tokens), `guided/frac_tokens`,
      `guided/ratio_mean`, `guided/clip_ratio/high`, `guided/clip_ratio/low`
      (fractions of valid guided tokens).
    """
    config = make_settings(name, **settings)
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, entropy, guided)
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(
            f"Loss {name!r} with kl_coef={config.kl_coef} needs ref_logp; pass the reference "
            "model's log-probs or set kl_coef=0.0."
        )
    # The loss is computed in float32 whatever the model's dtype (bf16 ratios are too coarse
    # to tell 1.28 from 1.29).
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    if ref_logp is not None:
        ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
    mask = jnp.asarray(mask, jnp.float32)
    valid = mask > 0
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if advantages.ndim == 1:
        advantages = jnp.broadcast_to(advantages[:, None], logp.shape)

    # Padding may hold -inf log-probs: zero them before exp so that neither the
    # loss nor its gradient sees inf or NaN.
    log_ratio = jnp.where(valid, logp - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    objective, active = clipped_objective(
        ratio, advantages, config.eps_low, config.eps_high, config.dual_clip
    )

    guided_tokens = jnp.zeros_like(valid)
    if guided is not None:
        per_token = guided if guided.ndim == 2 else guided[:, None]
        guided_tokens = jnp.broadcast_to(per_token, logp.shape).astype(bool) & valid
    if guided is not None and config.guided_objective == "shaped":
        if config.shaped_ratio == "importance":
            shaped_input = ratio
        else:
            shaped_input = jnp.exp(jnp.where(valid, logp, 0.0))
        shaped = shaped_objective(shaped_input, advantages, config.shaping_gamma)
        objective = jnp.where(guided_tokens, shaped, objective)
        active = {key: value & ~guided_tokens for key, value in active.items()}

    token_loss = -objective
    metrics = {}
    if ref_logp is not None:
        kl = _k3(jnp.where(valid, ref_logp - logp, 0.0))
        token_loss = token_loss + config.kl_coef * kl
        metrics["kl"] = _masked_mean(kl, mask)

    numerator, denominator = _LOSSES[name].aggregate(token_loss, mask, config)
    if normalizer is not None:
        denominator = jnp.asarray(normalizer, numerator.dtype)
    loss = jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)

    for key, value in active.items():
        metrics[f"clip_ratio/{key}"] = _masked_mean(value, mask)
    metrics["approx_kl_old"] = _masked_mean(_k3(log_ratio), mask)
    metrics["ratio/mean"] = _masked_mean(ratio, mask)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask)
    metrics["tokens/valid"] = jnp.sum(mask)
    metrics["sequences/valid"] = jnp.sum(jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
    if guided is not None:
        guided_mask = guided_tokens.astype(jnp.float32)
        unshaped = clipped_objective(ratio, advantages, config.eps_low, config.eps_high, None)[1]
        metrics["tokens/guided"] = jnp.sum(guided_mask)
        metrics["guided/frac_tokens"] = _masked_mean(guided_mask, mask)
        metrics["guided/ratio_mean"] = _masked_mean(ratio, guided_mask)
        # Where the clip would be (clip) or would have been (shaped) active.
        metrics["guided/clip_ratio/high"] = _masked_mean(unshaped["high"], guided_mask)
        metrics["guided/clip_ratio/low"] = _masked_mean(unshaped["low"], guided_mask)
    metrics["loss"] = loss
    return loss, metrics
