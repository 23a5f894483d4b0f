"""What a workdir keeps from one run to the next, and whether a rerun may reuse it.

A training workdir holds things built once and reused on every rerun: the world
tokenizer, the warm start, the checkpoints. Each is reused only under the settings it
was made with. The tokenizer and the warm start carry a JSON file of those settings;
a resumed run compares its config with the saved `config.json`. A difference is an
error that names the keys and both values, before anything is trained on the wrong
model or task order. Files written by an older ctu, without settings, are reused
with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

# Config keys a resumed run may change: how long it runs, what and how often it
# evaluates, logs and checkpoints, and where it runs. Everything else decides what is
# trained. A key ending in "." covers the section.
RESUMABLE_KEYS = (
    "total_steps",
    "eval_every",
    "eval.",
    "checkpoint_every",
    "max_to_keep",
    "log_examples_every",
    "debug_conversations",
    "backend",
    "distributed",
    "mesh.",
    "rollout.cpu_devices",
    "rollout.vllm_gpu_memory_utilization",
    "algorithm.feedback_guidance.llm_timeout_s",
)


TOKENIZER_DIR = "tokenizer"


def tokenizer_dir(model: Mapping[str, Any], workdir: str) -> str:
    """Where a run's tokenizer lives, from its `model` settings: `model.tokenizer` if
    set; else a checkpoint's own (`model.init=hf:PATH`); else WORKDIR/tokenizer, the
    world tokenizer the run built."""
    if model.get("tokenizer"):
        return model["tokenizer"]
    init = model.get("init", "scratch")
    if init.startswith("hf:"):
        return init[3:]
    return os.path.join(workdir, TOKENIZER_DIR)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values as JSON would hold them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.loads(json.dumps(value, default=str))
    return flat


def changes(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, allowed: Iterable[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, as (saved, current), leaving out `allowed` keys
    (or sections, ending in ".") and keys one side lacks (settings newer than the
    saved file take their defaults; see policy_loading.read_run_config)."""
    allowed = tuple(allowed)
    old, new = flatten(saved), flatten(current)
    return {
        key: (old[key], new[key])
        for key in sorted(old.keys() & new.keys())
        if old[key] != new[key]
        and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)
    }


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes `data` to `path` whole or not at all (a temporary file renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def check_reuse(folder: str, filename: str, wanted: Mapping[str, Any], *, remedy: str) -> None:
    """Raises ValueError when `folder/filename` records settings other than `wanted`.

    `remedy` says how to start afresh. A folder without the file was written by an
    older ctu: reused, with a warning.
    """
    path = os.path.join(folder, filename)
    if not os.path.exists(path):
        logging.warning("%s has no %s (an older ctu): reusing it unchecked", folder, filename)
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    diff = changes(saved, wanted)
    if diff:
        raise ValueError(f"{folder} was made with other settings ({describe(diff)}); {remedy}")
