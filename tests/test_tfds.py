"""The ctu_tasks TFDS builder writes array_record that reads back, without TensorFlow."""

import importlib
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from tests import toys

builder_module = importlib.import_module("data.ctu_tasks.ctu_tasks_dataset_builder")


def _task(split, index, level, n_requests):
    return {
        "task_id": f"{split}-{index:03d}",
        "split": split,
        "level": level,
        "company_id": f"C{index:03d}",
        "user_id": f"U{index:04d}",
        "user_request": f"Hi, I need help ({index}) — café bill, please.",
        "requests": [
            {"request_type": f"request_{k}", "department_id": f"C{index:03d}-dept{k}"}
            for k in range(n_requests)
        ],
        "required_auth_fields": ["name", "date_of_birth", "last_4_ssn"][: level % 4],
        "held_out_company": index % 2 == 1,
    }


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    sizes = {"train": 7, "val": 3, "test": 5}
    tasks = {}
    for split, size in sizes.items():
        tasks[split] = [_task(split, i, 1 + i % 5, i % 4) for i in range(size)]
        with open(root / f"{split}_tasks.jsonl", "w") as f:
            f.writelines(json.dumps(task) + "\n" for task in tasks[split])
    return root, tasks


def test_array_record_round_trip_without_tensorflow(world_dir, tmp_path):
    root, tasks = world_dir
    builder_module.build(root, tmp_path)

    source = tfds.data_source("ctu_tasks", data_dir=str(tmp_path))
    assert set(source) == {"train", "validation", "test"}
    for split, jsonl_split in (("train", "train"), ("validation", "val"), ("test", "test")):
        records = [builder_module.example_to_task(record) for record in source[split]]
        assert records == tasks[jsonl_split]  # equal, in file order
    files = list((tmp_path / "ctu_tasks" / "1.0.0").glob("*.array_record*"))
    assert len(files) == 3
    assert "tensorflow" not in sys.modules


def test_shipped_world_round_trip(tmp_path):
    world_dir = toys.WORLD_DIR
    builder_module.build(world_dir, tmp_path / "tfds")
    source = tfds.data_source("ctu_tasks", data_dir=str(tmp_path / "tfds"))
    for split, file_name in builder_module.SPLIT_FILES.items():
        with open(os.path.join(world_dir, file_name)) as f:
            expected = [json.loads(line) for line in f]
        assert len(source[split]) == len(expected)
        assert [builder_module.example_to_task(r) for r in source[split]] == expected


def test_missing_world_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="launch.make_data"):
        builder_module.build(tmp_path / "nowhere", tmp_path / "out")
