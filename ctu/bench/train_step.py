r"""Benchmark of the policy update: `python -m launch.bench train_step --out=FILE.json`.

CPU section (always): tokens/s of our DAPO step (forward, backward, AdamW update, as
`Learner.train_step` runs it) against the same update written in PyTorch on the
transformers model: `Qwen3ForCausalLM` built from our tiny config's Hugging Face dict,
loaded with the same weights (through `ctu.models.to_hf`), trained on the same batch
with the same loss formula (DAPO token-mean, clip-higher 0.2/0.28), the same global
norm clipping and AdamW settings. As a check that both sides compute the same thing,
the JSON holds torch's first-step log-prob difference to ours and both second-step
losses (after one identical update). Warm-up steps (compilation) are
excluded; timing rounds alternate between the two sides and the best round counts,
so that load from other processes hurts both alike. Goal: ratio >= 1.5.

GPU section (only when `jax.default_backend() == "gpu"`): tokens/s and MFU of the
same step on a ~0.5B config (Qwen2.5-0.5B shapes) at sequence length 2048 with bf16
compute, over a mesh of every local GPU.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctu import metrics, sharding
from ctu.models import ModelConfig, to_hf
from ctu.rl import train_step
from ctu.rl.optim import OptimConfig
from ctu.world.evaluation import write_json_atomic

CPU_BATCH, CPU_LENGTH = 8, 256
GPU_BATCH, GPU_LENGTH = 8, 2048
WARMUP_STEPS, TIMED_STEPS, ROUNDS = 2, 5, 3
EPS_LOW, EPS_HIGH = 0.2, 0.28
OPTIM = OptimConfig(learning_rate=1e-5, weight_decay=0.01, max_grad_norm=1.0)


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0):
    """Random tokens, response mask after a quarter-length prompt, +-1 advantages."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, length), dtype=np.int32)
    ends = rng.integers(length // 2, length + 1, rows)
    positions = np.arange(length)[None]
    mask = ((positions >= length // 4) & (positions < ends[:, None])).astype(np.float32)
    advantages = rng.choice([-1.0, 1.0], rows).astype(np.float32)
    return tokens, mask, advantages


def _learner(model_config: ModelConfig, mesh, num_micro_batches: int = 1):
    model = sharding.create_sharded_model(model_config, mesh, nnx.Rngs(0))
    config = train_step.TrainConfig(
        loss="dapo",
        loss_settings={"eps_low": EPS_LOW, "eps_high": EPS_HIGH},
        num_micro_batches=num_micro_batches,
        shuffle=False,
        recompute_old_logp=False,
        optim=OPTIM,
    )
    return train_step.Learner(config, model, mesh)


def _prepared_batch(learner, tokens, mask, advantages):
    batch = learner.shard_batch(
        train_step.RolloutBatch(
            tokens=tokens, mask=mask, advantages=advantages, old_logp=np.zeros_like(mask)
        )
    )
    # Behaviour log-probs of the initial policy, so ratios start at 1 as in training.
    return train_step.RolloutBatch(
        tokens=batch.tokens,
        mask=batch.mask,
        advantages=batch.advantages,
        old_logp=learner.compute_logp(batch.tokens)[0],
    )


def _time_jax(learner, batch, rows, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        result = learner.train_step(batch, rows)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------ PyTorch


def _torch_side(model_dir: str, tokens, mask, advantages, old_logp):
    """The transformers model and a closure running one DAPO + AdamW step."""
    import torch
    import transformers

    model = transformers.Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=OPTIM.learning_rate,
        betas=(OPTIM.b1, OPTIM.b2),
        eps=OPTIM.eps,
        weight_decay=OPTIM.weight_decay,
    )
    tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)
    mask = torch.tensor(np.asarray(mask))
    advantages = torch.tensor(np.asarray(advantages))[:, None]
    old_logp = torch.tensor(np.asarray(old_logp))

    def step() -> tuple[float, float]:
        """One update; returns the loss and max |logp - old_logp| over response tokens."""
        logits = model(input_ids=tokens).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        logp = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        logp = torch.nn.functional.pad(logp, (1, 0))  # Value at t is about token t.
        ratio = torch.exp(torch.where(mask > 0, logp - old_logp, 0.0))
        objective = torch.minimum(
            ratio * advantages, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * advantages
        )
        loss = -(objective * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.max_grad_norm)
        optimizer.step()
        drift = float(((logp.detach() - old_logp).abs() * mask).max())
        return float(loss.detach()), drift

    return step, torch.get_num_threads()


def _time_torch(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


# ------------------------------------------------------------------------------ sections


def cpu_comparison() -> dict:
    """Our DAPO step vs the same step in PyTorch, tiny model, one CPU device."""
    model_config = ModelConfig.preset("tiny")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices("cpu")[:1])
    learner = _learner(model_config, mesh)
    tokens, mask, advantages = synthetic_batch(CPU_BATCH, CPU_LENGTH, model_config.vocab_size)
    batch = _prepared_batch(learner, tokens, mask, advantages)
    rows = jnp.arange(CPU_BATCH)

    with tempfile.TemporaryDirectory() as model_dir:
        to_hf(learner.model, model_config, os.path.join(model_dir, "hf"), dtype="float32")
        torch_step, torch_threads = _torch_side(
            os.path.join(model_dir, "hf"), tokens, mask, advantages, jax.device_get(batch.old_logp)
        )

    # Same weights: torch's first log-probs equal our behaviour log-probs. Same update:
    # after one step the second losses agree (the first is -mean(A), the ratio being 1).
    learner.train_step(batch, rows)
    _, first_logp_diff = torch_step()
    jax_second_loss = float(learner.train_step(batch, rows)["loss"])
    torch_second_loss, _ = torch_step()
    for _ in range(WARMUP_STEPS):
        learner.train_step(batch, rows)
        torch_step()
    jax_times, torch_times = [], []
    for _ in range(ROUNDS):
        jax_times.append(_time_jax(learner, batch, rows, TIMED_STEPS))
        torch_times.append(_time_torch(torch_step, TIMED_STEPS))

    tokens_per_step = CPU_BATCH * CPU_LENGTH
    jax_tps = tokens_per_step / min(jax_times)
    torch_tps = tokens_per_step / min(torch_times)
    return {
        "model": "tiny",
        "num_params": model_config.num_params(),
        "batch": CPU_BATCH,
        "seq_len": CPU_LENGTH,
        "timed_steps_per_round": TIMED_STEPS,
        "rounds": ROUNDS,
        "jax_step_s": min(jax_times),
        "torch_step_s": min(torch_times),
        "jax_tokens_per_s": jax_tps,
        "torch_tokens_per_s": torch_tps,
        "ratio_jax_over_torch": jax_tps / torch_tps,
        "goal_ratio": 1.5,
        "first_step_logp_max_abs_diff": first_logp_diff,
        "second_loss_jax": jax_second_loss,
        "second_loss_torch": torch_second_loss,
        "second_loss_abs_diff": abs(jax_second_loss - torch_second_loss),
        "torch_threads": torch_threads,
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }


def gpu_mfu(
    preset: str = "qwen2p5_0p5b", rows_per_device: int = GPU_BATCH, seq_len: int = GPU_LENGTH
) -> dict:
    """Tokens/s and MFU of the step on a ~0.5B config, seq 2048, bf16 compute.

    Data-parallel over every local device; micro-batches of 2 rows bound the logits.
    """
    model_config = ModelConfig.preset(preset, dtype="bfloat16")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batch_rows = rows_per_device * mesh.devices.size
    learner = _learner(model_config, mesh, num_micro_batches=max(rows_per_device // 2, 1))
    tokens, mask, advantages = synthetic_batch(batch_rows, seq_len, model_config.vocab_size)
    batch = _prepared_batch(learner, tokens, mask, advantages)
    rows = jnp.arange(batch_rows)
    for _ in range(WARMUP_STEPS):
        learner.train_step(batch, rows)
    step_s = min(_time_jax(learner, batch, rows, TIMED_STEPS) for _ in range(ROUNDS))
    tokens_per_s = batch_rows * seq_len / step_s
    flops_per_token = metrics.train_flops_per_token(
        num_params=model_config.num_params(),
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        head_dim=model_config.head_dim,
        seq_len=seq_len,
    )
    device = jax.devices()[0]
    peak = metrics.peak_flops_per_device(device)
    return {
        "model": preset,
        "device_kind": device.device_kind,
        "num_devices": int(mesh.devices.size),
        "batch": batch_rows,
        "seq_len": seq_len,
        "dtype": "bfloat16",
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "peak_flops_per_device": peak,
        "mfu": metrics.mfu(
            tokens_per_s=tokens_per_s,
            flops_per_token=flops_per_token,
            num_devices=int(mesh.devices.size),
            peak_flops=peak,
        ),
    }


def run(out_path: str) -> dict:
    results = {"cpu": cpu_comparison()}
    if jax.default_backend() == "gpu":
        results["gpu"] = gpu_mfu()
    else:
        results["gpu"] = {"skipped": f"no GPU (default backend: {jax.default_backend()})"}
    write_json_atomic(out_path, results)
    return results
