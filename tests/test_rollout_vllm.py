"""VllmEngine plumbing against a fake `vllm` package (vLLM itself cannot run here)."""

import dataclasses
import os
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ctu.rollout import EpisodeSpec, RunnerSettings, run_episodes
from ctu.rollout.vllm_engine import VllmEngine
from ctu.sampling import LENGTH, STOP, SamplingConfig
from ctu.world import users
from tests import toys

EOT = 2  # <|im_end|> in the tiny tokenizer


class _Logprob(types.SimpleNamespace):
    pass


class FakeLLM:
    """Records what it is asked; 'samples' a few plain ids then the stop id."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.requests = []
        self.rpcs = []
        self.prefix_resets = 0

    def generate(self, prompts, params, use_tqdm=True):
        assert use_tqdm is False
        outputs = []
        for prompt, sp in zip(prompts, params, strict=True):
            history = list(prompt["prompt_token_ids"])
            self.requests.append((history, sp))
            rng = np.random.default_rng(sp.seed)
            ids = [int(t) for t in rng.integers(300, 600, size=rng.integers(1, 6))] + [EOT]
            finish = "stop" if len(ids) <= sp.max_tokens else "length"
            ids = ids[: sp.max_tokens]
            logprobs = [{t: _Logprob(logprob=-0.1 * (i + 1), rank=1)} for i, t in enumerate(ids)]
            completion = types.SimpleNamespace(
                token_ids=ids, logprobs=logprobs, finish_reason=finish
            )
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs

    def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))

    def reset_prefix_cache(self):
        self.prefix_resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return vllm


@pytest.fixture(scope="module")
def model():
    return toys.tiny_model(toys.tiny_model_config(vocab_size=1024))


def _engine(model, tmp_path, **sampling):
    sampling = SamplingConfig(**{"max_new_tokens": 8, "stop_token_ids": (EOT,), **sampling})
    return VllmEngine.from_model(model, model.config, tmp_path / "policy", sampling)


def test_missing_vllm_says_what_to_do(monkeypatch, tmp_path, model):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm.*JAX engine"):
        VllmEngine(tmp_path, model.config, SamplingConfig())


def test_a_smear_model_is_refused(fake_vllm, tmp_path, model):
    config = dataclasses.replace(model.config, smear=1)
    with pytest.raises(ValueError, match="rollout.engine=jax for a smear model"):
        VllmEngine(tmp_path, config, SamplingConfig())


def test_engine_starts_on_the_export_with_prefix_caching(fake_vllm, tmp_path, model):
    engine = _engine(model, tmp_path)
    assert os.path.exists(tmp_path / "policy" / "config.json")
    kwargs = engine.llm.kwargs
    assert kwargs["model"] == str(tmp_path / "policy") and kwargs["enable_prefix_caching"]
    assert kwargs["skip_tokenizer_init"] and "logprobs_mode" not in kwargs
    filtered = _engine(model, tmp_path, top_p=0.9)
    assert filtered.llm.kwargs["logprobs_mode"] == "processed_logprobs"


def test_update_weights_exports_then_reloads(fake_vllm, tmp_path, model):
    engine = _engine(model, tmp_path)
    other = toys.tiny_model(toys.tiny_model_config(vocab_size=1024), seed=5)
    before = load_file(tmp_path / "policy" / "model.safetensors")
    engine.update_weights(other)
    after = load_file(tmp_path / "policy" / "model.safetensors")
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert engine.llm.rpcs == [("reload_weights", ())] and engine.llm.prefix_resets == 1


def test_session_keeps_full_histories_and_the_session_contract(fake_vllm, tmp_path, model):
    engine = _engine(model, tmp_path, max_new_tokens=4)
    session = engine.session(3, max_len=12)
    out = session.generate([[5, 6, 7], None, list(range(20, 33))], jax.random.key(0))
    assert out.stop_reasons[1] is None and out.stop_reasons[2] == LENGTH  # 13 > 12: dropped
    assert out.num_tokens[2] == 0 and session.history(2) == []
    ((prompt, sp),) = engine.llm.requests
    assert prompt == [5, 6, 7] and sp.logprobs == 0 and sp.detokenize is False
    assert sp.stop_token_ids == [EOT] and sp.top_k == -1 and sp.max_tokens == 4
    first = out.row_tokens(0)
    assert out.stop_reasons[0] in (STOP, LENGTH)
    np.testing.assert_allclose(out.row_logprobs(0), [-0.1 * (i + 1) for i in range(len(first))])
    out = session.generate([[8], None, None], jax.random.key(1))
    prompt, sp = engine.llm.requests[-1]
    assert prompt == [5, 6, 7] + first + [8]  # the whole history, sampled ids verbatim
    assert sp.max_tokens == min(4, 12 + 1 - len(prompt))
    assert session.history(0) == prompt + out.row_tokens(0)


def test_runner_on_vllm_engine(fake_vllm, tmp_path, model, monkeypatch):
    reply = users.UserSimulator.reply
    monkeypatch.setattr(
        users.UserSimulator, "reply", lambda self, m: reply(self, m)._replace(done=False)
    )
    tokenizer, world = toys.tiny_tokenizer(), toys.shipped_world()
    engine = _engine(model, tmp_path)
    task_ids = [t.task_id for t in world.split("train")[:2]]
    specs = [EpisodeSpec(t, "You are a phone assistant.", group=i) for i, t in enumerate(task_ids)]
    records, _ = run_episodes(
        engine,
        specs,
        world=world,
        tokenizer=tokenizer,
        rng=jax.random.key(0),
        settings=RunnerSettings(max_total_tokens=1400, max_turns=3),
    )
    for record in records:
        assert record.num_turns == 3
        # The row's last request is its whole history before the last turn.
        prefix = record.tokens[: record.prompt_length].tolist()
        last = [p for p, _ in engine.llm.requests if p[: record.prompt_length] == prefix][-1]
        tail = record.tokens[len(last) :]
        assert record.tokens[: len(last)].tolist() == last
        assert record.loss_mask[len(last) :].all() and tail[-1] == EOT
        sampled = record.logprobs[record.loss_mask == 1]
        assert (sampled < 0).all() and not record.logprobs[record.loss_mask == 0].any()


def test_greedy_twin_shares_the_llm_and_its_weights(fake_vllm, tmp_path, model):
    engine = _engine(model, tmp_path, temperature=1.0)
    greedy = engine.with_sampling(dataclasses.replace(engine.sampling, temperature=0.0))
    assert greedy.llm is engine.llm and engine.sampling.temperature == 1.0
    greedy.session(1, 16).generate([[5]], jax.random.key(0))
    assert engine.llm.requests[-1][1].temperature == 0.0
    engine.update_weights(model)
    assert engine.llm.rpcs == [("reload_weights", ())]  # one sync serves both


def test_training_job_samples_from_vllm(fake_vllm, tmp_path, monkeypatch):
    """`rollout.engine=vllm` in the main job: one LLM on the workdir's export, synced
    after every update, greedy for evaluation; vLLM and JAX share the GPU's memory."""
    from configs import feedback_dapo
    from ctu import train

    llms = []
    monkeypatch.setattr(fake_vllm, "LLM", lambda **kw: llms.append(FakeLLM(**kw)) or llms[-1])
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "")  # restored after the test
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    config = feedback_dapo.get_config("smoke")
    config.total_steps, config.eval_every, config.eval.num_tasks = 2, 2, 2
    config.model.smear, config.warm_start.enable = 0, False
    config.rollout.engine, config.rollout.vllm_gpu_memory_utilization = "vllm", 0.6
    last = train.train_and_evaluate(config, str(tmp_path))

    assert np.isfinite(last["loss"]) and "val/success" in last
    (llm,) = llms
    assert llm.kwargs["model"] == str(tmp_path / train.VLLM_POLICY_DIR)
    assert llm.kwargs["gpu_memory_utilization"] == 0.6
    assert llm.kwargs["max_model_len"] == config.rollout.max_total_tokens
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.35"
    assert llm.rpcs == [("reload_weights", ())] * 2  # after each of the 2 updates
    temperatures = {sp.temperature for _, sp in llm.requests}
    assert temperatures == {config.rollout.temperature, 0.0}  # training, evaluation


def test_vllm_with_a_smear_model_is_refused_before_anything_runs(tmp_path):
    from configs import feedback_dapo
    from ctu import run_config

    config = feedback_dapo.get_config("smoke")
    config.rollout.engine = "vllm"
    with pytest.raises(ValueError, match="model.smear=0"):
        run_config.settings_from_config(config)
