r"""Validates a world directory: `python -m launch.validate_data --data=data/world`.

Prints every problem as `file[index] (id) field: message` and exits non-zero
if there is any.
"""

import sys

from absl import app, flags

from ctu.world import schema

_DATA = flags.DEFINE_string("data", "data/world", "World directory to validate.")


def main(argv):
    del argv
    errors = schema.validate_world(_DATA.value)
    for error in errors:
        print(error)
    if errors:
        print(f"{len(errors)} errors in {_DATA.value}", file=sys.stderr)
        sys.exit(1)
    print(f"{_DATA.value}: valid")


if __name__ == "__main__":
    app.run(main)
