"""Hugging Face checkpoint import/export for Qwen2/Qwen3 (safetensors, no network).

Our weights keep one axis per named dimension; Hugging Face linear weights are
`[out, in]` matrices. `_weight_table` is the one place that relates the two.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from ctu.models.config import ModelConfig
from ctu.models.qwen import Qwen
from ctu.sharding import DEFAULT_RULES, ShardingRules, state_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SMEAR_TENSOR = "model.embed_smear.weight"


def _weight_table(config: ModelConfig) -> Iterator[tuple[tuple, str, int | None]]:
    """(our path, HF name, split) per parameter.

    `split` says how an HF `[out, in]` weight folds into ours: ours has shape
    `in_dims + out_dims` with `split` leading "in" dims, and hf = ours.reshape(in, out).T.
    `0` means the same layout (the embedding table); `None` a vector (bias, norm scale)
    that HF stores flat.
    """
    yield ("embed",), "model.embed_tokens.weight", 0
    yield ("final_norm", "scale"), "model.norm.weight", None
    if config.smear:  # a ctu extension (ModelConfig.smear); transformers ignores it
        yield ("smear",), SMEAR_TENSOR, 0
    if not config.tie_word_embeddings:
        yield ("lm_head",), "lm_head.weight", 1
    for i in range(config.num_layers):
        ours, hf = ("layers", i), f"model.layers.{i}."
        yield ours + ("input_norm", "scale"), hf + "input_layernorm.weight", None
        yield ours + ("post_attn_norm", "scale"), hf + "post_attention_layernorm.weight", None
        for name in ("q", "k", "v"):
            yield ours + ("attn", f"{name}_proj"), hf + f"self_attn.{name}_proj.weight", 1
            if config.qkv_bias:
                yield ours + ("attn", f"{name}_bias"), hf + f"self_attn.{name}_proj.bias", None
        yield ours + ("attn", "o_proj"), hf + "self_attn.o_proj.weight", 2
        if config.qk_norm:
            yield ours + ("attn", "q_norm", "scale"), hf + "self_attn.q_norm.weight", None
            yield ours + ("attn", "k_norm", "scale"), hf + "self_attn.k_norm.weight", None
        for name in ("gate", "up", "down"):
            yield ours + ("mlp", f"{name}_proj"), hf + f"mlp.{name}_proj.weight", 1


def _to_ours(hf_weight: np.ndarray, shape: tuple[int, ...], split: int | None) -> np.ndarray:
    if split is None or split == 0:
        return hf_weight.reshape(shape)
    return hf_weight.T.reshape(shape)


def _to_hf(weight: np.ndarray, split: int | None) -> np.ndarray:
    if split == 0:
        return weight
    if split is None:
        return weight.reshape(-1)
    rows = math.prod(weight.shape[:split])
    return np.ascontiguousarray(weight.reshape(rows, -1).T)


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return {
        tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)
    }


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else np.dtype(dtype).name


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE_FILE).exists():
        with safe_open(path / SINGLE_FILE, framework="numpy") as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise FileNotFoundError(
        f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}: point at a Hugging Face model "
        "folder saved with safe_serialization=True."
    )


def from_hf(
    path: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> tuple[Qwen, ModelConfig]:
    """Loads a Hugging Face Qwen2/Qwen3 folder (config.json + safetensors) into a `Qwen`.

    `dtype` is the compute dtype (default float32), `param_dtype` the storage dtype
    (default: `dtype`). With `mesh`, each parameter is placed straight into its sharding.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}/config.json not found: not a Hugging Face model folder.")
    dtype = _dtype_name(dtype) or "float32"
    config = ModelConfig.from_hf_dict(
        json.loads((path / "config.json").read_text()),
        dtype=dtype,
        param_dtype=_dtype_name(param_dtype) or dtype,
    )
    files = _checkpoint_files(path)
    model = nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0), rules=rules))
    variables = _variables(model)
    shardings = _variables_shardings(model, mesh) if mesh is not None else {}

    used = set()
    with contextlib.ExitStack() as stack:
        handles = {}
        for ours, name, split in _weight_table(config):
            if name not in files:
                raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint.")
            if files[name] not in handles:
                handles[files[name]] = stack.enter_context(
                    safe_open(files[name], framework="numpy")
                )
            hf_weight = handles[files[name]].get_tensor(name)
            variable = variables[ours]
            if hf_weight.size != math.prod(variable.shape):
                raise ValueError(
                    f"{path}: tensor {name!r} has shape {hf_weight.shape}, which does not fit "
                    f"{'.'.join(map(str, ours))} {variable.shape} of config.json's model."
                )
            weight = _to_ours(hf_weight, variable.shape, split).astype(config.jnp_param_dtype)
            if ours in shardings:
                array = jax.make_array_from_callback(
                    weight.shape, shardings[ours], lambda index, w=weight: w[index]
                )
            else:
                array = jax.numpy.asarray(weight)
            variable.set_value(array)
            used.add(name)

    unexpected = [
        name
        for name in files
        if name not in used
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_word_embeddings and name == "lm_head.weight")
    ]
    if unexpected:
        raise ValueError(f"{path}: tensors with no place in {config.family}: {unexpected[:5]}")
    return model, config


def _variables_shardings(model: nnx.Module, mesh: jax.sharding.Mesh) -> dict[tuple, object]:
    shardings = state_shardings(model, mesh)
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(shardings)}


def to_hf(
    model: Qwen,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Writes `model` as a Hugging Face folder that `AutoModelForCausalLM` loads.

    The folder is written to a temporary sibling and renamed into place, replacing
    `path` whole (write tokenizer files afterwards). `dtype` defaults to the param dtype.
    Above `max_shard_bytes` the weights are split into files with an index.
    A `ModelConfig.smear` model round-trips through `from_hf` only: its config.json
    says `model_type: ctu_smear_qwen3` (or `_qwen2`), which transformers refuses rather
    than load the model without its gates.
    """
    path = Path(path)
    dtype = np.dtype(_dtype_name(dtype) or config.param_dtype)
    variables = _variables(model)
    tensors = {}
    for ours, name, split in _weight_table(config):
        value = variables[ours].get_value()
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        tensors[name] = _to_hf(np.asarray(jax.device_get(value)).astype(dtype), split)
    if jax.process_index() != 0:
        return path

    hf_config = config.to_hf_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = dtype.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _write_safetensors(tensors, tmp, max_shard_bytes)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_safetensors(tensors: dict[str, np.ndarray], folder: Path, max_shard_bytes: int):
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
