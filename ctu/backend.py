"""The JAX backend of a program: the platform, XLA:CPU flags, multi-host start-up.

`initialize_backend` picks cpu/gpu/tpu through `jax_platforms`
and, for multi-host runs, calls `jax.distributed.initialize()` with no arguments: the
coordinator address, process count and id are auto-detected from the cluster (Cloud
TPU, SLURM, Open MPI, Kubernetes; JAX_COORDINATOR_ADDRESS overrides the address).
Every process then runs the same program; each passes its own rows to
`ctu.rl.train_step.Learner.update` / `shard_batch`, which assemble the global batch
(`jax.make_array_from_process_local_data`); metrics and checkpoints already follow
the process-0-writes / all-processes-save rules of ctu.metrics and orbax. Multi-host
is not exercised by the tests (one machine).
"""

import os

import jax

BACKENDS = ("cpu", "gpu", "tpu")


# XLA:CPU flags for the jaxlib versions they were measured on (docs/results.md §4).
# YNNPACK's reduce and elementwise fusions ran the attention softmax and its backward
# several times slower than XLA's own loops: without them a warm-start step on jaxlib
# 0.10 took 15% less time and a decode step the same. YNNPACK keeps the matmuls.
# Experimental flags can vanish in a later jaxlib, and XLA refuses unknown flags, so
# other versions get none of them.
CPU_XLA_FLAGS = {"0.10.": ("--xla_cpu_experimental_ynn_fusion_type=-reduce,-eltwise",)}


CPU_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def add_cpu_xla_flags(environ=os.environ, *, devices: int = 0) -> tuple[str, ...]:
    """Appends this jaxlib's `CPU_XLA_FLAGS` to `XLA_FLAGS` in `environ`; returns them.

    `devices` > 0 also asks for that many CPU devices (e.g. `cpu_cores()`): XLA:CPU runs
    a small decode step's matmuls on one core, so data-parallel decode loops, one per
    device (`ctu.sampling.engine.decode_step`), are what put every core to work.

    A flag the user already set in XLA_FLAGS is left as they set it. Only takes effect
    if called before JAX opens its CPU backend.
    """
    import jaxlib

    flags = next(
        (flags for prefix, flags in CPU_XLA_FLAGS.items() if jaxlib.__version__.startswith(prefix)),
        (),
    )
    if devices > 0:
        flags = (*flags, f"{CPU_DEVICE_COUNT_FLAG}={devices}")
    current = environ.get("XLA_FLAGS", "")
    added = tuple(f for f in flags if f.split("=")[0] + "=" not in current)
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def initialize_backend(backend: str, *, distributed: bool = False, cpu_devices: int = 1) -> None:
    """Selects the platform and, when `distributed`, joins the multi-host job.

    Call once at start-up, before anything touches a JAX device. On CPU it also adds
    `CPU_XLA_FLAGS` and asks for `cpu_devices` CPU devices (see `add_cpu_xla_flags`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
    if backend == "cpu":
        add_cpu_xla_flags(devices=cpu_devices if cpu_devices > 1 else 0)
    # "gpu" is left to JAX's own choice among the installed GPU plugins: naming it
    # expands to "cuda,rocm", and JAX then fails on a machine that has only one of them.
    if backend != "gpu":
        jax.config.update("jax_platforms", backend)
    if distributed:
        jax.distributed.initialize()  # Must come before the first device use.
    if jax.default_backend() != backend:
        raise RuntimeError(
            f"backend={backend!r} was requested but JAX runs on {jax.default_backend()!r}: "
            "call initialize_backend before any JAX computation (and install jax[cuda12] "
            "or jax[tpu] for accelerators)"
        )
