"""Metric writers (TensorBoard + `metrics.jsonl`), the run's `config.json`, and MFU.

A workdir gets `metrics.jsonl` (one row of scalars per write, `{"step": s, ...}`),
`texts.jsonl` (generation examples), `tensorboard/` event files and `config.json`.

Writers follow clu's `MetricWriter` interface (`write_scalars`, `write_texts`,
`write_hparams`, `flush`, `close`) but do not import clu: `clu.metric_writers`'s
package `__init__` imports its TensorFlow summary writer unconditionally (clu 0.0.12;
an unmerged upstream fix is google/CommonLoopUtils#358), so even
`import clu.metric_writers.interface` needs TensorFlow, which ctu must not depend on.
clu's own alternative, `TorchTensorboardWriter`, needs PyTorch. The TensorBoard writer
here uses tensorboardX (a base dependency), which writes the same event files.

Only process 0 writes; every other process gets a `NullWriter`. On resume, rows of
`metrics.jsonl` after the restored step are dropped and TensorBoard is told to purge
the same steps, so a resumed run never shows a step twice.

Metric names follow the field's habits: `loss`, `clip_ratio/low`, `clip_ratio/high`,
`kl`, `entropy`, `grad_norm`, `frac_reward_zero_std`, `timing_s/<phase>`,
`perf/tokens_per_s`, `perf/mfu`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TEXTS_FILE = "texts.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter(Protocol):
    """The subset of clu's `metric_writers.MetricWriter` interface that ctu uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def to_python_scalar(value: Any) -> float | int | None:
    """A JSON-safe Python number; non-finite values and None become None (JSON null)."""
    if value is None:
        return None
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


class JsonlWriter:
    """Appends one JSON object per `write_scalars` call: `{"step": s, name: value, ...}`.

    `start_step` is the step the run continues from. Rows with a larger step are left
    over from a run killed after its last checkpoint and are removed, so the file never
    holds a step twice. `start_step=0` is a fresh run, which rewrites step 0 too (its
    initial evaluation), so every row is removed. Texts (`write_texts`) go to
    `texts_path` under the same rules, keeping `path` for scalars only; without a
    `texts_path` they are dropped.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        start_step: int = 0,
        texts_path: str | os.PathLike | None = None,
    ):
        self.path = os.fspath(path)
        keep_through = start_step if start_step > 0 else -1
        truncate_jsonl(self.path, keep_through_step=keep_through)
        self._file = open(self.path, "a", encoding="utf-8")
        self._texts = None
        if texts_path is not None:
            truncate_jsonl(os.fspath(texts_path), keep_through_step=keep_through)
            self._texts = open(texts_path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        row.update({name: to_python_scalar(value) for name, value in scalars.items()})
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        # Into the OS at once: a SIGKILL after the next checkpoint must not lose the row.
        self._file.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        if self._texts is not None:
            self._texts.write(json.dumps({"step": int(step), **dict(texts)}) + "\n")
            self._texts.flush()  # as the scalars: rows up to a checkpoint survive a kill

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams  # The full config goes to config.json instead.

    def flush(self) -> None:
        for f in (self._file, self._texts):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        self.flush()
        for f in (self._file, self._texts):
            if f is not None:
                f.close()


def truncate_jsonl(path: str, *, keep_through_step: int) -> None:
    """Drops rows with `step > keep_through_step` (and a torn last line) from `path`."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # A line torn by a kill mid-write; nothing valid follows it.
            if row.get("step", 0) <= keep_through_step:
                kept.append(json.dumps(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TensorBoardWriter:
    """TensorBoard event files through tensorboardX (see the module docstring for why)."""

    def __init__(self, logdir: str | os.PathLike, *, start_step: int = 0):
        import tensorboardX  # Imported here: only process 0 needs it.

        # purge_step makes TensorBoard drop events at steps > start_step written by an
        # earlier, interrupted run of this workdir.
        purge_step = start_step + 1 if start_step > 0 else None
        # Event files are named by the second they were opened in: a run restarted
        # within that second would overwrite its predecessor's file without a suffix.
        self._writer = tensorboardX.SummaryWriter(
            os.fspath(logdir), purge_step=purge_step, filename_suffix=f".{time.time_ns()}"
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            value = to_python_scalar(value)
            if value is not None:
                self._writer.add_scalar(name, value, global_step=int(step))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for name, text in texts.items():
            self._writer.add_text(name, text, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        self._writer.add_hparams(flat, {}, run_name=".")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class NullWriter:
    """What processes other than 0 get: every call does nothing."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step, scalars

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        del step, texts

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MultiWriter:
    """Forwards every call to each writer, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for writer in self.writers:
            writer.write_texts(step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def create_writer(
    workdir: str | os.PathLike,
    *,
    start_step: int = 0,
    config: Any = None,
    tensorboard: bool = True,
) -> MetricWriter:
    """Writers for `workdir` on process 0 (a no-op elsewhere): scalars to `metrics.jsonl`,
    texts (generation examples) to `texts.jsonl`, both to TensorBoard.

    `start_step` is the restored checkpoint step (0 when starting fresh). `config`
    (ml_collections.ConfigDict, dataclass or mapping) is written to `config.json`.
    """
    if jax.process_index() != 0:
        return NullWriter()
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if config is not None:
        save_config(workdir, config)
    writers: list[MetricWriter] = [
        JsonlWriter(
            os.path.join(workdir, METRICS_FILE),
            start_step=start_step,
            texts_path=os.path.join(workdir, TEXTS_FILE),
        )
    ]
    if tensorboard:
        writers.append(
            TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR), start_step=start_step)
        )
    return MultiWriter(writers)


def save_config(workdir: str | os.PathLike, config: Any) -> str:
    """Writes the config the run uses to `workdir/config.json` (process 0 only)."""
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if jax.process_index() != 0:
        return path
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        data = config.to_dict()
    elif dataclasses.is_dataclass(config):
        data = dataclasses.asdict(config)
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise TypeError(
            f"cannot save a config of type {type(config).__name__}; "
            "pass a ConfigDict, a dataclass or a mapping"
        )
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# Model FLOPs utilisation.

# Dense peak FLOP/s per device for bf16/fp16 matmuls (vendor datasheets, no sparsity).
# Matched against `jax.Device.device_kind` by substring, first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12.
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
    ("TPU v6 lite", 918e12),  # Trillium (v6e)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 46e12),
)


def peak_flops_per_device(
    device: jax.Device | None = None, *, override: float | None = None
) -> float | None:
    """Peak bf16 FLOP/s of `device` (default: the first local device), or None if unknown.

    `override` (e.g. a configured CPU peak) takes precedence. CPUs have no entry, so MFU
    on CPU is None unless a peak is configured.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    device = device if device is not None else jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def train_flops_per_token(
    *, num_params: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B.

    6·N for the matmuls against the N (non-embedding-lookup) parameters plus
    12·L·H·Q·T for attention scores and values (L layers, H query heads of size Q,
    sequence length T); the causal mask's savings are not subtracted, as in PaLM.
    """
    return 6.0 * num_params + 12.0 * num_layers * num_heads * head_dim * seq_len


def mfu(
    *, tokens_per_s: float, flops_per_token: float, num_devices: int, peak_flops: float | None
) -> float | None:
    """Achieved FLOP/s over the peak of all devices; None when the peak is unknown."""
    if peak_flops is None:
        return None
    return tokens_per_s * flops_per_token / (num_devices * peak_flops)
