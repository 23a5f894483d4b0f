"""The sampler and the learner in a closed loop climb a reward that needs the prompt.

Every other RL test checks one piece against a reference (a loss, an advantage, a
gradient). This one checks that the pieces point the same way: rollouts drawn by the
in-process sampler (`ctu.sampling.session`), their behaviour log-probs, group
advantages (`ctu.rl.advantages`) and DAPO updates (`ctu.rl.train_step.Learner`, two
mini-batch steps per batch, so the second is off-policy and clipped) together raise the
mean reward of a contextual bandit from chance, and the same loop with the advantages
negated drives it below chance. The sampler's log-probs are the behaviour policy's and
must equal the learner's for the same tokens. A sign error, a one-token shift between
the sampler's tokens and the learner's log-probs, or rewards credited to the wrong
group fails it.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from ctu import sharding
from ctu.rl import advantages as advantages_lib
from ctu.rl import train_step
from ctu.rl.optim import OptimConfig
from ctu.sampling.session import Session
from ctu.sampling.settings import SamplingConfig
from tests import resume_worker

PROMPT_LEN = 4
NEW_TOKENS = 3
GROUP_SIZE = 8
CLASSES = 4  # a token t answers class t % CLASSES
# One prompt per class: a policy that ignores the prompt scores 1 / CLASSES at best.
PROMPTS = np.array([[5, 17, 33, 2], [42, 9, 100, 64], [71, 3, 88, 120], [12, 50, 7, 99]])
TARGETS = np.arange(len(PROMPTS)) % CLASSES
STEPS = 20


def _rewards(generated: np.ndarray) -> np.ndarray:
    """[groups, group_size, NEW_TOKENS] tokens -> [groups, group_size] rewards in [0, 1]."""
    return (generated % CLASSES == TARGETS[:, None, None]).mean(-1)


def _only_tokens(tokens: np.ndarray) -> train_step.RolloutBatch:
    zeros = np.zeros(tokens.shape, np.float32)
    return train_step.RolloutBatch(
        tokens=tokens, mask=zeros, advantages=zeros[:, 0], old_logp=zeros
    )


def _run(sign: float) -> list[float]:
    """Mean reward of each step's rollouts, training on `sign` x the advantages."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = sharding.create_sharded_model(resume_worker.tiny_model_config(), mesh, nnx.Rngs(0))
    config = train_step.TrainConfig(
        loss="dapo",
        num_mini_batches=2,
        # The sampler's log-probs are the behaviour policy's, as they are for guided rows
        # and for vLLM rollouts: a misalignment between them and the learner's shows.
        recompute_old_logp=False,
        optim=OptimConfig(learning_rate=1e-2, eps=1e-6, warmup_steps=0),
    )
    learner = train_step.Learner(config, model, mesh)
    rows = len(PROMPTS) * GROUP_SIZE
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    length = PROMPT_LEN + NEW_TOKENS + 1  # one pad column: a multiple of 8
    prompts = np.repeat(PROMPTS, GROUP_SIZE, axis=0)
    rng = jax.random.key(0)
    mean_rewards = []
    for _ in range(STEPS):
        rng, sample_key, update_key = jax.random.split(rng, 3)
        session = Session(
            learner.model,
            batch_size=rows,
            max_len=length,
            sampling=sampling,
            min_kv_window=length,
            shared_prefix_multiple=0,
            mesh=mesh,
        )
        out = session.generate(list(prompts), learner.model, sample_key)
        assert (out.num_tokens == NEW_TOKENS).all()
        generated = out.tokens[:rows, :NEW_TOKENS]
        rewards = _rewards(generated.reshape(len(PROMPTS), GROUP_SIZE, NEW_TOKENS))
        mean_rewards.append(float(rewards.mean()))

        tokens = np.zeros((rows, length), np.int32)
        tokens[:, :PROMPT_LEN] = prompts
        tokens[:, PROMPT_LEN : PROMPT_LEN + NEW_TOKENS] = generated
        mask = np.zeros((rows, length), np.float32)
        mask[:, PROMPT_LEN : PROMPT_LEN + NEW_TOKENS] = 1.0
        old_logp = np.zeros((rows, length), np.float32)
        old_logp[:, PROMPT_LEN : PROMPT_LEN + NEW_TOKENS] = out.logprobs[:rows, :NEW_TOKENS]
        # What the sampler reported is what the learner computes for the same tokens.
        learner_logp, _ = learner.compute_logp(learner.shard_batch(_only_tokens(tokens)).tokens)
        np.testing.assert_allclose(np.asarray(learner_logp) * mask, old_logp, atol=1e-4)
        advantages = np.asarray(advantages_lib.group_advantages("grpo", rewards)).reshape(-1)
        batch = train_step.RolloutBatch(
            tokens=tokens, mask=mask, advantages=sign * advantages, old_logp=old_logp
        )
        metrics = learner.update(batch, update_key)
        assert metrics["nonfinite"] == 0
    return mean_rewards


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["ascends", "negated_descends"])
def test_sampler_and_learner_climb_a_contextual_reward(sign):
    chance = 1.0 / CLASSES
    history = _run(sign)
    start, end = np.mean(history[:2]), np.mean(history[-3:])
    assert abs(start - chance) < 0.15, history  # an untrained policy is near chance
    if sign > 0:
        assert end > 0.9, history
    else:
        assert end < 0.05, history
