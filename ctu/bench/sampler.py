"""Sampler throughput: ours (jitted, KV cache) vs transformers' `generate`, same model.

`python -m launch.bench sampler --out=FILE.json`. On the tiny Qwen3 preset with random
weights, batch 64, a 32-token prompt and exactly 128 new tokens (no stop tokens), both
sample at temperature 1 with no top-k / top-p. The Hugging Face model is the very same
weights, exported with `ctu.models.to_hf` and loaded with `AutoModelForCausalLM`.
Compile / first-call time is excluded from tokens/s (warm-up) and reported separately.

On CPU, `launch.bench` gives this benchmark one JAX device per core and our sampler
runs data-parallel over them (a mesh over "data", one decode loop per device): XLA:CPU
runs a decode step's small matmuls on one core, while PyTorch's `generate` threads
every op over all cores. Both engines use the same cores. On a GPU both run there
(transformers on CUDA when PyTorch can reach it; `torch_device` in the JSON says where).

On GPU a second section times decode of the real-size presets with random weights and
compares it with the memory-bandwidth bound: every decode step reads all parameters and
the whole KV cache (our attention reads every slot), so
tokens/s <= batch * HBM bandwidth / (param bytes + KV bytes).
"""

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctu import sharding
from ctu.models import KVCache, ModelConfig, Qwen, to_hf
from ctu.sampling import SamplingConfig, Session
from ctu.world.evaluation import write_json_atomic

# launch.bench: one CPU device per core (see the module docstring).
ONE_CPU_DEVICE_PER_CORE = True
BATCH = 64
PROMPT_LEN = 32
NEW_TOKENS = 128
REPEATS = 5
GPU_PRESETS = ("qwen2p5_0p5b", "qwen3_0p6b")

# Peak HBM bandwidth (bytes/s) by a substring of `device_kind`, most specific first.
HBM_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
)


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def data_parallel_mesh(batch: int):
    """A mesh of every device over "data", or None for one device or an uneven split."""
    devices = jax.devices()
    if len(devices) == 1 or batch % len(devices):
        return None
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def sampler_runner(model: Qwen, *, batch: int, prompt_len: int, new_tokens: int):
    """`run(max_new_tokens, seed) -> seconds` for one fresh `Session.generate` call, over
    `data_parallel_mesh(batch)`."""
    prompts = _prompts(batch, prompt_len, model.config.vocab_size).tolist()
    params = nnx.state(model)
    mesh = data_parallel_mesh(batch)
    if mesh is not None:
        params = jax.device_put(params, sharding.state_shardings(params, mesh))

    def run(max_new_tokens: int, seed: int) -> float:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens)  # no stop tokens
        session = Session(
            model, batch_size=batch, max_len=prompt_len + new_tokens, sampling=sampling, mesh=mesh
        )
        start = time.perf_counter()
        out = session.generate(prompts, params, jax.random.key(seed))  # returns host arrays
        elapsed = time.perf_counter() - start
        if int(out.num_tokens.sum()) != batch * max_new_tokens:
            raise RuntimeError(f"expected {batch * max_new_tokens} tokens, got {out.num_tokens}")
        return elapsed

    return run


def torch_device() -> str:
    """Where transformers runs: on the GPU when ours does and PyTorch can reach it."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def transformers_runner(model: Qwen, *, batch: int, prompt_len: int, new_tokens: int):
    """`run(seed) -> seconds` of transformers `generate` on the same weights (PyTorch)."""
    import torch
    import transformers

    device = torch_device()
    with tempfile.TemporaryDirectory() as folder:
        to_hf(model, model.config, f"{folder}/model")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            f"{folder}/model", dtype=torch.float32
        ).eval()
    hf_model.to(device)
    prompts_np = _prompts(batch, prompt_len, model.config.vocab_size)
    prompts = torch.from_numpy(prompts_np.astype(np.int64)).to(device)
    with torch.inference_mode():
        # Same model check: logits of the prompt agree with ours.
        ours = np.asarray(model(jnp.asarray(prompts_np[:4])))
        theirs = hf_model(prompts[:4]).logits.cpu().numpy()
    info = {
        "max_abs_logit_diff_vs_ours": float(np.abs(ours - theirs).max()),
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "transformers_version": transformers.__version__,
    }

    @torch.inference_mode()
    def run(seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = hf_model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if out.shape != (batch, prompt_len + new_tokens):
            raise RuntimeError(f"transformers generated shape {tuple(out.shape)}")
        return elapsed

    return run, info


def _sampler_figures(batch, new_tokens, first_s, prefill_first_s, totals, prefills):
    total_s, prefill_s = statistics.median(totals), statistics.median(prefills)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "tokens_per_s": batch * new_tokens / total_s,
        "best_tokens_per_s": batch * new_tokens / min(totals),
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s,
        "total_s": total_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "compile_and_first_call_s": first_s + prefill_first_s,
        "compile_s_estimate": max(first_s - total_s, 0.0) + max(prefill_first_s - prefill_s, 0.0),
    }


def time_sampler(model: Qwen, *, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    """Times `Session.generate` (prefill + decode) and prefill alone (max_new_tokens=1)."""
    run = sampler_runner(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)
    first_s, prefill_first_s = run(new_tokens, 0), run(1, 0)
    totals = [run(new_tokens, seed) for seed in range(1, repeats + 1)]
    prefills = [run(1, seed) for seed in range(1, repeats + 1)]
    return _sampler_figures(batch, new_tokens, first_s, prefill_first_s, totals, prefills)


def hbm_bandwidth(device_kind: str) -> float | None:
    for name, bandwidth in HBM_BANDWIDTH:
        if name in device_kind:
            return bandwidth
    return None


def decode_bound(config: ModelConfig, *, batch: int, max_len: int, bandwidth: float | None):
    """Bytes read per decode step (params + the whole KV cache) and the tokens/s bound."""
    model = nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0)))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    cache = jax.eval_shape(lambda: KVCache.init(config, batch=batch, max_len=max_len))
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    step_bytes = param_bytes + kv_bytes
    return {
        "param_bytes": int(param_bytes),
        "kv_bytes": int(kv_bytes),
        "bytes_per_decode_step": int(step_bytes),
        "hbm_bandwidth_bytes_per_s": bandwidth,
        "bound_tokens_per_s": None if bandwidth is None else batch * bandwidth / step_bytes,
    }


def accelerator_section(presets, *, batch: int, prompt_len: int, new_tokens: int, repeats: int):
    """Decode tokens/s of real-size presets (random bf16 weights) vs the bandwidth bound."""
    device_kind = jax.devices()[0].device_kind
    bandwidth = hbm_bandwidth(device_kind)
    results = {"device_kind": device_kind}
    for preset in presets:
        config = ModelConfig.preset(preset, param_dtype="bfloat16", dtype="bfloat16")
        model = Qwen(config, rngs=nnx.Rngs(0))
        timing = time_sampler(
            model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats
        )
        bound = decode_bound(
            config, batch=batch, max_len=prompt_len + new_tokens, bandwidth=bandwidth
        )
        if bound["bound_tokens_per_s"]:
            timing["fraction_of_bound"] = (
                timing["decode_tokens_per_s"] / bound["bound_tokens_per_s"]
            )
        results[preset] = {**timing, **bound}
        del model
    return results


def run(out_path: str) -> dict:
    shape = dict(batch=BATCH, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS)
    # Both engines are multi-threaded: a loaded machine slows PyTorch's spinning threads
    # far more than XLA's, so the ratio means little without the load it was taken at.
    load_before = os.getloadavg()[0]
    model = Qwen(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    ours = sampler_runner(model, **shape)
    theirs, theirs_info = transformers_runner(model, **shape)
    # Warm up (compile), then interleave the two so both see the same machine load.
    first_s, prefill_first_s, theirs_first_s = ours(NEW_TOKENS, 0), ours(1, 0), theirs(0)
    totals, prefills, theirs_totals = [], [], []
    for seed in range(1, REPEATS + 1):
        totals.append(ours(NEW_TOKENS, seed))
        prefills.append(ours(1, seed))
        theirs_totals.append(theirs(seed))
    ours_figures = _sampler_figures(BATCH, NEW_TOKENS, first_s, prefill_first_s, totals, prefills)
    theirs_s = statistics.median(theirs_totals)
    results = {
        "setup": {
            **shape,
            "repeats": REPEATS,
            "model": "tiny",
            "sampling": "T=1, no top-k/p",
            "backend": jax.default_backend(),
            "jax_devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": [load_before, os.getloadavg()[0]],
        },
        "ctu_sampler": ours_figures,
        "transformers_generate": {
            "tokens_per_s": BATCH * NEW_TOKENS / theirs_s,
            "best_tokens_per_s": BATCH * NEW_TOKENS / min(theirs_totals),
            "total_s": theirs_s,
            "first_call_s": theirs_first_s,
            **theirs_info,
        },
        # Best round against best round: the ratio least distorted by other load on
        # the machine (oversubscription slows PyTorch's threads far more than XLA's).
        "speedup_vs_transformers": min(theirs_totals) / min(totals),
        "speedup_median_rounds": theirs_s / ours_figures["total_s"],
        "speedup_per_round": [t / o for t, o in zip(theirs_totals, totals, strict=True)],
    }
    if jax.default_backend() == "gpu":
        results["gpu"] = accelerator_section(
            GPU_PRESETS, batch=BATCH, prompt_len=128, new_tokens=NEW_TOKENS, repeats=REPEATS
        )
    write_json_atomic(out_path, results)
    return results
