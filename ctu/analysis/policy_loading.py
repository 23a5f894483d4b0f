"""Model policies for evaluation, named the way `launch.evaluate --policy` names them.

    checkpoint:WORKDIR[@STEP]   a training run's orbax checkpoint (the latest by default)
    hf:PATH                     a Hugging Face folder with its tokenizer (e.g. WORKDIR/warm_start)

A checkpoint is rebuilt from what the workdir holds and nothing else: `config.json`
(the run's ml_collections config, read back through `ctu.run_config`), the tokenizer
(`WORKDIR/tokenizer`, or the folder the config names) and `checkpoints/STEP`. Only the
checkpoint's "model" item is read, straight into the shardings of an abstract model
(`nnx.eval_shape`): no optimizer state is built or loaded and no training code runs.

Decoding is greedy (temperature 0) unless the caller replaces `sampling`; an evaluation
is a function of its seed either way. Token
and turn limits are the run's (`rollout.*` of its config); an HF folder inside a workdir
(`WORKDIR/warm_start`) takes its workdir's, any other folder `HF_DEFAULTS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from ctu import sharding
from ctu import workdir as workdir_lib
from ctu.metrics import CONFIG_FILE
from ctu.models import ModelConfig, Qwen, from_hf
from ctu.rl import checkpoint as checkpoint_lib
from ctu.rollout.records import RunnerSettings
from ctu.run_config import RunSettings, settings_from_config
from ctu.sampling import SamplingConfig
from ctu.sft import WARM_START_DIR
from ctu.text.chat_template import END_OF_TURN
from ctu.text.tokenizer import load_tokenizer
from ctu.train import CHECKPOINT_DIR  # the workdir layout, names only

CHECKPOINT_PREFIX = "checkpoint:"
HF_PREFIX = "hf:"
# Limits and layout for an HF folder that is not part of a run.
HF_DEFAULTS = {
    "max_new_tokens": 256,
    "max_total_tokens": 4096,
    "max_turns": 12,
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "dtype": "float32",
}


class PolicySpecError(ValueError):
    """A --policy value that names no usable model (bad syntax, workdir, step)."""


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    kind: str  # "checkpoint" | "hf"
    path: str
    step: int | None = None  # checkpoint only; None: the latest

    def __str__(self) -> str:
        step = "" if self.step is None else f"@{self.step}"
        return f"{self.kind}:{self.path}{step}"


@dataclasses.dataclass
class LoadedPolicy:
    """A model ready to sample from, with what the rollout runner needs around it."""

    spec: PolicySpec
    model: nnx.Module
    model_config: ModelConfig
    tokenizer: Any
    mesh: jax.sharding.Mesh
    sampling: SamplingConfig  # greedy, stopping at the end of a turn (callers may sample)
    runner: RunnerSettings
    step: int | None  # the checkpoint step restored (None for an HF folder)
    run_config: ml_collections.ConfigDict | None  # the run's config, when there is one

    def describe(self) -> dict:
        """JSON-ready provenance: what was loaded and how it decodes."""
        return {
            "kind": self.spec.kind,
            "path": os.path.abspath(self.spec.path),
            "step": self.step,
            "model": self.model_config.family,
            "num_params": self.model_config.num_params(),
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": self.sampling.top_k,
            "max_new_tokens": self.sampling.max_new_tokens,
            "max_total_tokens": self.runner.max_total_tokens,
            "max_turns": self.runner.max_turns,
        }


def is_model_policy(policy: str) -> bool:
    return policy.startswith((CHECKPOINT_PREFIX, HF_PREFIX))


def parse_policy(policy: str) -> PolicySpec:
    """`checkpoint:WORKDIR[@STEP]` or `hf:PATH` -> PolicySpec (syntax only)."""
    if policy.startswith(HF_PREFIX):
        path = policy[len(HF_PREFIX) :]
        if not path:
            raise PolicySpecError(
                "--policy=hf:PATH needs a Hugging Face folder, e.g. hf:RUN/warm_start"
            )
        return PolicySpec("hf", path)
    if not policy.startswith(CHECKPOINT_PREFIX):
        raise PolicySpecError(f"--policy={policy}: not checkpoint:WORKDIR[@STEP] or hf:PATH")
    body = policy[len(CHECKPOINT_PREFIX) :]
    path, at, step_text = body.rpartition("@") if "@" in body else (body, "", "")
    step = None
    if at:
        if not step_text.isdigit():
            raise PolicySpecError(
                f"--policy={policy}: the step after '@' must be a non-negative integer, "
                f"got {step_text!r}"
            )
        step = int(step_text)
    if not path:
        raise PolicySpecError("--policy=checkpoint:WORKDIR[@STEP] needs a workdir")
    return PolicySpec("checkpoint", path, step)


def load_policy(policy: str | PolicySpec) -> LoadedPolicy:
    spec = parse_policy(policy) if isinstance(policy, str) else policy
    if spec.kind == "checkpoint":
        return load_checkpoint(spec.path, spec.step)
    return load_hf(spec.path)


# ---- checkpoint:WORKDIR[@STEP] --------------------------------------------------------


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run wrote to WORKDIR/config.json, as a ConfigDict."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise PolicySpecError(f"no workdir at {workdir}; pass the --workdir of a launch.train run")
    if not os.path.exists(path):
        raise PolicySpecError(
            f"{workdir} has no {CONFIG_FILE}: not a training workdir; start one with "
            f"`python -m launch.train --config=configs/feedback_dapo.py --workdir={workdir}`"
        )
    saved, added = workdir_lib.saved_config(path)
    config = ml_collections.ConfigDict(saved)
    if added:
        logging.warning(
            "%s predates settings this version of ctu reads; they take their defaults, "
            "which leave what the run did unchanged only if those are what it ran with: %s",
            path,
            ", ".join(f"{k}={v!r}" for k, v in added.items()),
        )
    return config


def _run_settings(workdir: str, config: ml_collections.ConfigDict) -> RunSettings:
    try:
        return settings_from_config(config)
    except (AttributeError, KeyError) as error:
        raise PolicySpecError(
            f"{workdir}/{CONFIG_FILE} lacks a setting this version of ctu reads ({error}); "
            "was it written by an older ctu?"
        ) from None


def checkpoint_steps(workdir: str) -> list[int]:
    """The fully committed checkpoint steps of a run (sorted; [] when there is none)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    with _reader(directory) as manager:
        return sorted(manager.all_steps())


@contextlib.contextmanager
def _reader(directory: str):
    """A read-only orbax manager of a run's checkpoints. orbax logs every step of a read
    (and warns that read-only managers do not save); only its errors are let through."""
    # The absl logger's own level, restored exactly: absl's verbosity round trip would
    # leave an explicit WARNING where the level was unset (and INFO reached handlers).
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    manager = ocp.CheckpointManager(directory, options=options, item_names=checkpoint_lib.ITEMS)
    try:
        yield manager
    finally:
        manager.close()
        absl_logger.setLevel(level)


def _choose_step(workdir: str, step: int | None) -> int:
    steps = checkpoint_steps(workdir)
    if not steps:
        raise PolicySpecError(
            f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}: the run saved none yet; "
            f"train it with `python -m launch.train --config=... --workdir={workdir}` "
            f"(or evaluate its warm start with --policy=hf:{os.path.join(workdir, WARM_START_DIR)})"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise PolicySpecError(
            f"{workdir} has no checkpoint for step {step}; available steps: "
            f"{', '.join(map(str, steps))}"
        )
    return step


def _run_tokenizer(workdir: str, settings: RunSettings):
    """The tokenizer the run trained with, found by the rule training follows."""
    path = workdir_lib.tokenizer_dir(settings.model, workdir)
    if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        raise PolicySpecError(
            f"no tokenizer at {path} (the run's tokenizer); the workdir is incomplete"
        )
    return load_tokenizer(path)


def _model_config(settings: RunSettings, vocab_size: int) -> ModelConfig:
    model = settings.model
    dtypes = {"dtype": model["dtype"], "param_dtype": model["param_dtype"]}
    if model["init"].startswith(HF_PREFIX):
        hf_config = os.path.join(model["init"][len(HF_PREFIX) :], "config.json")
        if not os.path.exists(hf_config):
            raise PolicySpecError(
                f"the run started from {model['init']}, whose config.json is gone; it gives "
                "the model's architecture"
            )
        with open(hf_config, encoding="utf-8") as f:
            return ModelConfig.from_hf_dict(json.load(f), **dtypes)
    # Runs from before `model.smear` existed have no such key.
    smear = int(model.get("smear", 0))
    return ModelConfig.preset(model["preset"], vocab_size=vocab_size, smear=smear, **dtypes)


def restore_model(directory: str, model_config: ModelConfig, mesh, step: int) -> nnx.Module:
    """The checkpoint's "model" item read into a model born abstract, sharded on `mesh`."""
    model = nnx.eval_shape(lambda: Qwen(model_config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    shapes = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
    with _reader(directory) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))
        )
    nnx.replace_by_pure_dict(state, restored["model"])
    nnx.update(model, state)
    return model


def load_checkpoint(workdir: str, step: int | None = None) -> LoadedPolicy:
    """The policy a training run saved at `step` (default: its latest checkpoint)."""
    config = read_run_config(workdir)
    settings = _run_settings(workdir, config)
    step = _choose_step(workdir, step)
    tokenizer = _run_tokenizer(workdir, settings)
    mesh = policy_mesh(settings.mesh)
    model_config = _model_config(settings, len(tokenizer))
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    model = restore_model(directory, model_config, mesh, step)
    return LoadedPolicy(
        spec=PolicySpec("checkpoint", workdir, step),
        model=model,
        model_config=model_config,
        tokenizer=tokenizer,
        mesh=mesh,
        sampling=_greedy(settings.rollout.sampling.max_new_tokens, tokenizer),
        runner=settings.rollout.runner,
        step=step,
        run_config=config,
    )


# ---- hf:PATH ----------------------------------------------------------------------------


def load_hf(path: str) -> LoadedPolicy:
    """A Hugging Face folder (weights, config.json, tokenizer with a chat template)."""
    if not os.path.exists(os.path.join(path, "config.json")):
        raise PolicySpecError(
            f"--policy=hf:{path}: no config.json there, not a Hugging Face model folder "
            "(a run's warm start is WORKDIR/warm_start)"
        )
    if os.path.exists(os.path.join(path, "checkpoints")):
        raise PolicySpecError(
            f"--policy=hf:{path}: that is a training workdir; use checkpoint:{path} (its "
            f"checkpoints) or hf:{os.path.join(path, WARM_START_DIR)} (its warm start)"
        )
    if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
        raise PolicySpecError(f"--policy=hf:{path}: the folder holds no tokenizer")
    tokenizer = load_tokenizer(path)
    # WORKDIR/warm_start decodes and shards as its run does.
    workdir = os.path.dirname(os.path.abspath(path))
    run_config = None
    in_run = os.path.basename(os.path.normpath(path)) == WARM_START_DIR
    if in_run and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        run_config = read_run_config(workdir)
        settings = _run_settings(workdir, run_config)
        mesh_config, runner = settings.mesh, settings.rollout.runner
        max_new_tokens = settings.rollout.sampling.max_new_tokens
        dtypes = {"dtype": settings.model["dtype"], "param_dtype": settings.model["param_dtype"]}
    else:
        mesh_config = HF_DEFAULTS["mesh"]
        runner = RunnerSettings(
            max_total_tokens=HF_DEFAULTS["max_total_tokens"], max_turns=HF_DEFAULTS["max_turns"]
        )
        max_new_tokens = HF_DEFAULTS["max_new_tokens"]
        dtypes = {"dtype": HF_DEFAULTS["dtype"]}
    mesh = policy_mesh(mesh_config)
    model, model_config = from_hf(path, mesh=mesh, **dtypes)
    return LoadedPolicy(
        spec=PolicySpec("hf", path),
        model=model,
        model_config=model_config,
        tokenizer=tokenizer,
        mesh=mesh,
        sampling=_greedy(max_new_tokens, tokenizer),
        runner=runner,
        step=None,
        run_config=run_config,
    )


def policy_mesh(mesh_config) -> jax.sharding.Mesh:
    """Where a loaded policy's weights live and its sampler runs.

    On an accelerator, the run's mesh (`mesh_config`). On CPU, every CPU device, data
    parallel: each holds the whole model and decodes its share of the rows, one decode
    loop per device, as training's sampler does (`rollout.cpu_devices`); `launch.evaluate`
    asks for one device per core.
    """
    if jax.default_backend() == "cpu":
        return sharding.make_mesh(sharding.DATA_PARALLEL)
    return sharding.make_mesh(mesh_config)


def _greedy(max_new_tokens: int, tokenizer) -> SamplingConfig:
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(eot,))
