"""Test session setup: 8 simulated CPU devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ctu.backend import add_cpu_xla_flags  # noqa: E402  (imports JAX; opens no backend)

add_cpu_xla_flags()  # the flags the programs run with on CPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
