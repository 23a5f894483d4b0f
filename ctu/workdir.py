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
    # The same gradient in more, smaller pieces; padding (one compilation per length).
    "optimizer.num_micro_batches",
    "optimizer.length_bucket",
    "warm_start.length_bucket",
    "algorithm.feedback_guidance.llm_base_url",
    "algorithm.feedback_guidance.llm_timeout_s",
)


TOKENIZER_DIR = "tokenizer"


def tokenizer_dir(model: Mapping[str, Any], workdir: str) -> str:
    """Where a run's tokenizer lives, from its `model` settings: `model.tokenizer` if
    set; else WORKDIR/tokenizer, the world tokenizer the run built, if there is one;
    else, for `model.init=hf:PATH`, the checkpoint's own (an older ctu built a world
    tokenizer for such runs too, and they keep it)."""
    if model.get("tokenizer"):
        return model["tokenizer"]
    built = os.path.join(workdir, TOKENIZER_DIR)
    init = model.get("init", "scratch")
    if init.startswith("hf:") and not os.path.exists(os.path.join(built, "tokenizer.json")):
        return init[3:]
    return built


def add_missing(config, defaults, prefix: str = "") -> dict[str, Any]:
    """Copies into `config` (a ConfigDict or dict, in place) every key of `defaults` it
    lacks, at any depth; returns them, dotted, with the values added."""
    added = {}
    for key, default in defaults.items():
        if key not in config:
            config[key] = default
            added[prefix + key] = default.to_dict() if hasattr(default, "to_dict") else default
        elif isinstance(default, Mapping) and isinstance(config[key], Mapping):
            added.update(add_missing(config[key], default, f"{prefix}{key}."))
    return added


def saved_config(path: str) -> tuple[dict, dict[str, Any]]:
    """The config a run saved at `path` (its config.json), with the settings added to
    ctu since then filled in with their defaults (configs/feedback_dapo.py, for the
    run's model preset), and those settings, dotted."""
    from configs import feedback_dapo  # every shipped config is feedback_dapo's, changed

    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    preset = config.get("model", {}).get("preset")
    defaults = feedback_dapo.get_config(f"model={preset}" if preset else None).to_dict()
    return config, add_missing(config, defaults)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values as JSON would hold them."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.loads(json.dumps(value, default=str))
    return flat


ABSENT = "<absent>"


def covered(key: str, patterns: Iterable[str]) -> bool:
    """Whether dotted `key` is one of `patterns` or inside a section among them (a
    pattern ending in ".")."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def changes(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    allowed: Iterable[str] = (),
    strict: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ, as (saved, current), leaving out `allowed` keys
    (or sections, ending in "."). A key one side lacks is a difference (shown as
    ABSENT) when `strict`, else left out (a setting ctu no longer has)."""
    allowed = tuple(allowed)
    old, new = flatten(saved), flatten(current)
    keys = old.keys() | new.keys() if strict else old.keys() & new.keys()
    return {
        key: (old.get(key, ABSENT), new.get(key, ABSENT))
        for key in sorted(keys)
        if old.get(key, ABSENT) != new.get(key, ABSENT) and not covered(key, allowed)
    }


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """Writes `data` to `path` whole or not at all (a temporary file renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def check_reuse(
    folder: str, filename: str, wanted: Mapping[str, Any], *, remedy: str, allow: bool = False
) -> None:
    """Raises ValueError when `folder/filename` records settings other than `wanted`
    (logs them instead when `allow`).

    `remedy` says how to start afresh. A folder without the file was written by an
    older ctu (or cut short before its last write): reused, with a warning.
    """
    path = os.path.join(folder, filename)
    if not os.path.exists(path):
        logging.warning(
            "%s has no %s (an older ctu, or cut short): reusing it unchecked", folder, filename
        )
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    diff = changes(saved, wanted, strict=True)
    if not diff:
        return
    message = f"{folder} was made with other settings ({describe(diff)})"
    if allow:
        logging.warning("%s; reused anyway (--allow_config_change)", message)
        return
    raise ValueError(f"{message}; {remedy}")
