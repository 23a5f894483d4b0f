r"""A small, fully deterministic training run, for the kill-and-resume test.

    python tests/resume_worker.py --workdir=DIR --steps=8 --save_every=2 [--step_sleep_s=0.3] \\
        [--compilation_cache_dir=CACHE]

Trains the tiny Qwen with DAPO on synthetic rollout batches (batch `i` depends only on
`i`), resuming from `DIR/checkpoints` when a checkpoint exists, writing
`DIR/metrics.jsonl` and, at the end, the final parameters to `DIR/final_params.npz`.
`synthetic_batch` is also used by tests/test_rl_train.py.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

VOCAB = 128
ROWS = 8
LENGTH = 16
PROMPT = 4


def tiny_model_config():
    from ctu.models import ModelConfig

    return ModelConfig.preset(
        "tiny",
        vocab_size=VOCAB,
        num_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        num_kv_heads=1,
    )


def synthetic_batch(index: int, *, rows: int = ROWS, length: int = LENGTH, vocab: int = VOCAB):
    """Rollout batch number `index`: random tokens, ragged response masks, +-1 advantages.

    Returns numpy arrays (tokens, mask, advantages, old_logp); position 0 and the
    prompt carry mask 0, and each row's response has its own length.
    """
    rng = np.random.default_rng(1000 + index)
    tokens = rng.integers(0, vocab, (rows, length), dtype=np.int32)
    ends = rng.integers(PROMPT + 2, length + 1, rows)
    positions = np.arange(length)[None]
    mask = ((positions >= PROMPT) & (positions < ends[:, None])).astype(np.float32)
    advantages = rng.choice([-1.0, 1.0], rows).astype(np.float32)
    old_logp = np.full((rows, length), -np.log(vocab), np.float32) * mask
    return tokens, mask, advantages, old_logp


def run(workdir: str, steps: int, save_every: int, step_sleep_s: float, cache_dir: str) -> None:
    import time

    import jax

    if cache_dir:
        # Restarts reuse the first run's executables instead of compiling again.
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from flax import nnx

    from ctu import metrics, sharding
    from ctu.rl import checkpoint, train_step
    from ctu.rl.optim import OptimConfig

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    model = sharding.create_sharded_model(tiny_model_config(), mesh, nnx.Rngs(0))
    config = train_step.TrainConfig(
        loss="dapo",
        ppo_epochs=2,
        num_mini_batches=2,
        num_micro_batches=2,
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=2),
    )
    learner = train_step.Learner(config, model, mesh)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        checkpoint.CheckpointConfig(max_to_keep=2, save_interval_steps=save_every),
    )
    step, rng, position = 0, jax.random.key(42), {"next_batch": 0}
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(model=learner.model, optimizer=learner.optimizer)
        step, rng, position = restored.step, restored.rng, restored.data_position
    # No TensorBoard: tensorboardX imports torch when it is installed, seconds per start.
    writer = metrics.create_writer(
        workdir, start_step=step, config=dict(steps=steps), tensorboard=False
    )

    while step < steps:
        tokens, mask, advantages, old_logp = synthetic_batch(position["next_batch"])
        batch = learner.shard_batch(
            train_step.RolloutBatch(
                tokens=tokens, mask=mask, advantages=advantages, old_logp=old_logp
            )
        )
        rng, key = jax.random.split(rng)
        result = learner.update(batch, key)
        step += 1
        position = {"next_batch": position["next_batch"] + 1}
        writer.write_scalars(
            step, {k: v for k, v in result.items() if not k.startswith(("timing_s/", "perf/"))}
        )
        writer.flush()
        ckpt.save(
            step, model=learner.model, optimizer=learner.optimizer, rng=rng, data_position=position
        )
        time.sleep(step_sleep_s)
    ckpt.close()
    writer.close()
    flat = {
        "/".join(map(str, path)): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(nnx.state(learner.model))
        )
    }
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save_every", type=int, default=2)
    parser.add_argument("--step_sleep_s", type=float, default=0.0)
    parser.add_argument("--compilation_cache_dir", default="")
    args = parser.parse_args()
    run(args.workdir, args.steps, args.save_every, args.step_sleep_s, args.compilation_cache_dir)


if __name__ == "__main__":
    main()
