r"""Benchmarks: `python -m launch.bench NAME --out=FILE.json`.

NAME is one of the modules in ctu/bench (env, feedback_update, sampler, train_step).
Each writes its figures as JSON to --out and prints them. The XLA:CPU flags the
training programs use (`ctu.backend.CPU_XLA_FLAGS`) apply here too; a benchmark
module with `ONE_CPU_DEVICE_PER_CORE = True` (the sampler) also gets one CPU device
per core.
"""

import importlib
import json

from absl import app, flags

from ctu.backend import add_cpu_xla_flags, cpu_cores
from ctu.world.evaluation import check_output_path

BENCHMARKS = ("env", "feedback_update", "sampler", "train_step")

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.", required=True)


def main(argv):
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise app.UsageError(
            f"usage: python -m launch.bench {{{'|'.join(BENCHMARKS)}}} --out=FILE.json"
        )
    try:
        check_output_path(_OUT.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    module = importlib.import_module(f"ctu.bench.{argv[1]}")  # opens no JAX backend
    per_core = getattr(module, "ONE_CPU_DEVICE_PER_CORE", False)
    add_cpu_xla_flags(devices=cpu_cores() if per_core else 0)  # before any backend opens
    results = module.run(_OUT.value)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
