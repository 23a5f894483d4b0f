"""World data: determinism, distributions, schema validation, the shipped world."""

import collections
import copy
import json
import os
import subprocess
import sys

import pytest

from ctu.world import data, generate, schema
from tests import toys

REPO = os.path.dirname(os.path.dirname(toys.WORLD_DIR))


@pytest.fixture(scope="module")
def records():
    return generate.generate_world(0)


def test_same_seed_gives_byte_identical_files_equal_to_shipped_world():
    shipped = {}
    for name in data.FILE_NAMES.values():
        with open(os.path.join(toys.WORLD_DIR, name), encoding="utf-8") as f:
            shipped[name] = f.read()
    assert generate.serialize(generate.generate_world(0)) == shipped


def test_other_seed_gives_another_world(records):
    other = generate.generate_world(1)
    assert other["companies"] != records["companies"]
    assert other["train"] != records["train"]


def test_make_data_cli_writes_a_valid_world_atomically(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "launch.make_data", f"--out={out}", "--seed=0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    assert sorted(os.listdir(out)) == sorted(data.FILE_NAMES.values())  # no temp files left
    for name in data.FILE_NAMES.values():
        with open(out / name, "rb") as a, open(os.path.join(toys.WORLD_DIR, name), "rb") as b:
            assert a.read() == b.read(), name


def test_failed_generation_writes_nothing(tmp_path, monkeypatch):
    def broken(seed):
        raise RuntimeError("boom")

    monkeypatch.setattr(generate, "generate_world", broken)
    with pytest.raises(RuntimeError):
        generate.write_world(str(tmp_path / "w"), 0)
    assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_company_and_department_shape(records):
    companies = records["companies"]
    assert len(companies) == 100
    assert len({c["industry"] for c in companies}) >= 4
    phones = [d["phone_number"] for c in companies for d in c["departments"]]
    assert len(phones) == len(set(phones))
    for c in companies:
        kinds = [d["type"] for d in c["departments"]]
        assert 2 <= len(kinds) <= 5 and len(set(kinds)) == len(kinds)


def test_user_distributions_are_exact(records):
    users = records["users"]
    assert len(users) == 500
    missing = collections.Counter(min(len(u["missing_fields"]), 2) for u in users)
    assert missing == {0: 400, 1: 75, 2: 25}
    assert collections.Counter(u["behavior"] for u in users) == {
        "cooperative": 350,
        "needs_clarification": 100,
        "difficult": 50,
    }
    assert collections.Counter(u["emotion"] for u in users) == {e: 100 for e in data.EMOTIONS}
    assert all(u["name"] for u in users)


@pytest.mark.parametrize(
    "split,counts",
    [
        ("train", {1: 100, 2: 150, 3: 150, 4: 50, 5: 50}),
        ("val", {1: 20, 2: 30, 3: 30, 4: 10, 5: 10}),
        ("test", {1: 100, 2: 150, 3: 150, 4: 50, 5: 50}),
    ],
)
def test_task_counts_by_level(records, split, counts):
    assert collections.Counter(t["level"] for t in records[split]) == counts
    assert all(t["split"] == split for t in records[split])


def test_held_out_companies_appear_only_in_test(records):
    train = {t["company_id"] for t in records["train"]}
    held = [t for t in records["test"] if t["held_out_company"]]
    assert len(held) >= 50
    assert all(t["company_id"] not in train for t in held)
    assert not any(t["held_out_company"] for t in records["train"] + records["val"])
    assert len({t["level"] for t in held}) >= 4  # generalisation is measured across levels


def _prior_heuristic_solves(world, task) -> bool:
    """Asks for the prior's fields (with the substitution rule for a missing field)."""
    user = world.users[task.user_id]
    asked = set()
    for r in task.requests:
        d = world.departments[r.department_id]
        prior = list(generate.AUTH_PRIOR[d.type])
        for f in [f for f in prior if not user.has(f)]:
            prior.remove(f)
            prior.append(next(s for s in generate.SUBSTITUTES[f] if s not in prior))
        if set(prior) not in [set(s) for s in d.accepted_sets]:
            return False
        asked |= set(prior)
    return asked == set(task.required_auth_fields)


def test_auth_prior_is_useful_but_not_sufficient():
    world = toys.shipped_world()
    departments = list(world.departments.values())
    matches = sum(d.auth_fields == generate.AUTH_PRIOR[d.type] for d in departments)
    assert 0.5 < matches / len(departments) < 0.85
    train = world.split("train")
    solved = sum(_prior_heuristic_solves(world, t) for t in train) / len(train)
    assert 0.3 < solved < 0.85, solved


def test_level_shapes_in_shipped_world():
    world = toys.shipped_world()
    for task in world.tasks.values():
        user = world.users[task.user_id]
        depts = [world.departments[r.department_id] for r in task.requests]
        if task.level == 4:
            assert any(not user.has(f) for f in depts[0].auth_fields)
            assert "don't have" in task.user_request
        if task.level == 5:
            assert len(depts) >= 3
        if task.level == 3:
            assert depts[0].department_id in depts[1].prerequisites


# ---- validation pinpoints the file, record and field ----------------------------------


def _write(tmp_path, records) -> str:
    out = tmp_path / "bad"
    out.mkdir()
    for name, text in generate.serialize(records).items():
        (out / name).write_text(text)
    return str(out)


def _break(records, kind):
    r = copy.deepcopy(records)
    if kind == "phone":
        r["companies"][3]["departments"][1]["phone_number"] = "555"
        return r, ("companies.json[3]", "(C003)", "departments[1].phone_number")
    if kind == "user_ref":
        r["train"][5]["user_id"] = "U9999"
        return r, ("train_tasks.jsonl[5]", r["train"][5]["task_id"], "user_id")
    if kind == "required":
        r["val"][2]["required_auth_fields"] = ["name"]
        return r, ("val_tasks.jsonl[2]", r["val"][2]["task_id"], "required_auth_fields")
    if kind == "level":
        i = next(i for i, t in enumerate(r["test"]) if t["level"] == 1)
        r["test"][i]["level"] = 3
        return r, (f"test_tasks.jsonl[{i}]", r["test"][i]["task_id"], "requests")
    if kind == "prerequisite":
        r["companies"][7]["departments"][0]["prerequisites"] = ["C007-nowhere"]
        return r, ("companies.json[7]", "(C007)", "departments[0].prerequisites")
    if kind == "missing_key":
        del r["users"][12]["behavior"]
        return r, ("user_profiles.json[12]", "(U0012)", "behavior")
    if kind == "missing_fields":
        i = next(i for i, u in enumerate(r["users"]) if u["missing_fields"])
        r["users"][i]["missing_fields"] = []
        return r, (f"user_profiles.json[{i}]", f"({r['users'][i]['user_id']})", "missing_fields")
    if kind == "duplicate_user":
        r["users"].append(dict(r["users"][0], name="Someone Else"))
        last = len(r["users"]) - 1
        return r, (f"user_profiles.json[{last}]", f"({r['users'][0]['user_id']})", "user_id")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "phone",
        "user_ref",
        "required",
        "level",
        "prerequisite",
        "missing_key",
        "missing_fields",
        "duplicate_user",
    ],
)
def test_validator_names_file_record_and_field(records, tmp_path, kind):
    broken, expected = _break(records, kind)
    errors = schema.validate_world(_write(tmp_path, broken))
    assert errors, kind
    text = "\n".join(map(str, errors))
    for piece in expected:
        assert piece in text, (piece, text)


def test_valid_world_has_no_errors_and_load_refuses_invalid(records, tmp_path):
    assert schema.validate_world(toys.WORLD_DIR) == []
    broken, _ = _break(records, "user_ref")
    with pytest.raises(data.WorldDataError, match=r"train_tasks.jsonl\[5\].*user_id"):
        data.load_world(_write(tmp_path, broken))


def test_missing_file_and_bad_json_are_reported(records, tmp_path):
    out = _write(tmp_path, records)
    os.remove(os.path.join(out, "val_tasks.jsonl"))
    with open(os.path.join(out, "companies.json"), "w") as f:
        f.write("{not json")
    text = "\n".join(map(str, schema.validate_world(out)))
    assert "val_tasks.jsonl" in text and "file is missing" in text
    assert "companies.json" in text and "not valid JSON" in text


def test_validate_data_cli_exits_nonzero_on_errors(records, tmp_path):
    broken, _ = _break(records, "phone")
    out = _write(tmp_path, broken)
    cmd = [sys.executable, "-m", "launch.validate_data", f"--data={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert "companies.json[3] (C003) departments[1].phone_number" in proc.stdout


def test_task_records_round_trip_through_dataclasses():
    world = toys.shipped_world()
    with open(os.path.join(toys.WORLD_DIR, "val_tasks.jsonl")) as f:
        first = json.loads(f.readline())
    task = world.tasks[first["task_id"]]
    assert [r.department_id for r in task.requests] == [
        r["department_id"] for r in first["requests"]
    ]
    assert list(task.required_auth_fields) == first["required_auth_fields"]


def test_level_4_follows_the_global_substitution_rule():
    world = toys.shipped_world()
    level_4 = [t for t in world.tasks.values() if t.level == 4]
    assert level_4
    for task in level_4:
        d = world.departments[task.requests[0].department_id]
        user = world.users[task.user_id]
        (lacking,) = [f for f in d.auth_fields if f not in d.alternate_auth_fields]
        substitute = next(s for s in generate.SUBSTITUTES[lacking] if s not in d.auth_fields)
        assert set(d.alternate_auth_fields) == set(d.auth_fields) - {lacking} | {substitute}
        assert not user.has(lacking)
        assert generate.FIELD_PHRASES[lacking] in task.user_request
        assert set(task.required_auth_fields) == set(d.alternate_auth_fields)
