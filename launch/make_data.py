r"""Generates a world: `python -m launch.make_data --out=data/world --seed=0`.

Writes companies.json, user_profiles.json and {train,val,test}_tasks.jsonl; the
same seed gives byte-identical files.
"""

import os

from absl import app, flags

from ctu.world import generate, schema

_OUT = flags.DEFINE_string("out", None, "Directory to write the world into.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the world.")


def main(argv):
    del argv
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
        raise app.UsageError(f"--out={_OUT.value} is a file; give a directory to write into")
    paths = generate.write_world(_OUT.value, _SEED.value)
    errors = schema.validate_world(_OUT.value)
    if errors:  # a generator bug; say so loudly rather than ship a bad world
        raise SystemExit("generated world is invalid:\n" + "\n".join(map(str, errors)))
    for path in paths.values():
        print(path)


if __name__ == "__main__":
    app.run(main)
