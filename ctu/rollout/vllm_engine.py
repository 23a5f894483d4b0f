"""vLLM as a `RolloutEngine` (GPU rollouts).

vLLM has no multi-turn session API; a `VllmSession` keeps each row's full token
history and sends the whole history as the prompt of every turn
(`TokensPrompt(prompt_token_ids=...)`). With `enable_prefix_caching=True` vLLM finds the
KV blocks of the shared prefix (everything up to this turn's new ids) in its cache and
only prefills the new tokens, which is what the JAX session does with its own cache.
Ids go in and out unchanged: `detokenize=False`, and the sampled ids are appended to
the history verbatim.

Weights: `update_weights(model)` exports the JAX model as a Hugging Face folder
(`ctu.models.to_hf`, an atomic replace of `model_dir`) and asks every vLLM worker to
reload its weights from that folder (`LLM.collective_rpc("reload_weights")`, as in
vLLM's examples/offline_inference/skip_loading_weights_in_engine_init.py), then drops
the prefix cache, whose blocks were computed with the old weights
(`LLM.reset_prefix_cache()`). A disk round trip per RL step is simple and correct; an
in-memory path (`collective_rpc` calling the worker model's `load_weights` with the
tensors, or NCCL broadcast as in vLLM's RLHF examples) is the optimisation to add
when the export shows in the profile.

Log-probs: `SamplingParams(logprobs=0)` returns the log-prob of the sampled token. vLLM
reports raw-logit log-probs by default (before temperature / top-k / top-p); when the
`SamplingConfig` changes the distribution the engine is created with
`logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2 engine argument) so they are the
sampling distribution's, as `ctu.sampling` reports them.

WHAT HAS NOT RUN: vLLM is not installable on the CPU machines this was written on.
tests/test_rollout_vllm.py runs this module against a fake `vllm` package (the calls,
arguments, history bookkeeping, stop reasons, log-prob extraction, weight-sync
sequence, and `launch.train` with rollout.engine=vllm); no real vLLM engine, GPU, `reload_weights`, prefix cache or
`logprobs_mode` has been exercised. Assumed from vLLM's documentation and not checked:
a sampled stop token is in `CompletionOutput.token_ids` (when it is not, the turn is
closed by the conversation builder with an unmasked end-of-turn of its own), and
`top_k=-1` disables top-k.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from ctu.models import ModelConfig, to_hf
from ctu.sampling import LENGTH, STOP, Generation, SamplingConfig


def import_vllm():
    """`vllm` and `vllm.inputs`, or an ImportError that says what to do."""
    try:
        return importlib.import_module("vllm"), importlib.import_module("vllm.inputs")
    except ImportError as e:
        raise ImportError(
            "rollout engine 'vllm' needs the vllm package (GPU only): `pip install vllm`, "
            "or use the JAX engine (rollout.engine='jax')."
        ) from e


class VllmEngine:
    """A `vllm.LLM` over a Hugging Face export of the policy.

    Args:
      model_dir: the folder vLLM loads; `update_weights` rewrites it.
      model_config: the policy's `ModelConfig` (for the export).
      sampling: sampling settings (per-turn token limit, stop ids, temperature, ...).
      seed: engine seed; each request also gets a seed drawn from the generate key.
      **llm_kwargs: passed to `vllm.LLM` (e.g. gpu_memory_utilization, max_model_len,
        dtype, tensor_parallel_size).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        model_config: ModelConfig,
        sampling: SamplingConfig,
        *,
        seed: int = 0,
        **llm_kwargs,
    ):
        if model_config.smear:
            raise ValueError(
                f"model.smear={model_config.smear}: vLLM runs the Hugging Face architecture, "
                "which has no smear gates, so it would sample from a different policy; use "
                "rollout.engine=jax for a smear model."
            )
        self._vllm, self._inputs = import_vllm()
        self.model_dir = str(model_dir)
        self.model_config = model_config
        self.sampling = sampling
        if not os.path.exists(os.path.join(self.model_dir, "config.json")):
            raise FileNotFoundError(
                f"no Hugging Face model in {self.model_dir}; create it with "
                "VllmEngine.from_model(model, config, model_dir, sampling)."
            )
        kwargs = dict(
            model=self.model_dir,
            enable_prefix_caching=True,
            skip_tokenizer_init=True,  # ids in, ids out: vLLM never tokenises
            seed=seed,
        )
        if sampling.filtered or sampling.temperature not in (0.0, 1.0):
            kwargs["logprobs_mode"] = "processed_logprobs"
        kwargs.update(llm_kwargs)
        self.llm = self._vllm.LLM(**kwargs)

    @classmethod
    def from_model(
        cls,
        model: nnx.Module,
        model_config: ModelConfig,
        model_dir: str | os.PathLike,
        sampling: SamplingConfig,
        **kwargs,
    ) -> VllmEngine:
        """Exports `model` to `model_dir`, then starts vLLM on it."""
        to_hf(model, model_config, model_dir)
        return cls(model_dir, model_config, sampling, **kwargs)

    def update_weights(self, model: nnx.Module) -> None:
        to_hf(model, self.model_config, self.model_dir)
        self.llm.collective_rpc("reload_weights")
        self.llm.reset_prefix_cache()

    def with_sampling(self, sampling: SamplingConfig) -> VllmEngine:
        """The same `vllm.LLM` (one engine in GPU memory, one weight sync) with other
        sampling settings. Its log-probs follow the LLM's `logprobs_mode`, chosen for
        the settings it was created with."""
        engine = copy.copy(self)
        engine.sampling = sampling
        return engine

    def session(self, batch_size: int, max_len: int) -> VllmSession:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return VllmSession(self, batch_size, max_len)

    def sampling_params(self, max_tokens: int, seed: int) -> Any:
        s = self.sampling
        return self._vllm.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            max_tokens=max_tokens,
            stop_token_ids=list(s.stop_token_ids),
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            skip_special_tokens=False,
            seed=seed,
        )


class VllmSession:
    """Rows of full token histories; every turn re-sends a row's history as its prompt
    (prefix caching makes that cost only the new tokens). Same contract as
    `ctu.sampling.Session`: a row holds at most `max_len` fed ids plus its last sampled
    one, and an append that does not fit gets 0 tokens and stop reason "length"."""

    def __init__(self, engine: VllmEngine, batch_size: int, max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 tokens, got {max_len}.")
        self.engine = engine
        self.batch_size = batch_size
        self.max_len = max_len
        self._histories: list[list[int]] = [[] for _ in range(batch_size)]

    def history(self, row: int) -> list[int]:
        return list(self._histories[row])

    def generate(self, appends: Sequence[Sequence[int] | None], rng: jax.Array) -> Generation:
        if len(appends) != self.batch_size:
            raise ValueError(f"appends has {len(appends)} rows, the session has {self.batch_size}.")
        budget = self.engine.sampling.max_new_tokens
        seeds = np.asarray(jax.random.randint(rng, (self.batch_size,), 0, 2**31 - 1))
        tokens = np.zeros((self.batch_size, budget), np.int32)
        logprobs = np.zeros((self.batch_size, budget), np.float32)
        num_tokens = np.zeros(self.batch_size, np.int32)
        reasons: list[str | None] = [None] * self.batch_size
        rows, prompts, params = [], [], []
        for row, new in enumerate(appends):
            if new is None:
                continue
            history = self._histories[row]
            new = [int(t) for t in new]
            if not history and not new:
                raise ValueError(f"row {row} has no token to continue from: give its prompt first.")
            if len(history) + len(new) > self.max_len:
                reasons[row] = LENGTH
                continue
            history.extend(new)
            rows.append(row)
            prompts.append(self.engine._inputs.TokensPrompt(prompt_token_ids=list(history)))
            room = min(budget, self.max_len + 1 - len(history))
            params.append(self.engine.sampling_params(room, int(seeds[row])))
        if not rows:
            return Generation(tokens, logprobs, num_tokens, tuple(reasons))
        outputs = self.engine.llm.generate(prompts, params, use_tqdm=False)
        stop_ids = set(self.engine.sampling.stop_token_ids)
        for row, output in zip(rows, outputs, strict=True):
            completion = output.outputs[0]
            ids = [int(t) for t in completion.token_ids]
            lps = [float(step[t].logprob) for step, t in zip(completion.logprobs, ids, strict=True)]
            if completion.finish_reason == "stop" and ids and ids[-1] not in stop_ids:
                logging.warning(
                    "vLLM stopped without returning the stop token; the turn "
                    "is closed without loss on its end-of-turn."
                )
            self._histories[row].extend(ids)
            tokens[row, : len(ids)] = ids
            logprobs[row, : len(ids)] = lps
            num_tokens[row] = len(ids)
            reasons[row] = STOP if completion.finish_reason == "stop" else LENGTH
        return Generation(tokens, logprobs, num_tokens, tuple(reasons))
