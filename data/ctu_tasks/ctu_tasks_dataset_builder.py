r"""TFDS builder for the ctu task splits, written as array_record.

Build from a world directory (written by `python -m launch.make_data`), without
TensorFlow:

    python data/ctu_tasks/ctu_tasks_dataset_builder.py --world_dir=data/world \
        --data_dir=/tmp/tfds

or from Python: `build(world_dir, data_dir)`, which is

    builder = Builder(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=world_dir))

(`tfds build data/ctu_tasks --manual_dir=...` does the same where TensorFlow is
installed; the `tfds` command line itself imports TensorFlow, tensorflow-datasets
4.9.10 scripts/cli/convert_format_utils.py, so it cannot run here.)

Read back (no TensorFlow needed):

    source = tfds.data_source("ctu_tasks", data_dir="/tmp/tfds")
    task = example_to_task(source["validation"][0])

Splits: train, validation, test (from train_tasks.jsonl, val_tasks.jsonl,
test_tasks.jsonl), in file order (shuffling is disabled so record i is line i).
Every task field of docs/architecture.md is a typed feature; `requests` is a
sequence of {request_type, department_id}, which TFDS decodes as a dict of
lists. Text decodes as bytes: `example_to_task` turns a record back into the
exact dict of the jsonl line.
"""

import importlib.resources
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from etils import epath

# tensorflow-datasets 4.9.x imports `importlib_resources` when it prepares a
# builder that lives in a package, but does not declare it as a dependency
# (tensorflow/datasets#11212). The standard library module has the one class it
# uses (`abc.Traversable`), so fall back to it when the backport is absent.
try:
    import importlib_resources  # noqa: F401
except ImportError:
    sys.modules["importlib_resources"] = importlib.resources

SPLIT_FILES = {
    "train": "train_tasks.jsonl",
    "validation": "val_tasks.jsonl",
    "test": "test_tasks.jsonl",
}

_TEXT_FIELDS = ("task_id", "split", "company_id", "user_id", "user_request")


def task_to_example(task: dict) -> dict:
    """One jsonl task -> the feature dict TFDS encodes."""
    return {
        **{name: task[name] for name in _TEXT_FIELDS},
        "level": task["level"],
        "requests": [
            {"request_type": r["request_type"], "department_id": r["department_id"]}
            for r in task["requests"]
        ],
        "required_auth_fields": list(task["required_auth_fields"]),
        "held_out_company": task["held_out_company"],
    }


def example_to_task(record: dict) -> dict:
    """A record read with `tfds.data_source` -> the task dict of the jsonl line."""

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    requests = record["requests"]
    return {
        **{name: text(record[name]) for name in _TEXT_FIELDS},
        "level": int(record["level"]),
        "requests": [
            {"request_type": text(kind), "department_id": text(department)}
            for kind, department in zip(
                requests["request_type"], requests["department_id"], strict=True
            )
        ],
        "required_auth_fields": [text(f) for f in record["required_auth_fields"]],
        "held_out_company": bool(record["held_out_company"]),
    }


def check_world_dir(world_dir) -> None:
    """Raises FileNotFoundError naming what is missing and how to make it."""
    missing = [name for name in SPLIT_FILES.values() if not (Path(world_dir) / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"world directory {world_dir} has no {', '.join(missing)}; pass a directory "
            "written by `python -m launch.make_data --out=DIR` (e.g. data/world)."
        )


class Builder(tfds.core.GeneratorBasedBuilder):
    """The ctu tasks: user requests to be served by calling company departments."""

    # Explicit name and package directory (README.md, checksums.tsv), so the
    # module works imported from any path and run as a script.
    name = "ctu_tasks"
    pkg_dir_path = epath.Path(__file__).parent
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Pass --manual_dir=DIR (or DownloadConfig(manual_dir=DIR)) where DIR is a world
    directory written by `python -m launch.make_data --out=DIR`, for example the
    shipped data/world. It must hold train_tasks.jsonl, val_tasks.jsonl and
    test_tasks.jsonl.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "task_id": text,
                    "split": text,
                    "level": np.int32,
                    "company_id": text,
                    "user_id": text,
                    "user_request": text,
                    "requests": tfds.features.Sequence(
                        {"request_type": text, "department_id": text}
                    ),
                    "required_auth_fields": tfds.features.Sequence(text),
                    "held_out_company": np.bool_,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        world_dir = dl_manager.manual_dir
        check_world_dir(world_dir)
        return {
            split: self._generate_examples(world_dir / name) for split, name in SPLIT_FILES.items()
        }

    def _generate_examples(self, path):
        with path.open() as f:
            for line in f:
                if line.strip():
                    task = json.loads(line)
                    yield task["task_id"], task_to_example(task)


def build(world_dir, data_dir) -> tfds.core.DatasetBuilder:
    """Writes the array_record dataset for `world_dir` under `data_dir`."""
    check_world_dir(world_dir)
    builder = Builder(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(world_dir))
    )
    return builder


_WORLD_DIR = flags.DEFINE_string("world_dir", "data/world", "World directory with the task jsonl.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to write.", required=True)


def main(argv):
    del argv
    try:
        builder = build(_WORLD_DIR.value, _DATA_DIR.value)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {builder.data_dir}: {builder.info.splits}")


if __name__ == "__main__":
    app.run(main)
