r"""Where the critique sits and what the update costs: `python -m launch.bench feedback_update`.

Feedback-guided DAPO trains on batches in which most rows carry a `<previous_attempts>`
block. The update runs the prompt prefix that every row shares once
(ctu.models.shared_prefix), so the block's position decides the cost:

- `critique_turn` (ctu's layout): the block is a second system turn after the tool
  schemas; every row shares the whole first system turn (~860 tokens).
- `critique_in_system` (the layout before): the block was appended to the instructions,
  before the tool schemas; rows then share only the instructions (~245 tokens).
- `baseline`: no row carries a block (feedback off), the reference.

Each layout is one batch shaped like a default feedback_dapo step: `GROUPS` tasks x
`GROUP_SIZE` rollouts, rollout 1 of each group plain (a failure) and the rest guided by
its critique. Every row is a real heuristic episode on the shipped world in the world
tokenizer's ids, trained with the default run's settings (`configs/feedback_dapo.py`:
DAPO, two mini-batches, behaviour log-probs recomputed). The two critique layouts hold
the same episodes; the baseline's are the heuristic's plain attempts. The timed
quantity is one `Learner.update` (forwards for the log-probs, the two optimizer
steps); compilation is excluded and the rounds of the three layouts alternate, the
best round of each counting. The JSON holds the shared prefix of each batch and the
ratios to the baseline.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from configs import feedback_dapo
from ctu import feedback_guidance as fg
from ctu import prompts, sharding
from ctu.demonstrations import record_episode
from ctu.models import ModelConfig
from ctu.models.shared_prefix import common_prefix_length
from ctu.rl.train_step import Learner, RolloutBatch
from ctu.run_config import settings_from_config
from ctu.text import make_world_tokenizer
from ctu.world import agents, data, tools
from ctu.world.env import Environment
from ctu.world.evaluation import write_json_atomic

GROUPS, GROUP_SIZE = 4, 8
ROUNDS = 3
LAYOUTS = ("baseline", "critique_turn", "critique_in_system")
LENGTH_BUCKET = 128


def _critique(env: Environment, task_id: str, tokenizer) -> str:
    """The `<previous_attempts>` block of a heuristic first attempt at `task_id`."""
    _, info = record_episode(
        env, agents.Heuristic(), task_id, tokenizer, system=prompts.system_prompt()
    )
    return fg.render_previous_attempts(
        [fg.Attempt(1, info["score"], info["feedback"], info["failure_type"])],
        mode="all",
        max_tokens=500,
        count_tokens=lambda text: len(tokenizer.encode(text, add_special_tokens=False)),
    )


class _ReadsCritique(agents.Policy):
    """A scripted policy that acts on `block` whatever prompt the episode is recorded with."""

    def __init__(self, inner: agents.Policy, block: str):
        self.inner, self.block = inner, block

    def reset(self, task_id, observation, feedback=None):
        self.inner.reset(task_id, observation, self.block)

    def act(self, observation):
        return self.inner.act(observation)


def episodes(world: data.World, tokenizer, layout: str) -> list[tuple[list[int], list[int]]]:
    """(tokens, loss mask) of every row of a `layout` batch."""
    tasks = [t for t in world.split("train") if t.level >= 2]
    env = Environment(world, tasks, seed=0)
    rows = []
    for task in tasks:
        if len(rows) == GROUPS * GROUP_SIZE:
            break
        block = _critique(env, task.task_id, tokenizer)
        if not block:  # the first attempt succeeded: nothing to critique
            continue
        for rollout in range(1, GROUP_SIZE + 1):
            policy = agents.Heuristic(seed=rollout)
            system, feedback = prompts.system_prompt(), None
            if layout != "baseline" and rollout >= 2:
                # The same guided episode either way; only the prompt's layout differs.
                policy = _ReadsCritique(policy, block)
                if layout == "critique_turn":
                    feedback = block
                else:
                    system = f"{prompts.SYSTEM_PROMPT}\n\n{block}"
            builder, _ = record_episode(
                env, policy, task.task_id, tokenizer, system=system, feedback=feedback
            )
            rows.append((builder.tokens(), builder.loss_mask()))
    return rows


def rollout_batch(rows, pad_id: int, seed: int = 0) -> RolloutBatch:
    length = -(-max(len(t) for t, _ in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.float32)
    for row, (ids, loss_mask) in enumerate(rows):
        tokens[row, : len(ids)] = ids
        mask[row, : len(loss_mask)] = loss_mask
    advantages = np.random.default_rng(seed).choice([-1.0, 1.0], len(rows)).astype(np.float32)
    return RolloutBatch(tokens=tokens, mask=mask, advantages=advantages, old_logp=mask * -1.0)


def run(out_path: str) -> dict:
    config = feedback_dapo.get_config()
    settings = settings_from_config(config)
    world = data.load_world(settings.data_dir)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_world_tokenizer(
            settings.data_dir,
            folder,
            config.model.tokenizer_vocab_size,
            tools.TOOL_SCHEMAS,
            num_episodes=config.model.tokenizer_episodes,
            max_digits=config.model.tokenizer_max_digits,
        )
    mesh = sharding.make_mesh(settings.mesh)
    model_config = ModelConfig.preset(config.model.preset, vocab_size=len(tokenizer))
    batches = {
        layout: rollout_batch(episodes(world, tokenizer, layout), tokenizer.pad_token_id)
        for layout in LAYOUTS
    }
    learners = {
        layout: Learner(
            settings.train, sharding.create_sharded_model(model_config, mesh, nnx.Rngs(0)), mesh
        )
        for layout in LAYOUTS
    }
    shapes = {}
    for layout, batch in batches.items():
        shapes[layout] = {
            "rows": int(batch.tokens.shape[0]),
            "padded_length": int(batch.tokens.shape[1]),
            "shared_prefix_tokens": int(common_prefix_length(batch.tokens, batch.mask)),
            "trained_tokens": int(batch.mask.sum()),
        }
        learners[layout].update(batch, jax.random.key(0))  # compile
    seconds = {layout: [] for layout in LAYOUTS}
    for round_ in range(ROUNDS):
        for layout in LAYOUTS:
            start = time.perf_counter()
            learners[layout].update(batches[layout], jax.random.key(round_ + 1))
            seconds[layout].append(time.perf_counter() - start)
    best = {layout: min(times) for layout, times in seconds.items()}
    results = {
        "setup": {
            "model": config.model.preset,
            "groups": GROUPS,
            "group_size": GROUP_SIZE,
            "rounds": ROUNDS,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
        },
        "batches": shapes,
        "update_s": {
            layout: {"best": best[layout], "rounds": seconds[layout]} for layout in LAYOUTS
        },
        "update_vs_baseline": {
            layout: best[layout] / best["baseline"] for layout in LAYOUTS if layout != "baseline"
        },
        "critique_turn_speedup_vs_in_system": best["critique_in_system"] / best["critique_turn"],
    }
    write_json_atomic(out_path, results)
    return results
