r"""Benchmarks: `python -m launch.bench NAME --out=FILE.json`.

NAME is one of the modules in ctu/bench (env, feedback_update, sampler, train_step).
Each writes its figures as JSON to --out and prints them. The XLA:CPU flags the
training programs use (`ctu.rl.train_step.CPU_XLA_FLAGS`) apply here too.
"""

import importlib
import json

from absl import app, flags

from ctu.rl.train_step import add_cpu_xla_flags

BENCHMARKS = ("env", "feedback_update", "sampler", "train_step")

_OUT = flags.DEFINE_string("out", None, "Where to write the JSON results.", required=True)


def main(argv):
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise app.UsageError(
            f"usage: python -m launch.bench {{{'|'.join(BENCHMARKS)}}} --out=FILE.json"
        )
    add_cpu_xla_flags()  # before the benchmark opens a JAX backend
    module = importlib.import_module(f"ctu.bench.{argv[1]}")
    results = module.run(_OUT.value)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
