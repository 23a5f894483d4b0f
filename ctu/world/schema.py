"""JSON schemas of every world file and `validate_world(dir)`.

Errors name the file, the record (index and id) and the field that is wrong, so
a bad hand edit or a generator bug is found without a debugger.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jsonschema

from ctu.world import data

_ID = {
    "company": r"^C[0-9]{3}$",
    "department": r"^C[0-9]{3}-[a-z_]+$",
    "user": r"^U[0-9]{4}$",
    "task": r"^(train|val|test)-[0-9]{4}$",
}
_FIELD_LIST = {
    "type": "array",
    "items": {"enum": list(data.AUTH_FIELDS)},
    "uniqueItems": True,
}
_TEXT = {"type": "string", "minLength": 1}

DEPARTMENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "department_id",
        "type",
        "name",
        "phone_number",
        "description",
        "handles",
        "auth_fields",
        "alternate_auth_fields",
        "prerequisites",
    ],
    "properties": {
        "department_id": {"type": "string", "pattern": _ID["department"]},
        "type": {"enum": list(data.DEPARTMENT_TYPES)},
        "name": _TEXT,
        "phone_number": {"type": "string", "pattern": r"^\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}$"},
        "description": _TEXT,
        "handles": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": list(data.REQUEST_TYPES)},
        },
        "auth_fields": {**_FIELD_LIST, "minItems": 1},
        "alternate_auth_fields": _FIELD_LIST,
        "prerequisites": {
            "type": "array",
            "uniqueItems": True,
            "items": {"type": "string", "pattern": _ID["department"]},
        },
    },
}
COMPANY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["company_id", "name", "industry", "aliases", "departments"],
    "properties": {
        "company_id": {"type": "string", "pattern": _ID["company"]},
        "name": _TEXT,
        "industry": _TEXT,
        "aliases": {"type": "array", "items": _TEXT},
        "departments": {"type": "array", "minItems": 2, "maxItems": 5, "items": DEPARTMENT_SCHEMA},
    },
}
_NULLABLE_TEXT = {"type": ["string", "null"], "minLength": 1}
USER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [*data.AUTH_FIELDS, "user_id", "missing_fields", "behavior", "emotion"],
    "properties": {
        "user_id": {"type": "string", "pattern": _ID["user"]},
        **{f: _NULLABLE_TEXT for f in data.AUTH_FIELDS},
        "name": _TEXT,  # everyone has a name
        "missing_fields": _FIELD_LIST,
        "behavior": {"enum": list(data.BEHAVIORS)},
        "emotion": {"enum": list(data.EMOTIONS)},
    },
}
TASK_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": [
        "task_id",
        "split",
        "level",
        "company_id",
        "user_id",
        "user_request",
        "requests",
        "required_auth_fields",
        "held_out_company",
    ],
    "properties": {
        "task_id": {"type": "string", "pattern": _ID["task"]},
        "split": {"enum": list(data.SPLITS)},
        "level": {"enum": list(data.LEVELS)},
        "company_id": {"type": "string", "pattern": _ID["company"]},
        "user_id": {"type": "string", "pattern": _ID["user"]},
        "user_request": _TEXT,
        "requests": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["request_type", "department_id"],
                "properties": {
                    "request_type": {"enum": list(data.REQUEST_TYPES)},
                    "department_id": {"type": "string", "pattern": _ID["department"]},
                },
            },
        },
        "required_auth_fields": {**_FIELD_LIST, "minItems": 1},
        "held_out_company": {"type": "boolean"},
    },
}
RECORD_SCHEMAS = {"companies": COMPANY_SCHEMA, "users": USER_SCHEMA, "task": TASK_SCHEMA}
_VALIDATORS = {k: jsonschema.Draft202012Validator(s) for k, s in RECORD_SCHEMAS.items()}
_ID_KEYS = {"companies": "company_id", "users": "user_id", "task": "task_id"}


@dataclasses.dataclass(frozen=True)
class WorldError:
    """One problem: the file, the record (index and id) and the field."""

    file: str
    index: int | None
    record_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.index is not None:
            where += f"[{self.index}]"
        if self.record_id:
            where += f" ({self.record_id})"
        return f"{where} {self.field or '<record>'}: {self.message}"


def _path_str(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_errors(kind: str, file: str, records: list) -> list[WorldError]:
    errors = []
    for i, record in enumerate(records):
        rid = record.get(_ID_KEYS[kind]) if isinstance(record, dict) else None
        rid = rid if isinstance(rid, str) else None
        for e in sorted(_VALIDATORS[kind].iter_errors(record), key=lambda e: list(e.path)):
            errors.append(WorldError(file, i, rid, _path_str(e.path), e.message[:300]))
    return errors


def _read(path: str, jsonl: bool) -> tuple[list | None, list[WorldError]]:
    file = os.path.basename(path)
    if not os.path.exists(path):
        return None, [WorldError(file, None, None, "", "file is missing")]
    try:
        records = data.read_jsonl(path) if jsonl else data.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [WorldError(file, None, None, "", f"not valid JSON: {e}")]
    if not isinstance(records, list):
        return None, [WorldError(file, None, None, "", "top level must be a JSON list")]
    return records, []


def read_world_records(data_dir) -> tuple[dict[str, list], list[WorldError]]:
    """Reads every file and checks each record against its schema."""
    records, errors = {}, []
    for key, name in data.FILE_NAMES.items():
        recs, errs = _read(os.path.join(os.fspath(data_dir), name), jsonl=name.endswith("l"))
        errors += errs
        if recs is not None:
            kind = key if key in ("companies", "users") else "task"
            errors += _schema_errors(kind, name, recs)
            records[key] = recs
    return records, errors


def validate_world(data_dir) -> list[WorldError]:
    """Every schema and cross-reference problem of a world directory; [] when valid."""
    records, errors = read_world_records(data_dir)
    if errors:  # cross-references assume well-formed records
        return errors
    user_errors = _check_users(records["users"])
    if user_errors:  # the task checks build the users
        return _check_companies(records["companies"]) + user_errors
    return _check_companies(records["companies"]) + _check_tasks(records)


# ---- cross-reference checks ------------------------------------------------------------


def _check_companies(companies: list[dict]) -> list[WorldError]:
    file, errors = data.FILE_NAMES["companies"], []
    seen_ids, seen_phones = set(), {}
    for i, c in enumerate(companies):
        cid = c["company_id"]

        def err(field, message, i=i, cid=cid):
            errors.append(WorldError(file, i, cid, field, message))

        if cid in seen_ids:
            err("company_id", "duplicate company_id")
        seen_ids.add(cid)
        own = {d["department_id"] for d in c["departments"]}
        handled = set()
        for j, d in enumerate(c["departments"]):
            at = f"departments[{j}]"
            if not d["department_id"].startswith(cid + "-"):
                err(f"{at}.department_id", f"must start with {cid}-")
            if d["phone_number"] in seen_phones:
                err(f"{at}.phone_number", f"duplicate of {seen_phones[d['phone_number']]}")
            seen_phones[d["phone_number"]] = d["department_id"]
            for r in d["handles"]:
                if r in handled:
                    err(f"{at}.handles", f"request type {r!r} handled by two departments")
                handled.add(r)
            for p in d["prerequisites"]:
                if p not in own or p == d["department_id"]:
                    err(f"{at}.prerequisites", f"{p!r} is not another department of {cid}")
            if set(d["alternate_auth_fields"]) == set(d["auth_fields"]):
                err(f"{at}.alternate_auth_fields", "must differ from auth_fields (or be empty)")
        if not errors and _has_cycle(c["departments"]):
            err("departments", "prerequisites form a cycle")
    return errors


def _check_users(users: list[dict]) -> list[WorldError]:
    file, errors, seen = data.FILE_NAMES["users"], [], set()
    for i, u in enumerate(users):
        uid = u["user_id"]
        if uid in seen:
            errors.append(WorldError(file, i, uid, "user_id", "duplicate user_id"))
        seen.add(uid)
        lacking = sorted(f for f in data.AUTH_FIELDS if u[f] is None)
        if lacking != sorted(u["missing_fields"]):
            errors.append(
                WorldError(
                    file,
                    i,
                    uid,
                    "missing_fields",
                    f"must list the fields whose value is null: {lacking}",
                )
            )
    return errors


def _has_cycle(departments: list[dict]) -> bool:
    prereqs = {d["department_id"]: d["prerequisites"] for d in departments}
    state = {}  # 1 = visiting, 2 = done

    def visit(node) -> bool:
        if state.get(node) == 1:
            return True
        if state.get(node) == 2:
            return False
        state[node] = 1
        if any(visit(p) for p in prereqs.get(node, ())):
            return True
        state[node] = 2
        return False

    return any(visit(d) for d in sorted(prereqs))


def _expected_level_shape(level: int, n_requests: int) -> bool:
    if level in (1, 2, 4):
        return n_requests == 1
    return n_requests == 2 if level == 3 else n_requests >= 3


def _check_tasks(records: dict[str, list]) -> list[WorldError]:
    world = data.build_world(records["companies"], records["users"], [])
    train_companies = {t["company_id"] for t in records["train"]}
    errors, seen = [], set()
    for split in data.SPLITS:
        file = data.FILE_NAMES[split]
        for i, t in enumerate(records[split]):
            tid = t["task_id"]
            found = _check_task(t, split, world, train_companies, tid in seen)
            errors += [WorldError(file, i, tid, f, m) for f, m in found]
            seen.add(tid)
    return errors


def _check_task(t: dict, split: str, world: data.World, train_companies, duplicate) -> list:
    """(field, message) pairs for one task record."""
    out = []
    if duplicate:
        out.append(("task_id", "duplicate task_id"))
    if t["split"] != split:
        out.append(("split", f"is {t['split']!r} but the task is in the {split} file"))
    company = world.companies.get(t["company_id"])
    user = world.users.get(t["user_id"])
    if company is None:
        out.append(("company_id", f"unknown company {t['company_id']!r}"))
    if user is None:
        out.append(("user_id", f"unknown user {t['user_id']!r}"))
    if out:
        return out
    if t["held_out_company"] != (t["company_id"] not in train_companies):
        out.append(("held_out_company", "must be true exactly when no train task uses it"))
    reached, required = set(), set()
    departments = []
    for k, r in enumerate(t["requests"]):
        at = f"requests[{k}]"
        d = world.departments.get(r["department_id"])
        if d is None or world.department_company[d.department_id] != company.company_id:
            out.append((f"{at}.department_id", f"{r['department_id']!r} not in {company.name}"))
            continue
        if r["request_type"] not in d.handles:
            out.append((f"{at}.request_type", f"{d.department_id} does not handle it"))
        if d.department_id in reached:
            out.append((f"{at}.department_id", "department served twice"))
        for p in d.prerequisites:
            if p not in reached:
                out.append((f"{at}.department_id", f"prerequisite {p} is not served before it"))
        reached.add(d.department_id)
        departments.append(d)
        required.update(data.auth_set_for(d, user))
    if out:
        return out
    return out + _check_level(t, user, departments, required)


def _check_level(t: dict, user: data.UserProfile, departments: list, required: set) -> list:
    out, level = [], t["level"]
    if not _expected_level_shape(level, len(departments)):
        out.append(("requests", f"level {level} cannot have {len(departments)} requests"))
        return out
    if set(t["required_auth_fields"]) != required:
        out.append(("required_auth_fields", f"must be {sorted(required)}"))
    lacking = [f for f in required if not user.has(f)]
    if lacking:
        out.append(("user_id", f"user lacks required fields {sorted(lacking)}"))
    uses_alternate = any(data.auth_set_for(d, user) != d.auth_fields for d in departments)
    if uses_alternate != (level == 4):
        out.append(("level", "the alternate auth set is used exactly in level 4"))
    if level == 1 and (user.missing_fields or len(required) > 2):
        out.append(("level", "level 1 needs a complete profile and at most 2 auth fields"))
    if level == 2 and not 3 <= len(required) <= 4:
        out.append(("level", "level 2 needs 3-4 auth fields"))
    if level == 3 and departments[0].department_id not in departments[1].prerequisites:
        out.append(("requests", "level 3: the second department must require the first"))
    if level in (1, 2, 4) and departments[0].prerequisites:
        out.append(("requests", f"level {level}: the department must have no prerequisites"))
    return out
