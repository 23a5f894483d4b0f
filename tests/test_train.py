"""The training program: settings validation, data order, batching, and an
end-to-end smoke run that checkpoints and resumes."""

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest

from configs import baseline_dapo, feedback_dapo, grpo
from ctu import demonstrations, run_config, train
from ctu.analysis import grad_noise, policy_loading
from ctu.metrics import read_jsonl
from ctu.rl import batching
from ctu.rollout.records import TURN_KINDS
from ctu.text.conversation import agent_spans
from ctu.world import data
from tests import toys

# ---- settings ----------------------------------------------------------------------


@pytest.mark.parametrize("module", [feedback_dapo, baseline_dapo, grpo])
@pytest.mark.parametrize("variant", [None, "smoke", "smoke,model=qwen3_0p6b,seed=2"])
def test_every_config_reads_into_valid_settings(module, variant):
    settings = run_config.settings_from_config(module.get_config(variant))
    assert settings.train.loss == module.get_config(variant).algorithm.loss
    assert settings.rollout.groups.num_rollouts == module.get_config(variant).rollout.group_size


def test_dr_grpo_divides_by_the_rollout_budget_whatever_the_padding():
    """Dr. GRPO's normaliser is a constant generation budget: the most tokens a rollout
    can sample, not the batch's padded length, so padding a batch changes nothing."""
    from ctu.rl import losses

    config = feedback_dapo.get_config()
    config.algorithm.loss = "dr_grpo"
    settings = run_config.settings_from_config(config)
    roll = config.rollout
    budget = min(roll.max_turns * roll.max_new_tokens, roll.max_total_tokens)
    assert settings.train.loss_settings["max_length"] == budget
    rng = np.random.default_rng(0)
    logp = rng.normal(-2, 0.1, (4, 100)).astype(np.float32)
    mask = np.zeros((4, 100), np.float32)
    mask[:, 20:60] = 1
    advantages = np.array([1.0, 1.0, 0.5, -0.5], np.float32)

    def loss(length):
        pad = ((0, 0), (0, length - 100))
        return losses.policy_loss(
            "dr_grpo",
            logp=np.pad(logp, pad),
            old_logp=np.pad(logp - 0.05, pad),
            advantages=advantages,
            mask=np.pad(mask, pad),
            **settings.train.loss_settings,
        )[0]

    assert float(loss(128)) == pytest.approx(float(loss(256)), rel=1e-6)
    assert float(loss(128)) != 0.0


def test_baseline_differs_from_feedback_only_in_feedback():
    def flat(config):
        return dict(_flatten(config.to_dict()))

    a, b = flat(feedback_dapo.get_config()), flat(baseline_dapo.get_config())
    assert {k for k in a if a[k] != b[k]} == {"algorithm.feedback_guidance.enable"}


def _flatten(d, prefix=""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_a_saved_config_without_the_llm_keys_still_reads():
    """Runs saved before the LLM critic's keys existed can still be evaluated."""
    config = feedback_dapo.get_config()
    fg = config.algorithm.feedback_guidance
    old = {k: v for k, v in fg.items() if not k.startswith("llm_")}
    config.algorithm.feedback_guidance = type(fg)(old)
    settings = run_config.settings_from_config(config)
    assert settings.algorithm.feedback.llm_base_url == ""
    assert settings == run_config.settings_from_config(feedback_dapo.get_config())


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("algorithm.feedback_guidance.accumulation_mode", "most", "accumulation_mode"),
        ("algorithm.advantage", "ppo", "algorithm.advantage"),
        ("algorithm.credit", "turn", "algorithm.credit"),
        ("algorithm.credit_lambda", 1.5, "credit_lambda"),
        ("algorithm.learner_support", "nucleus", "algorithm.learner_support"),
        ("rollout.engine", "sglang", "rollout.engine"),
        ("rollout.vllm_gpu_memory_utilization", 0.97, "vllm_gpu_memory_utilization"),
        ("rollout.cpu_devices", -1, "cpu_devices"),
        ("mesh.data", 2, "rollout.cpu_devices=1"),
        ("backend", "fpga", "backend"),
        ("model.init", "s3://bucket", "model.init"),
        ("optimizer.learning_rate", -1.0, "learning_rate"),
        ("algorithm.loss", "ppo", "ppo"),
        ("warm_start.feedback_demo_fraction", 2.0, "feedback_demo_fraction"),
        ("rollout.group_size", 0, "num_rollouts"),
        ("warm_start.induction_steps", -1, "induction_steps"),
        ("warm_start.induction_task", "lookup", "induction_task"),
        ("eval.split", "validaton", "eval.split"),
        ("eval.num_tasks", 0, "eval.num_tasks"),
        ("algorithm.feedback_guidance.use_llm_enhancement", True, "llm_base_url"),
        ("rollout.group_size", 1, "rollout.group_size=1"),
        ("algorithm.feedback_guidance.start_rollout", 9, "start_rollout=9 is past"),
    ],
)
def test_bad_values_are_errors_that_name_the_key(key, value, match):
    config = feedback_dapo.get_config()
    section = config
    *path, last = key.split(".")
    for name in path:
        section = section[name]
    section[last] = value
    with pytest.raises(ValueError, match=match):
        run_config.settings_from_config(config)


@pytest.mark.parametrize("cpu_devices", [1, 2])
def test_the_sampler_gets_cpu_devices_of_its_own(tmp_path, cpu_devices):
    config = feedback_dapo.get_config("smoke")
    config.rollout.cpu_devices = cpu_devices
    s = train.setup(config, str(tmp_path))
    if cpu_devices == 1:  # both on config.mesh: all the devices there are
        assert s.sampler_mesh is s.mesh and s.mesh.size == jax.device_count()
    else:
        assert s.mesh.devices.ravel().tolist() == jax.devices()[:1]
        assert s.sampler_mesh.devices.ravel().tolist() == jax.devices()[:2]
        assert s.sampler_mesh.shape["data"] == 2


def test_the_learner_takes_the_rollout_temperature():
    config = feedback_dapo.get_config()
    config.rollout.temperature = 0.7
    assert run_config.settings_from_config(config).train.temperature == 0.7
    config.rollout.temperature = 0.0  # greedy rollouts report the raw log-probs
    assert run_config.settings_from_config(config).train.temperature == 1.0


def test_smear_is_for_presets_trained_from_scratch():
    config = feedback_dapo.get_config()
    config.model.smear = 2
    assert run_config.settings_from_config(config).model["smear"] == 2
    config.model.smear = -1
    with pytest.raises(ValueError, match="model.smear=-1: the number of preceding tokens"):
        run_config.settings_from_config(config)
    config.model.smear = 1
    config.model.init = "hf:/some/checkpoint"
    with pytest.raises(ValueError, match="model.smear=1 with model.init='hf:/some/checkpoint'"):
        run_config.settings_from_config(config)


def test_default_turn_limit_fits_every_heuristic_turn(tmp_path):
    """Every assistant turn the warm start demonstrates on the shipped world, with the
    run's own tokenizer, fits the rollouts' per-turn limit: a call cut off mid-JSON
    cannot succeed, so a shorter limit silently caps success (at 80 tokens it capped
    the heuristic's own val successes at 43 of 62)."""
    settings = run_config.settings_from_config(feedback_dapo.get_config())
    tokenizer = train._tokenizer(settings, str(tmp_path))
    world = data.load_world(settings.data_dir)
    demos = demonstrations.heuristic_demonstrations(
        world,
        world.split("train") + world.split("val"),
        tokenizer,
        settings.warm_start,
        settings.algorithm.feedback,
    )
    turns = [end - start for d in demos for start, end in agent_spans(d.loss_mask)]
    assert len(turns) > 5 * len(demos)
    assert max(turns) <= settings.rollout.sampling.max_new_tokens


def test_unknown_keys_and_variants_are_refused():
    config = feedback_dapo.get_config()
    config.lock()
    with pytest.raises(AttributeError):
        config.algorithm.feedback_guidance.enabel = False
    with pytest.raises(ValueError, match="unknown config variant"):
        feedback_dapo.get_config("smoek")


# ---- data order --------------------------------------------------------------------


def test_task_stream_resumes_where_it_stopped_and_covers_each_epoch():
    ids = [f"t{i}" for i in range(7)]
    full = [t for _, t in itertools.islice(train.task_stream(ids, 3, 0), 21)]
    for epoch in range(3):
        assert sorted(full[epoch * 7 : (epoch + 1) * 7]) == sorted(ids)
    stream = train.task_stream(ids, 3, 0)
    position = None
    for _ in range(10):
        position, _ = next(stream)
    resumed = [t for _, t in itertools.islice(train.task_stream(ids, 3, position), 11)]
    assert resumed == full[10:]
    assert full != [t for _, t in itertools.islice(train.task_stream(ids, 4, 0), 21)]


def test_rollout_metrics_split_first_tries_from_guided_rollouts():
    def episode(rollout, guided, success, failures, turns, failure_type="missing_auth"):
        return types.SimpleNamespace(
            rollout=rollout,
            guided=guided,
            success=success,
            reward=float(success),
            failure_type="success" if success else failure_type,
            num_parse_failures=failures,
            num_turns=turns,
            num_sampled_tokens=10,
            truncated=False,
        )

    groups = [
        [episode(1, False, 1, 0, 4), episode(2, True, 0, 3, 3), episode(3, True, 1, 1, 5)],
        [episode(1, False, 0, 2, 2), episode(2, True, 0, 2, 2, "over_collection")]
        + [episode(3, True, 0, 0, 4)],
    ]
    out = train.rollout_metrics(groups, group_size=3, start_rollout=2)
    failures = {k: v for k, v in out.items() if k.startswith("failure/")}
    assert failures == {"failure/missing_auth": 3 / 6, "failure/over_collection": 1 / 6}
    assert out["parse_failure_rate"] == pytest.approx(8 / 20)
    assert out["parse_failure_rate/first_try"] == pytest.approx(2 / 6)
    assert out["parse_failure_rate/with_feedback"] == pytest.approx(6 / 14)
    assert out["success/first_try"] == 0.5 and out["success/with_feedback"] == 0.25
    assert [out[f"success_at_rollout/{k}"] for k in (1, 2, 3)] == [0.5, 0.0, 0.5]
    plain = train.rollout_metrics([[g[0]] for g in groups], group_size=3)
    assert "parse_failure_rate/with_feedback" not in plain and "success_at_rollout/2" not in plain
    # A rollout with no critique because every earlier one succeeded is no first try:
    # its task is an easy one. Groups not eligible for feedback (mix) are all first tries.
    easy = [episode(1, False, 1, 0, 4), episode(2, False, 1, 0, 4), episode(3, True, 0, 0, 4)]
    hard = [episode(k, False, 0, 0, 4) for k in (1, 2, 3)]
    out = train.rollout_metrics(
        [easy, hard], group_size=3, start_rollout=2, feedback_groups=[True, False]
    )
    assert out["success/first_try"] == 0.25  # easy's first and hard's three
    assert out["success/unguided_later"] == 1.0 and out["success/with_feedback"] == 0.0
    baseline = train.rollout_metrics([easy[:2], hard], group_size=3)  # feedback off
    assert baseline["success/first_try"] == 0.4 and "success/unguided_later" not in baseline


# ---- batching ----------------------------------------------------------------------


@dataclasses.dataclass
class FakeRecord:
    tokens: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    original_tokens: np.ndarray
    original_loss_mask: np.ndarray
    original_logprobs: np.ndarray
    reward: float
    guided: bool
    truncated: bool = False
    turn_scores: tuple = ()
    kinds: tuple = ()

    def turn_kinds(self):
        return self.kinds

    @property
    def success(self):
        return self.reward >= 1.0

    @property
    def num_sampled_tokens(self):
        return int(self.loss_mask.sum())


def _record(rng, reward, guided, length=20, prompt=5, extra_prompt=3):
    def arrays(n_prompt):
        n = n_prompt + length
        mask = np.zeros(n, np.int32)
        mask[n_prompt:] = rng.integers(0, 2, length)
        return rng.integers(9, 100, n), mask, rng.normal(size=n).astype(np.float32) * mask

    tokens, mask, logp = arrays(prompt + (extra_prompt if guided else 0))
    otokens, omask, ologp = arrays(prompt) if guided else (tokens, mask, logp)
    return FakeRecord(tokens, mask, logp, otokens, omask, ologp, reward, guided)


def _settings(**feedback):
    config = feedback_dapo.get_config()
    for key, value in feedback.items():
        config.algorithm.feedback_guidance[key] = value
    config.algorithm.overlong.enable = False
    return run_config.settings_from_config(config).algorithm


@pytest.mark.parametrize("context", ["augmented", "original"])
def test_build_batch_rows_advantages_and_context(context):
    rng = np.random.default_rng(0)
    rewards = [[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]]
    groups = [[_record(rng, r, guided=k > 0) for k, r in enumerate(group)] for group in rewards]
    batch, stats = batching.build_batch(
        groups, settings=_settings(training_context=context), rows_multiple=4, pad_id=0
    )
    assert batch.tokens.shape[0] == 8 and batch.tokens.shape[1] % batching.LENGTH_BUCKET == 0
    assert stats["batch/padded_rows"] == 2
    # Group-normalised advantages, per group, zero on padding rows.
    r = np.array(rewards)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(batch.advantages[:6], expected.reshape(-1), rtol=1e-5)
    assert not batch.mask[6:].any() and not batch.advantages[6:].any()
    for row, record in enumerate(r for g in groups for r in g):
        original = context == "original" and record.guided
        ids = record.original_tokens if original else record.tokens
        mask = record.original_loss_mask if original else record.loss_mask
        np.testing.assert_array_equal(batch.tokens[row, : len(ids)], ids)
        np.testing.assert_array_equal(batch.mask[row, : len(ids)], mask)
        assert not batch.mask[row, len(ids) :].any()
    if context == "original":
        np.testing.assert_array_equal(batch.guided[:6], [0, 1, 1, 0, 1, 1])
    else:
        assert batch.guided is None


@pytest.mark.parametrize("credit", ["episode", "progress"])
def test_turn_weights_scale_each_kind_of_turn(credit):
    mask = np.array([0, 1, 1, 0, 1, 0, 1, 1], np.int32)
    kinds = ("search_company", "malformed", "make_phone_call")
    group = [
        FakeRecord(np.arange(8), mask, mask * -0.5, np.arange(8), mask, mask * -0.5, r, False)
        for r in (1.0, 0.0)
    ]
    for r in group:
        r.turn_scores, r.kinds = (0.0, 0.0, 0.1), kinds
    plain = dataclasses.replace(_settings(), credit=credit)
    weights = {**plain.turn_weights, "malformed": 0.0, "make_phone_call": 2.0}
    weighted = dataclasses.replace(plain, turn_weights=weights)
    base, _ = batching.build_batch([group], settings=plain, rows_multiple=1, pad_id=0)
    batch, _ = batching.build_batch([group], settings=weighted, rows_multiple=1, pad_id=0)
    full = base.advantages if base.advantages.ndim == 2 else base.advantages[:, None] * base.mask
    factor = np.array([0, 1, 1, 0, 0, 0, 2, 2], np.float32)
    np.testing.assert_allclose(batch.advantages[:, :8], full[:, :8] * factor, atol=1e-6)
    assert np.all(full[:, 1:3] != 0)
    bad = feedback_dapo.get_config()
    bad.algorithm.turn_weights.malformed = -1.0
    with pytest.raises(ValueError, match="weights must be >= 0"):
        run_config.settings_from_config(bad)


def test_progress_credit_needs_the_score():
    config = feedback_dapo.get_config()
    config.algorithm.credit, config.algorithm.reward = "progress", "success"
    with pytest.raises(ValueError, match="credit=progress .* algorithm.reward='success'"):
        run_config.settings_from_config(config)


def test_reward_success_trains_on_task_success_alone():
    rng = np.random.default_rng(2)
    scores = [[1.0, 0.0, 0.5, 1.0], [0.2, 0.2, 0.8, 0.5]]
    groups = [[_record(rng, r, guided=False) for r in group] for group in scores]
    settings = dataclasses.replace(_settings(), reward="success")
    assert batching.shaped_rewards(groups, settings=settings).tolist() == [[1, 0, 0, 1], [0] * 4]
    batch, _ = batching.build_batch(groups, settings=settings, rows_multiple=1, pad_id=0)
    np.testing.assert_allclose(batch.advantages, [1, -1, -1, 1, 0, 0, 0, 0], atol=1e-5)
    # The score: the second group's partial credit carries signal.
    scored, _ = batching.build_batch(groups, settings=_settings(), rows_multiple=1, pad_id=0)
    assert np.all(scored.advantages[4:6] < 0) and np.all(scored.advantages[6:] > 0)


def test_progress_credit_gives_each_turn_its_own_advantage():
    # Two rollouts of two turns (mask runs), rewards 1 and 0, scores 0.3 and 0.2 when
    # their second turns began: still to come 1, 0.7 and 0, -0.2; the turn means 0.5 and
    # 0.25, the rewards' std 0.5.
    def record(reward, scores, mask):
        mask = np.array(mask, np.int32)
        ids = np.arange(10, 10 + len(mask))
        return FakeRecord(ids, mask, mask * -0.5, ids, mask, mask * -0.5, reward, False)

    group = [record(1.0, (0.0, 0.3), [0, 1, 1, 0, 1]), record(0.0, (0.0, 0.2), [0, 0, 1, 0, 1, 1])]
    for r, scores in zip(group, [(0.0, 0.3), (0.0, 0.2)], strict=True):
        r.turn_scores = scores
    settings = dataclasses.replace(_settings(), credit="progress")
    batch, _ = batching.build_batch([group], settings=settings, rows_multiple=4, pad_id=0)
    assert batch.advantages.shape == batch.tokens.shape
    np.testing.assert_allclose(batch.advantages[0, :6], [0, 1, 1, 0, 0.9, 0], atol=1e-5)
    np.testing.assert_allclose(batch.advantages[1, :6], [0, 0, -1, 0, -0.9, -0.9], atol=1e-5)
    assert not batch.advantages[:, 6:].any() and not batch.advantages[2:].any()
    episode, _ = batching.build_batch([group], settings=_settings(), rows_multiple=4, pad_id=0)
    np.testing.assert_allclose(episode.advantages[:2], [1, -1], atol=1e-5)
    group[1].turn_scores = (0.0,)
    with pytest.raises(ValueError, match="2 sampled turns but the rollout records 1"):
        batching.build_batch([group], settings=settings, rows_multiple=1, pad_id=0)


def test_overlong_penalty_and_truncation_mask_enter_the_batch():
    rng = np.random.default_rng(1)
    config = feedback_dapo.get_config()
    config.algorithm.overlong.max_length = 12
    config.algorithm.overlong.cache_length = 4
    config.algorithm.overlong.mask_truncated = True
    settings = run_config.settings_from_config(config).algorithm
    group = [_record(rng, 1.0, False, length=30), _record(rng, 1.0, False, length=30)]
    group[1].truncated = True
    lengths = [r.num_sampled_tokens for r in group]
    shaped = batching.shaped_rewards([group], settings=settings)
    for value, length in zip(shaped[0], lengths, strict=True):
        penalty = 0.0 if length <= 8 else (-1.0 if length > 12 else (8 - length) / 4)
        assert value == pytest.approx(1.0 + penalty)
    batch, _ = batching.build_batch([group], settings=settings, rows_multiple=1, pad_id=0)
    assert batch.mask[0].sum() == lengths[0] and batch.mask[1].sum() == 0


@pytest.mark.parametrize("bucket", [1, 7, 512])
def test_batch_length_is_the_smallest_multiple_of_the_bucket(bucket):
    rng = np.random.default_rng(bucket)
    group = [_record(rng, 1.0, False, length=int(n)) for n in rng.integers(5, 600, 3)]
    longest = max(len(r.tokens) for r in group)
    batch, _ = batching.build_batch(
        [group], settings=_settings(), rows_multiple=1, pad_id=0, length_multiple=bucket
    )
    length = batch.tokens.shape[1]
    assert length % bucket == 0 and length - bucket < longest <= length
    config = feedback_dapo.get_config()
    config.optimizer.length_bucket = 0
    with pytest.raises(ValueError, match="length_bucket must be a positive int"):
        run_config.settings_from_config(config)


# ---- end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke"))
    config = feedback_dapo.get_config("smoke")
    config.total_steps = 2
    first = train.train_and_evaluate(config, workdir)
    return config, workdir, first


def test_smoke_run_writes_finite_metrics_checkpoints_and_warm_start(smoke_run):
    config, workdir, last = smoke_run
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = {row["step"] for row in rows}
    assert {0, 1, 2} <= steps
    assert any("val/success" in row and row["step"] == 0 for row in rows)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    with open(os.path.join(workdir, "warm_start", "config.json")) as f:
        assert json.load(f)["ctu_smear"] == 6  # the tiny preset's default, saved for from_hf
    warm_rows = read_jsonl(os.path.join(workdir, "warm_start_logs", "metrics.jsonl"))
    assert [r["step"] for r in warm_rows if "warm_start/copy_task_loss" in r] == [3]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["rollout"]["group_size"] == config.rollout.group_size
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_grad_noise_measures_a_run_end_to_end(smoke_run, monkeypatch):
    """`grad_noise.measure` on the smoke run's warm start: its config, policy, sampler,
    filter, per-group gradients and the by-turn split. The smoke policy's rollouts
    rarely differ in reward, so each sampled rollout's reward is replaced by one drawn
    from its own tokens (deterministic, so a rerun samples the same groups)."""
    _, workdir, _ = smoke_run

    class Relabelled(train.GroupSampler):
        def __call__(self, count):
            return [
                [dataclasses.replace(r, reward=int(np.sum(r.tokens)) % 5 / 4) for r in g]
                for g in super().__call__(count)
            ]

    monkeypatch.setattr(train, "GroupSampler", Relabelled)
    result = grad_noise.measure(workdir, num_groups=3, by_turn=True, log=lambda _: None)
    config = run_config.settings_from_config(feedback_dapo.get_config("smoke"))
    assert result["policy"] == "warm_start" and result["groups_with_signal"] == 3
    assert result["groups_sampled"] % config.rollout.tasks_per_step == 0
    assert (
        result["num_params"]
        == train.setup(feedback_dapo.get_config("smoke"), workdir).model_config.num_params()
    )
    assert result["noise_trace"] > 0
    signal = result["signal_sq_norm"]
    assert result["b_noise"] == (result["noise_trace"] / signal if signal > 0 else math.inf)
    kinds = result["by_turn_kind"]
    for share in ("signal_share", "noise_share", "token_share"):
        assert sum(k[share] for k in kinds.values()) == pytest.approx(1.0)
    # The same seed samples the same groups; a setting that changes only the loss
    # changes the gradients measured on them.
    again = grad_noise.measure(workdir, num_groups=3, log=lambda _: None)
    assert again["noise_trace"] == pytest.approx(result["noise_trace"], rel=1e-5)
    # Every turn's advantage halved: the same groups, a quarter of the noise and signal.
    half = [f"algorithm.turn_weights.{k}=0.5" for k in TURN_KINDS]
    halved = grad_noise.measure(workdir, num_groups=3, overrides=half, log=lambda _: None)
    assert halved["groups_sampled"] == result["groups_sampled"]
    assert halved["noise_trace"] == pytest.approx(result["noise_trace"] / 4, rel=1e-4)
    assert halved["b_noise"] == pytest.approx(result["b_noise"], rel=1e-3)
    # Settings under which nothing is trained: a clear error, not a division by zero.
    none = [f"algorithm.turn_weights.{k}=0" for k in TURN_KINDS]
    with pytest.raises(RuntimeError, match="gradient is zero"):
        grad_noise.measure(workdir, num_groups=3, overrides=none, log=lambda _: None)


def test_smoke_run_resumes_from_its_workdir(smoke_run):
    config, workdir, _ = smoke_run
    warm_start = os.path.join(workdir, "warm_start", "model.safetensors")
    before = os.stat(warm_start).st_mtime_ns
    config = config.copy_and_resolve_references()
    config.total_steps = 3
    last = train.train_and_evaluate(config, workdir)
    assert math.isfinite(last["loss"])
    assert os.stat(warm_start).st_mtime_ns == before  # reused, not retrained
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [row["step"] for row in rows if "loss" in row]
    assert train_rows == [1, 2, 3]  # step 3 only was added; nothing repeated
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_resuming_under_a_config_that_trains_something_else_is_refused(smoke_run):
    """Only how long a run goes, and what it evaluates and logs, may change on resume;
    the refusal names the key and leaves the workdir as it was."""
    config, workdir, _ = smoke_run
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        saved = f.read()
    changed = config.copy_and_resolve_references()
    changed.total_steps, changed.eval.num_tasks = 99, 2  # may change
    changed.algorithm.eps_high = 0.5
    with pytest.raises(ValueError, match=r"algorithm\.eps_high: 0\.28 -> 0\.5"):
        train.train_and_evaluate(changed, workdir)
    with open(path) as f:
        assert f.read() == saved
    train.check_resumable(changed, workdir, allow_config_change=True)  # logs instead


def test_a_setting_newer_than_the_saved_config_counts_as_its_default(smoke_run, tmp_path):
    """A run whose config.json predates a setting ran as its default does: resuming it
    with the default is fine, with another value refused."""
    config, workdir, _ = smoke_run
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    del saved["algorithm"]["reward"]  # as an older ctu wrote it
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    train.check_resumable(config, str(tmp_path))  # reward=score, the default
    changed = config.copy_and_resolve_references()
    changed.algorithm.reward = "success"
    with pytest.raises(ValueError, match=r"algorithm\.reward: 'score' -> 'success'"):
        train.check_resumable(changed, str(tmp_path))


def _workdir_without_checkpoints(smoke_run, tmp_path):
    _, workdir, _ = smoke_run
    for name in ("tokenizer", "warm_start", "warm_start_logs"):
        shutil.copytree(os.path.join(workdir, name), tmp_path / name)
    return str(tmp_path)


def test_a_warm_start_is_reused_only_under_its_own_settings(smoke_run, tmp_path):
    config = smoke_run[0].copy_and_resolve_references()
    workdir = _workdir_without_checkpoints(smoke_run, tmp_path)
    logs = os.path.join(workdir, "warm_start_logs", "metrics.jsonl")
    rows = read_jsonl(logs)
    weights = os.path.join(workdir, "warm_start", "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    train.run_sft(config, workdir)  # the same settings: reused, its logs kept
    assert os.stat(weights).st_mtime_ns == before
    assert read_jsonl(logs) == rows and rows
    # A later launch.sft on a workdir that has a config keeps it: a run trained there
    # is resumed against its own; the warm start's record is in its logs.
    with open(os.path.join(workdir, "config.json")) as f:
        saved = f.read()
    changed = config.copy_and_resolve_references()
    changed.optimizer.learning_rate = 1.0  # not a warm-start setting: reused
    train.run_sft(changed, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == saved
    with open(os.path.join(workdir, "warm_start_logs", "config.json")) as f:
        assert json.load(f)["optimizer"]["learning_rate"] == 1.0
    changed = config.copy_and_resolve_references()
    changed.warm_start.steps = 5
    with pytest.raises(ValueError, match=r"warm_start\.steps: 2 -> 5.*delete"):
        train.run_sft(changed, workdir)
    changed = config.copy_and_resolve_references()
    changed.warm_start.turn_weights.respond = 0.0
    with pytest.raises(ValueError, match=r"turn_weights\.respond: '<absent>' -> 0\.0"):
        train.run_sft(changed, workdir)
    # Allowed (launch.train --allow_config_change): reused, with a warning.
    train._warm_start(train.setup(changed, workdir), allow_other_settings=True)
    changed = config.copy_and_resolve_references()
    changed.model.tokenizer_vocab_size = 1024  # the workdir's tokenizer has other settings
    with pytest.raises(ValueError, match=r"tokenizer_vocab_size: 2048 -> 1024"):
        train.run_sft(changed, workdir)
    assert os.stat(weights).st_mtime_ns == before


def test_a_checkpoint_comes_with_its_own_tokenizer(smoke_run, tmp_path):
    """model.init=hf:PATH reads PATH's tokenizer, never one built from the world; a
    checkpoint without one is an error naming model.tokenizer."""
    config, workdir, _ = smoke_run
    checkpoint = os.path.join(workdir, "warm_start")
    settings = run_config.settings_from_config(config)
    model = dict(settings.model, init=f"hf:{checkpoint}", smear=0)
    tokenizer = train._tokenizer(dataclasses.replace(settings, model=model), str(tmp_path))
    saved = train.load_tokenizer(checkpoint)
    assert tokenizer.get_vocab() == saved.get_vocab()
    assert not os.path.exists(tmp_path / "tokenizer")  # nothing was built
    # Loading the run's policy later finds the same tokenizer by the same rule.
    settings_hf = dataclasses.replace(settings, model=model)
    loaded = policy_loading._run_tokenizer(str(tmp_path), settings_hf)
    assert loaded.get_vocab() == saved.get_vocab()
    bare = tmp_path / "bare"
    bare.mkdir()
    model = dict(settings.model, init=f"hf:{bare}", smear=0)
    with pytest.raises(ValueError, match="model.tokenizer"):
        train._tokenizer(dataclasses.replace(settings, model=model), str(tmp_path))
    # An older ctu built a world tokenizer for hf: runs too; such a workdir keeps it.
    older = tmp_path / "older"
    shutil.copytree(os.path.join(workdir, "tokenizer"), older / "tokenizer")
    settings_old = dataclasses.replace(settings, model=model)
    built = train.load_tokenizer(str(older / "tokenizer"))
    for found in (
        train._tokenizer(settings_old, str(older)),
        policy_loading._run_tokenizer(str(older), settings_old),
    ):
        assert found.get_vocab() == built.get_vocab()


def test_the_evaluation_is_named_by_its_split(monkeypatch):
    result = {"success_rate": 0.5, "mean_score": 0.7, "per_level_success": {1: 1.0}}
    monkeypatch.setattr(train.rollout_eval, "evaluate_model", lambda *a, **k: result)
    written = []
    writer = types.SimpleNamespace(write_scalars=lambda step, scalars: written.append(scalars))
    settings = types.SimpleNamespace(
        eval_split="test", eval_num_tasks=2, seed=0, rollout=types.SimpleNamespace(runner=None)
    )
    s = types.SimpleNamespace(settings=settings, world=toys.shipped_world(), tokenizer=None)
    train.evaluate(s, None, 4, writer)
    assert written == [{"test/success": 0.5, "test/score": 0.7, "test/success_level_1": 1.0}]


def test_a_resumed_run_keeps_the_warm_start_as_its_kl_reference(tmp_path, monkeypatch):
    """GRPO pays a KL to the policy RL began from. A resumed run restores the policy from
    its checkpoint, and its reference must still be the warm start, not the untrained
    model the workdir's run was set up with."""
    references = []

    class Recording(train.Learner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            references.append([np.asarray(x) for x in jax.tree.leaves(self.reference)])

    monkeypatch.setattr(train, "Learner", Recording)
    config = grpo.get_config("smoke")
    config.total_steps = 1
    train.train_and_evaluate(config, str(tmp_path))
    config.total_steps = 2
    train.train_and_evaluate(config, str(tmp_path))
    assert len(references) == 2
    for fresh, resumed in zip(*references, strict=True):
        np.testing.assert_array_equal(resumed, fresh)


def test_smoke_run_of_a_plain_model_without_the_copy_task(tmp_path):
    """The default smoke run has the smear and the copy task (the tiny preset's
    defaults); this one has neither, as a pretrained model would: a plain warm start
    saved and reloaded by the HF loader, rollouts and updates; and learner and sampler
    share one mesh. Its critiques are rewritten by an LLM endpoint (a local stand-in),
    and it trains with per-turn credit."""
    config = feedback_dapo.get_config("smoke")
    assert config.model.smear == 6 and config.warm_start.induction_steps == 3
    config.total_steps = 1
    config.model.smear = 0
    config.warm_start.induction_steps = 0
    config.rollout.cpu_devices = 1  # learner and sampler sharded over all 8 test devices
    config.debug_conversations = True
    config.algorithm.credit = "progress"
    fg = config.algorithm.feedback_guidance
    fg.use_llm_enhancement, fg.llm_model = True, "critic"
    reply = "Rewritten: search the company first, then ask for the fields."
    with toys.fake_completions(reply) as (base_url, requests):
        fg.llm_base_url = base_url
        last = train.train_and_evaluate(config, str(tmp_path))
    assert math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    # Every failed rollout's critique is the endpoint's, and the guided prompts carry it.
    episodes = read_jsonl(str(tmp_path / "conversations" / "step_000001.jsonl"))
    failed = [e for e in episodes if e["reward"] < 1.0]
    # The endpoint rewrites the prose; any JSON to copy follows it verbatim.
    rest = re.compile(r"( The (form|calls): [\[{].*[\]}]\.)*")
    assert failed and all(e["feedback"].startswith(reply) for e in failed)
    assert all(rest.fullmatch(e["feedback"][len(reply) :]) for e in failed)
    assert any(reply in e["text"] for e in episodes if e["rollout"] >= fg.start_rollout)
    assert requests and {r["model"] for r in requests} == {"critic"}
    assert os.listdir(tmp_path / "feedback_cache")  # identical critiques asked once
    assert last["timing_s/feedback"] > 0
    with open(tmp_path / "warm_start" / "config.json") as f:
        assert "ctu_smear" not in json.load(f)
    rows = read_jsonl(str(tmp_path / "warm_start_logs" / "metrics.jsonl"))
    assert not [r for r in rows if "warm_start/copy_task_loss" in r]
