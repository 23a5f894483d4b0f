"""launch.evaluate on model policies: a tiny run trained in the test (feedback_dapo smoke,
2 steps), evaluated from its checkpoints and its warm start; then compared."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import feedback_dapo
from ctu import feedback_guidance as fg
from ctu import sharding, train
from ctu.analysis import compare, model_eval, policy_loading
from ctu.models import ModelConfig
from ctu.rl.checkpoint import Checkpointer
from ctu.rl.train_step import Learner
from ctu.run_config import settings_from_config
from tests import toys
from tests.test_compare import table_rows, write_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TASKS = 2
REQUIRED_KEYS = {
    "policy",
    "policy_source",
    "split",
    "mode",
    "seed",
    "trials",
    "num_tasks",
    "episodes",
    "success_rate",
    "mean_score",
    "by_level",
    "per_level_success",
    "held_out_company",
    "pass_hat_k",
    "failure_types",
    "behaviour",
    "parse_failure_rate",
    "examples",
}
BEHAVIOUR_KEYS = {
    "info_gathering_completeness",
    "call_order_correctness",
    "tool_call_efficiency",
    "over_collection_rate",
    "malformed_call_rate",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = feedback_dapo.get_config("smoke")
    config.total_steps = 2
    config.eval.num_tasks = NUM_TASKS
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def feedback_eval(run_dir, tmp_path_factory):
    """The latest checkpoint in feedback mode, 2 trials: (metrics returned, JSON path)."""
    out = tmp_path_factory.mktemp("eval") / "eval_val.json"
    return _evaluate(f"checkpoint:{run_dir}", out, mode="feedback", trials=2), out


def _evaluate(policy, out, **kwargs):
    kwargs = {"num_tasks": NUM_TASKS, **kwargs}
    return model_eval.evaluate_and_write(policy, "val", None, str(out), **kwargs)


def _without_timing(metrics):
    return {k: v for k, v in metrics.items() if k != "wall_s"}


def test_latest_checkpoint_json_has_the_keys_and_is_deterministic(run_dir, feedback_eval, tmp_path):
    first, path = feedback_eval
    again = _evaluate(f"checkpoint:{run_dir}", tmp_path / "b.json", mode="feedback", trials=2)
    assert _without_timing(first) == _without_timing(again)
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(first))
    assert REQUIRED_KEYS <= set(written)
    assert BEHAVIOUR_KEYS <= set(written["behaviour"])
    assert written["policy_source"]["step"] == 2 and written["policy_source"]["temperature"] == 0
    assert written["num_tasks"] == NUM_TASKS and written["episodes"] == 2 * NUM_TASKS
    assert set(written["pass_hat_k"]) == {"1", "2"}
    assert sum(written["failure_types"].values()) == written["episodes"]
    feedback = written["with_feedback"]
    failures = written["episodes"] - round(written["success_rate"] * written["episodes"])
    assert feedback["retried"] == failures
    assert feedback["success_rate"] >= written["success_rate"]
    examples = written["examples"]
    assert 1 <= len(examples) <= model_eval.NUM_EXAMPLES
    assert all(e["conversation"].startswith("<|im_start|>user") for e in examples)
    if failures:
        assert examples[-1]["attempt"] == "retry" and examples[-1]["feedback_block"]


def test_an_llm_critic_rewrites_what_the_retries_read(run_dir, feedback_eval, tmp_path):
    reply = "Rewritten: ask for every field the department needs in one form."
    with toys.fake_completions(reply) as (base_url, requests):
        critic = fg.FeedbackGuidanceConfig(
            use_llm_enhancement=True, llm_base_url=base_url, llm_model="critic"
        )
        metrics = _evaluate(
            f"checkpoint:{run_dir}", tmp_path / "e.json", mode="feedback", trials=2, critic=critic
        )
    # The same first tries as without the critic; each failure's critique asked for once
    # (identical ones come from the cache).
    retried = metrics["with_feedback"]["retried"]
    assert retried == feedback_eval[0]["with_feedback"]["retried"] > 0
    cached = os.listdir(tmp_path / fg.FEEDBACK_CACHE_DIR)
    assert 1 <= len(requests) == len(cached) <= retried
    retries = [e for e in metrics["examples"] if e["attempt"] == "retry"]
    assert retries and all(reply in e["feedback_block"] for e in retries)
    assert metrics["critic"] == "critic"
    with pytest.raises(ValueError, match="--mode=feedback"):
        _evaluate(f"checkpoint:{run_dir}", tmp_path / "x.json", critic=critic)
    with pytest.raises(ValueError, match="model policy"):
        _evaluate("heuristic", tmp_path / "x.json", mode="feedback", critic=critic)
    assert not (tmp_path / "x.json").exists()


def test_checkpoint_at_a_step_restores_what_the_trainer_saved(run_dir, tmp_path):
    loaded = policy_loading.load_policy(f"checkpoint:{run_dir}@1")
    assert loaded.step == 1
    # Reference: the trainer's own restore (model and optimizer) of the same step.
    settings = settings_from_config(loaded.run_config)
    mesh = sharding.make_mesh(settings.mesh)
    config = ModelConfig.preset(
        settings.model["preset"], vocab_size=len(loaded.tokenizer), smear=settings.model["smear"]
    )
    learner = Learner(
        settings.train, sharding.create_sharded_model(config, mesh, nnx.Rngs(7)), mesh
    )
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as checkpointer:
        checkpointer.restore(model=learner.model, optimizer=learner.optimizer, step=1)
    ours, theirs = (
        nnx.to_pure_dict(nnx.state(loaded.model)),
        nnx.to_pure_dict(nnx.state(learner.model)),
    )
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    # The smoke run's rewards are all equal (no gradient), so steps 1 and 2 may hold the
    # same weights; the latest is still chosen by step.
    assert policy_loading.load_policy(f"checkpoint:{run_dir}").step == 2
    metrics = model_eval.evaluate_loaded(loaded, _world(loaded), "val", num_tasks=NUM_TASKS)
    assert metrics["policy_source"]["step"] == 1 and metrics["mode"] == "cold"


def test_on_cpu_a_policy_decodes_on_every_device_what_it_decodes_on_one(run_dir, tmp_path):
    every_device = {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    # An HF folder outside a run would take HF_DEFAULTS' fsdp mesh on an accelerator.
    shutil.copytree(os.path.join(run_dir, "warm_start"), tmp_path / "model")
    assert dict(policy_loading.load_policy(f"hf:{tmp_path / 'model'}").mesh.shape) == every_device
    loaded = policy_loading.load_policy(f"checkpoint:{run_dir}")
    assert dict(loaded.mesh.shape) == every_device
    one = dataclasses.replace(
        loaded, mesh=sharding.make_mesh(sharding.DATA_PARALLEL, devices=jax.devices()[:1])
    )
    runs = [
        model_eval.evaluate_loaded(policy, _world(loaded), "val", num_tasks=6, mode="feedback")
        for policy in (loaded, one)
    ]
    assert runs[0]["episodes"] == 6
    assert _without_timing(runs[0]) == _without_timing(runs[1])


def _world(loaded):
    from ctu.world import data

    return data.load_world(loaded.run_config.data.dir)


def test_warm_start_folder_evaluates_as_an_hf_policy(run_dir, tmp_path):
    metrics = _evaluate(f"hf:{os.path.join(run_dir, 'warm_start')}", tmp_path / "hf.json")
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["policy_source"]["kind"] == "hf" and metrics["policy_source"]["step"] is None
    # The run's limits, not HF_DEFAULTS: the folder sits in a workdir.
    config = feedback_dapo.get_config("smoke")
    assert metrics["policy_source"]["max_new_tokens"] == config.rollout.max_new_tokens
    assert metrics["data"] == config.data.dir


def test_sampled_evaluation_follows_its_seed_and_top_k_1_is_greedy(run_dir, tmp_path):
    policy = f"hf:{os.path.join(run_dir, 'warm_start')}"
    greedy = _evaluate(policy, tmp_path / "greedy.json")
    top_1 = _evaluate(policy, tmp_path / "top1.json", temperature=1.0, top_k=1)
    # A point mass on the argmax plays exactly the greedy episodes.
    assert top_1["policy_source"]["temperature"] == 1.0 and top_1["policy_source"]["top_k"] == 1
    same = ("success_rate", "mean_score", "failure_types", "parse_failure_rate", "examples")
    assert {k: top_1[k] for k in same} == {k: greedy[k] for k in same}
    sampled = [
        _evaluate(policy, tmp_path / f"s{i}.json", temperature=1.0, top_p=0.8, seed=3)
        for i in range(2)
    ]
    assert _without_timing(sampled[0]) == _without_timing(sampled[1])
    assert sampled[0]["policy_source"]["top_p"] == 0.8


@pytest.mark.parametrize(
    "policy, decoding, match",
    [
        ("heuristic", {"temperature": 1.0}, "scripted: --temperature"),
        ("WARM", {"top_p": 0.5}, "need --temperature > 0"),
        ("WARM", {"temperature": 1.0, "top_p": 1.5}, "top_p must be in"),
        ("WARM", {"temperature": -1.0}, "temperature must be"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(run_dir, tmp_path, policy, decoding, match):
    policy = policy.replace("WARM", f"hf:{os.path.join(run_dir, 'warm_start')}")
    with pytest.raises(ValueError, match=match):
        _evaluate(policy, tmp_path / "x.json", **decoding)
    assert not (tmp_path / "x.json").exists()


def test_bad_workdirs_steps_and_policies_are_clear_errors(run_dir, tmp_path):
    with pytest.raises(policy_loading.PolicySpecError, match="no workdir at /no/such/run"):
        _evaluate("checkpoint:/no/such/run", tmp_path / "x.json")
    with pytest.raises(policy_loading.PolicySpecError, match="available steps: 1, 2"):
        _evaluate(f"checkpoint:{run_dir}@7", tmp_path / "x.json")
    with pytest.raises(policy_loading.PolicySpecError, match="non-negative integer"):
        _evaluate(f"checkpoint:{run_dir}@last", tmp_path / "x.json")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), fresh)
    with pytest.raises(
        policy_loading.PolicySpecError, match=f"no checkpoint in {fresh}.*launch.train"
    ):
        _evaluate(f"checkpoint:{fresh}", tmp_path / "x.json")
    with pytest.raises(policy_loading.PolicySpecError, match="a training workdir; use checkpoint:"):
        _evaluate(f"hf:{run_dir}", tmp_path / "x.json")
    with pytest.raises(ValueError, match="--policy=genius"):
        _evaluate("genius", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", f"--policy=checkpoint:{fresh}", "--out=/tmp/x"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode != 0 and f"error: no checkpoint in {fresh}" in proc.stderr


def test_an_older_runs_config_gets_the_settings_added_since_with_a_warning(tmp_path, caplog):
    """A workdir written before a setting existed reads back with that setting's default
    (named in a warning); every setting the run saved keeps its saved value."""
    config = feedback_dapo.get_config("smoke")
    config.optimizer.learning_rate = 0.123
    saved = config.to_dict()
    del saved["optimizer"]["trainable"]
    del saved["algorithm"]["turn_weights"]
    del saved["algorithm"]["credit"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        read = policy_loading.read_run_config(str(tmp_path))
    assert read.optimizer.trainable == "" and read.algorithm.credit == "episode"
    assert dict(read.algorithm.turn_weights) == dict(config.algorithm.turn_weights)
    assert read.to_dict() == config.to_dict()  # the rest as saved: smoke sizes, the rate
    warning = caplog.text
    assert "optimizer.trainable=''" in warning and "algorithm.credit='episode'" in warning
    assert "algorithm.turn_weights={" in warning and "learning_rate" not in warning
    settings_from_config(read)
    # A config with nothing missing reads back as written, without a warning.
    caplog.clear()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with caplog.at_level("WARNING"):
        assert policy_loading.read_run_config(str(tmp_path)).to_dict() == config.to_dict()
    assert "predates" not in caplog.text
    # The defaults are those of the run's model preset (the tiny preset's smear is 6).
    qwen = feedback_dapo.get_config("model=qwen3_0p6b").to_dict()
    del qwen["model"]["smear"]
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert policy_loading.read_run_config(str(tmp_path)).model.smear == 0


def test_compare_reads_the_run_and_its_evaluation(run_dir, feedback_eval, tmp_path):
    run = tmp_path / "fd_smoke"
    run.mkdir()
    for path in (os.path.join(run_dir, "config.json"), os.path.join(run_dir, "metrics.jsonl")):
        shutil.copy(path, run)
    shutil.copy(feedback_eval[1], run / "eval_val.json")
    baseline = write_run(
        tmp_path, "base", feedback=False, val={0: 0.0, 2: 0.5}, train={1: {"batch/rows": 8}}
    )
    result = compare.compare([str(run), baseline], str(tmp_path / "cmp"))
    assert sorted(result.plots) == [
        "failure_modes",
        "learning_curves",
        "success_by_rollout_position",
        "success_per_level",
    ]
    rows = table_rows(open(result.summary_path).read(), "Runs")["fd_smoke"]
    # By hand: rollouts generated = groups generated x group size, summed over steps.
    merged = {}
    for line in open(run / "metrics.jsonl"):
        row = json.loads(line)
        merged.setdefault(row.pop("step"), {}).update(row)
    group_size = feedback_dapo.get_config("smoke").rollout.group_size
    samples, expected = 0, "not reached"
    for step in sorted(merged):
        samples += merged[step].get("dynamic_sampling/generated", 0) * group_size
        if merged[step].get("val/success", 0) >= 0.7:
            expected = f"{samples:.0f}"
            break
    assert rows["samples to 70%"] == expected
    assert rows["group"] == "DAPO + feedback" and rows["last step"] == "2"
    assert rows["final val success"] == f"{100 * merged[2]['val/success']:.1f}%"
    feedback = table_rows(open(result.summary_path).read(), "Cold start vs with feedback")
    metrics = feedback_eval[0]
    assert feedback["fd_smoke"]["evaluation"] == "eval_val.json"
    assert feedback["fd_smoke"]["cold-start success"] == f"{100 * metrics['success_rate']:.1f}%"
    with_feedback = metrics["with_feedback"]["success_rate"]
    assert feedback["fd_smoke"]["with-feedback success"] == f"{100 * with_feedback:.1f}%"
