"""Sampling settings: a frozen, validated dataclass shared by the jitted sampler."""

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the sampler picks tokens. Hashable: it is a static argument of the jitted steps.

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it.
      top_p: nucleus mass in (0, 1]; 1 disables nucleus filtering.
      top_k: keep the k most likely tokens; 0 disables top-k filtering.
      max_new_tokens: most tokens sampled per row in one `Session.generate` call; it sizes
        the compiled output buffer (a call may ask for fewer without recompiling).
      stop_token_ids: a row stops after sampling any of these (the stop token is returned).

    Log-probabilities reported by the sampler are those of the distribution actually
    sampled from: log_softmax of (logits / temperature) restricted to the top-k / top-p
    set and renormalised there (less any token tied with the first one left out:
    `filters.support_floor` can then describe the set exactly). With the RL default (temperature 1, top_p 1, top_k 0)
    this is exactly log_softmax(logits), what the trainer recomputes. Greedy decoding
    (temperature 0) samples from a point mass, so it reports the raw model log-prob
    log_softmax(logits) (temperature 1, unfiltered) of the argmax token instead.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.stop_token_ids, Sequence) or isinstance(self.stop_token_ids, str):
            raise ValueError(
                f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}."
            )
        # Normalise lists to a sorted tuple so equal settings hash (and compile) alike.
        object.__setattr__(
            self, "stop_token_ids", tuple(sorted({int(t) for t in self.stop_token_ids}))
        )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k}.")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}.")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filtered(self) -> bool:
        """Whether top-k or top-p restricts the support of the sampling distribution."""
        return self.top_k > 0 or self.top_p < 1.0
