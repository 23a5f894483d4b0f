"""Jitted prefill + KV-cache decode sampler with multi-turn sessions.

Usage::

    session = Session(model, batch_size=64, max_len=2048,
                      sampling=SamplingConfig(max_new_tokens=256, stop_token_ids=(eot,)))
    out = session.generate(prompts, nnx.state(model), rng)  # first turn
    out = session.generate(tool_outputs, nnx.state(model), rng2)  # continues from the cache
"""

from ctu.sampling.buckets import append_bucket, batch_bucket, next_power_of_two
from ctu.sampling.filters import sample_tokens, sampling_logprobs
from ctu.sampling.session import LENGTH, STOP, Generation, Session
from ctu.sampling.settings import SamplingConfig

__all__ = [
    "LENGTH",
    "STOP",
    "Generation",
    "SamplingConfig",
    "Session",
    "append_bucket",
    "batch_bucket",
    "next_power_of_two",
    "sample_tokens",
    "sampling_logprobs",
]
