"""The rollout engine interface the learner depends on, and the in-process JAX engine.

An engine samples token ids; it knows nothing of text, tools or rewards. The learner
pushes new weights with `update_weights(model)` after each RL step, and the runner
(ctu/rollout/runner.py) opens one `EngineSession` per wave of episodes:

    engine = JaxEngine(model, SamplingConfig(max_new_tokens=256, stop_token_ids=(eot,)))
    session = engine.session(batch_size=64, max_len=4096)
    out = session.generate(prompts, rng)          # first turn of every row
    out = session.generate(tool_turns, rng2)      # only the new tokens; None = row is done

`generate` returns a `ctu.sampling.Generation` (per row: sampled ids, their log-probs
under the sampling distribution, and the stop reason "stop" | "length" | None). Token
ids go in and come out unchanged: what a row samples is part of its history exactly
as sampled, and the next call appends after it.

Engines: `JaxEngine` (here; CPU/GPU/TPU, a KV-cache session per wave) and `VllmEngine`
(ctu/rollout/vllm_engine.py; GPU, prefix caching instead of a session). A Ray worker
pool only has to implement the same two methods.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
from flax import nnx

from ctu import sharding
from ctu.sampling import Generation, SamplingConfig, Session


@runtime_checkable
class EngineSession(Protocol):
    """Rows of conversations that grow turn by turn."""

    def generate(self, appends: Sequence[Sequence[int] | None], rng: jax.Array) -> Generation:
        """Appends new ids to each taking-part row (None: the row sits out) and samples
        each such row's continuation until a stop token or the token limits."""
        ...


@runtime_checkable
class RolloutEngine(Protocol):
    """What the learner and the runner need from a sampler."""

    sampling: SamplingConfig

    def update_weights(self, model: nnx.Module) -> None:
        """Makes later sessions (and open ones, at their next call) sample from `model`."""
        ...

    def with_sampling(self, sampling: SamplingConfig) -> RolloutEngine:
        """An engine that samples with `sampling` from the same weights: one
        `update_weights` call on either serves both (e.g. greedy evaluation beside
        tempered training rollouts)."""
        ...

    def session(self, batch_size: int, max_len: int) -> EngineSession:
        """A session of `batch_size` rows, each holding at most `max_len` tokens."""
        ...


class JaxEngine:
    """The in-process JAX sampler (`ctu.sampling.Session`) as a `RolloutEngine`.

    Weights are handed to every generate call as an `nnx.State`, so `update_weights`
    costs nothing and never recompiles: the jitted steps are keyed on the model's
    structure, the shapes and the `SamplingConfig`, not on the weights.
    """

    def __init__(
        self,
        model: nnx.Module,
        sampling: SamplingConfig,
        *,
        cache_dtype=None,
        min_append_bucket: int = 16,
        mesh=None,
    ):
        """`mesh`: the mesh sessions run on (their KV caches sharded over it); None for a
        single device. Weights that live elsewhere (a learner on a mesh of its own)
        are copied onto it, replicated, at every `update_weights`."""
        self.sampling = sampling
        self._model = model  # structure and config only; the weights are in self._weights
        self._mesh = mesh
        self._weights = {}  # shared with `with_sampling` copies
        self._cache_dtype = cache_dtype
        self._min_append_bucket = min_append_bucket
        self.update_weights(model)

    def update_weights(self, model: nnx.Module) -> None:
        params = nnx.state(model)
        if self._mesh is not None:
            devices = set(self._mesh.devices.flat)
            if any(leaf.sharding.device_set != devices for leaf in jax.tree.leaves(params)):
                params = jax.device_put(params, sharding.replicated(self._mesh))
        self._weights["params"] = params

    def with_sampling(self, sampling: SamplingConfig) -> JaxEngine:
        engine = copy.copy(self)
        engine.sampling = sampling
        return engine

    @property
    def params(self) -> nnx.State:
        return self._weights["params"]

    def session(self, batch_size: int, max_len: int) -> JaxEngineSession:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mesh = {} if self._mesh is None else {"mesh": self._mesh}
        session = Session(
            self._model,
            batch_size=batch_size,
            max_len=max_len,
            sampling=self.sampling,
            cache_dtype=self._cache_dtype,
            min_append_bucket=self._min_append_bucket,
            **mesh,
        )
        return JaxEngineSession(self, session)


class JaxEngineSession:
    """A `ctu.sampling.Session` that samples with its engine's current weights."""

    def __init__(self, engine: JaxEngine, session: Session):
        self._engine = engine
        self.session = session

    def generate(self, appends: Sequence[Sequence[int] | None], rng: jax.Array) -> Generation:
        return self.session.generate(appends, self._engine.params, rng)

    def history(self, row: int) -> list[int]:
        return self.session.history(row)
