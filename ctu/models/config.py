"""ModelConfig: the hyperparameters of a Qwen2/Qwen3 decoder, with named presets.

Field names follow the Hugging Face config where one exists, so `from_hf_dict` and
`to_hf_dict` read as a renaming. Dtypes are stored as strings so the config stays
hashable (it is a static argument of jitted functions) and JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# config.json key of `ModelConfig.smear`, a ctu extension.
SMEAR_KEY = "ctu_smear"
# config.json model_type prefix of a smear model: a type transformers does not know.
SMEAR_MODEL_TYPE_PREFIX = "ctu_smear_"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Qwen-family decoder.

    `qkv_bias` is True for Qwen2 (biases on q/k/v projections); `qk_norm` is True for
    Qwen3 (RMSNorm over head_dim on queries and keys before RoPE).
    `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype.

    `smear` (not in any Hugging Face model; 0, off, in every preset) is the number of
    preceding tokens whose embeddings are added to each token's, each scaled by a learned
    per-channel gate (initialised to 1): a causal depthwise convolution over the
    embeddings (the "short convolution" of H3 and Mamba; Allen-Zhu's "Canon layers").
    Every position then carries its predecessors from the start, so a single attention
    layer can match "the tokens before you are my tokens" and copy by content (the
    circuit a standard model must first build from a previous-token head and an
    induction head; Olsson et al. 2022, "smeared keys"), or find a value by the word
    that names it a few tokens before (`call`, ` `, `Ironwood`). It is for models trained
    from scratch, where that circuit is slow to form (docs/results.md §1). A cached call
    keeps the token ids per slot (`KVCache.tokens`) to find the predecessors of its first
    tokens. `True` means 1.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    param_dtype: str = "float32"
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    smear: int = 0

    def __post_init__(self):
        object.__setattr__(self, "smear", int(self.smear))  # True (older configs) is 1
        if self.smear < 0:
            raise ValueError(
                f"ModelConfig.smear={self.smear}: the number of preceding tokens, >= 0."
            )
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family={self.family!r}: use one of {FAMILIES}.")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive int.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs it)."
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}: RoPE needs an even size.")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("ModelConfig.rope_theta and rms_norm_eps must be positive.")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}: use one of {sorted(DTYPES)}."
                )

    @property
    def jnp_dtype(self):
        """The compute dtype as a jnp dtype."""
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        """The parameter storage dtype as a jnp dtype."""
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, h, f = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * h, self.num_kv_heads * h
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d + self.smear * d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}: use one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Reads a Hugging Face Qwen2/Qwen3 `config.json` dict (transformers 4 or 5), or
        ctu's export of a smear model (`model_type` `ctu_smear_qwen3`, ...)."""
        family = hf.get("model_type")
        if isinstance(family, str) and family.startswith(SMEAR_MODEL_TYPE_PREFIX):
            family = family[len(SMEAR_MODEL_TYPE_PREFIX) :]
            if not hf.get(SMEAR_KEY):
                raise ValueError(
                    f"config.json model_type={hf['model_type']!r} without {SMEAR_KEY} >= 1: "
                    "the folder is damaged; export it again with ctu.models.to_hf."
                )
        if family not in FAMILIES:
            raise ValueError(
                f"config.json model_type={family!r} is not supported: use one of {FAMILIES}."
            )
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(
                f"config.json rope_type={rope_type!r}: only 'default' RoPE is supported."
            )
        if hf.get("use_sliding_window"):
            raise ValueError(
                "config.json use_sliding_window=true: sliding windows are unsupported."
            )
        if family == "qwen3" and hf.get("attention_bias"):
            raise ValueError("config.json attention_bias=true: Qwen3 with biases is unsupported.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu'.")
        num_heads = hf["num_attention_heads"]
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        eos = hf.get("eos_token_id")
        fields = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            intermediate_size=hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            param_dtype=dtype if dtype in DTYPES else "float32",
            dtype=dtype if dtype in DTYPES else "float32",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            smear=int(hf.get(SMEAR_KEY, 0)),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict that transformers loads as this model."""
        if self.family == "qwen2" and not self.qkv_bias:
            raise ValueError("A qwen2 model without qkv biases has no Hugging Face equivalent.")
        if self.family == "qwen3" and (self.qkv_bias or not self.qk_norm):
            raise ValueError("A qwen3 model needs qk_norm and no qkv biases to match Hugging Face.")
        hf = {
            "architectures": [_HF_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.family == "qwen3":
            hf["attention_bias"] = False
        if self.smear:
            # transformers has no smear gates: it must refuse the folder, not silently
            # load another model. An unknown model_type does that; ctu reads it back.
            hf[SMEAR_KEY] = self.smear
            hf["model_type"] = SMEAR_MODEL_TYPE_PREFIX + self.family
            hf["architectures"] = ["CtuSmear" + _HF_ARCHITECTURES[self.family]]
        return hf


def _qwen2(**fields: Any) -> ModelConfig:
    return ModelConfig(family="qwen2", qkv_bias=True, qk_norm=False, **fields)


def _qwen3(**fields: Any) -> ModelConfig:
    return ModelConfig(family="qwen3", qkv_bias=False, qk_norm=True, **fields)


# Real sizes are those of the released checkpoints' config.json files.
PRESETS: dict[str, ModelConfig] = {
    # CPU preset for the default run and tests; set vocab_size from the tokenizer with
    # `ModelConfig.preset("tiny", vocab_size=len(tokenizer))`.
    "tiny": _qwen3(
        vocab_size=1024,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "qwen2p5_0p5b": _qwen2(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen2p5_1p5b": _qwen2(
        vocab_size=151936,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=8960,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen2p5_7b": _qwen2(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen3_0p6b": _qwen3(
        vocab_size=151936,
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen3_1p7b": _qwen3(
        vocab_size=151936,
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "qwen3_8b": _qwen3(
        vocab_size=151936,
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=False,
        max_position_embeddings=40960,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}
