"""Training checkpoints: a thin wrapper over orbax's `CheckpointManager`.

One checkpoint per saved step holds four items:
  model      the policy's parameters and other nnx state (StandardSave)
  optimizer  `nnx.Optimizer` state: step count and optax state (StandardSave)
  rng        the training RNG key (JaxRandomKeySave, typed keys round-trip)
  data       where the data pipeline is, as JSON (JsonSave)

Saves are asynchronous (orbax writes in a background thread; the next save or
`wait_until_finished` joins it) and atomic: orbax writes into a temporary directory
and renames it when every item is committed, so a run killed mid-save leaves the
previous checkpoint as the latest one. `max_to_keep` old steps are kept.

Restoring reads into the target's shardings: pass a model/optimizer that is either
concrete (arrays already placed, e.g. by `ctu.sharding.create_sharded_model`) or
abstract (`nnx.eval_shape` whose ShapeDtypeStructs carry a `sharding`); each array is
read straight onto its devices and the objects are updated in place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

ITEMS = ("model", "optimizer", "rng", "data")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpointing settings.

    Attributes:
      max_to_keep: how many most recent checkpoints stay on disk.
      save_interval_steps: `save` writes only at steps that are a multiple of this
        (or when forced).
      async_save: write in a background thread while training continues.
    """

    max_to_keep: int = 3
    save_interval_steps: int = 1
    async_save: bool = True

    def __post_init__(self):
        if self.max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {self.max_to_keep}")
        if self.save_interval_steps < 1:
            raise ValueError(
                f"checkpoint.save_interval_steps must be >= 1, got {self.save_interval_steps}"
            )


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns besides the in-place model/optimizer update."""

    step: int
    rng: jax.Array
    data_position: dict[str, Any]


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (with the leaves' shardings) for a pytree of arrays or structs."""

    def to_struct(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(to_struct, tree)


def _replicated_on_all_devices() -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


class Checkpointer:
    """Saves and restores training state under `directory` (one subdirectory per step)."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig | None = None):
        config = config or CheckpointConfig()
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.max_to_keep,
            save_interval_steps=config.save_interval_steps,
            enable_async_checkpointing=config.async_save,
            create=True,
            # Left-overs of a save interrupted by a kill are removed at start-up.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest fully committed step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        *,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        rng: jax.Array,
        data_position: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Starts saving `step` (asynchronously); False if the interval skipped it.

        `rng` is a typed key (`jax.random.key`); `data_position` is JSON-serialisable.
        """
        if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            raise TypeError(
                "rng must be a typed key from jax.random.key(...); got dtype "
                f"{rng.dtype}. Wrap raw uint32 keys with jax.random.wrap_key_data."
            )
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
            rng=ocp.args.JaxRandomKeySave(rng),
            data=ocp.args.JsonSave(dict(data_position)),
        )
        return self._manager.save(int(step), args=args, force=force)

    def restore(
        self,
        *,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        step: int | None = None,
    ) -> Restored:
        """Restores `step` (default: the latest) into `model` and `optimizer` in place.

        Arrays are read onto the shardings of the target's current leaves (concrete
        arrays or ShapeDtypeStructs from `nnx.eval_shape`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint under {self.directory}; start fresh or point the workdir "
                "at a run that saved one"
            )
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {self.directory}; "
                f"available: {self.all_steps()}"
            )
        model_state = nnx.state(model)
        optimizer_state = nnx.state(optimizer)
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(model_state))),
            optimizer=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(optimizer_state))),
            # Replicated on every device: the saved sharding may name another topology.
            rng=ocp.args.JaxRandomKeyRestore(
                ocp.ArrayRestoreArgs(sharding=_replicated_on_all_devices())
            ),
            data=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        nnx.replace_by_pure_dict(model_state, restored["model"])
        nnx.replace_by_pure_dict(optimizer_state, restored["optimizer"])
        nnx.update(model, model_state)
        nnx.update(optimizer, optimizer_state)
        return Restored(step=int(step), rng=restored["rng"], data_position=restored["data"])

    def wait_until_finished(self) -> None:
        """Blocks until the last asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_to_hf(model: nnx.Module, out_dir: str | os.PathLike, *, dtype: Any = None) -> Any:
    """Writes the policy as a Hugging Face folder through `ctu.models.to_hf`.

    Call it on every process: sharded weights are gathered, then process 0 writes.
    `dtype` (e.g. "bfloat16") defaults to the model's parameter dtype.
    """
    from ctu.models import to_hf  # Imported here: checkpointing itself needs no model code.

    return to_hf(model, model.config, os.fspath(out_dir), dtype=dtype)
