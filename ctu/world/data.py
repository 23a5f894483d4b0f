"""World data: vocabularies, frozen dataclasses and `load_world(dir)`.

The on-disk format is described in docs/architecture.md ("World data") and its
JSON schemas live in `ctu/world/schema.py`. Everything here is plain Python.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping

# Auth field names are exactly the profile field names (the contract).
AUTH_FIELDS = (
    "name",
    "account_number",
    "last_4_ssn",
    "date_of_birth",
    "address",
    "phone",
    "credit_card_last4",
)
DEPARTMENT_TYPES = ("customer_service", "billing", "technical_support", "sales", "fraud")
DEPARTMENT_NAMES = {
    "customer_service": "Customer Service",
    "billing": "Billing",
    "technical_support": "Technical Support",
    "sales": "Sales",
    "fraud": "Fraud",
}
BEHAVIORS = ("cooperative", "needs_clarification", "difficult")
EMOTIONS = ("control", "frustration", "anxiety", "anger", "confusion")
SPLITS = ("train", "val", "test")
LEVELS = (1, 2, 3, 4, 5)

# Request types per department type, with the phrase users and department
# descriptions both use, so mapping a request to a department is learnable.
REQUEST_PHRASES = {
    "update_address": "update the address on my account",
    "account_inquiry": "ask a question about my account",
    "close_account": "close my account",
    "update_contact_info": "change the contact details on my account",
    "dispute_charge": "dispute a charge on my bill",
    "refund_request": "get a refund",
    "payment_plan": "set up a payment plan",
    "billing_statement": "get a copy of my billing statement",
    "reset_password": "reset my online password",
    "service_outage": "report a service outage",
    "device_setup": "get help setting up my device",
    "app_login_issue": "fix a problem logging into the app",
    "upgrade_plan": "upgrade my plan",
    "new_product_inquiry": "ask about a new product",
    "promotion_inquiry": "ask about current promotions",
    "add_service": "add a service to my account",
    "report_fraud": "report a suspicious transaction",
    "lost_card": "report a lost card",
    "identity_theft": "report identity theft",
    "freeze_account": "freeze my account",
}
REQUEST_TYPES_BY_DEPARTMENT = {
    "customer_service": (
        "update_address",
        "account_inquiry",
        "close_account",
        "update_contact_info",
    ),
    "billing": ("dispute_charge", "refund_request", "payment_plan", "billing_statement"),
    "technical_support": ("reset_password", "service_outage", "device_setup", "app_login_issue"),
    "sales": ("upgrade_plan", "new_product_inquiry", "promotion_inquiry", "add_service"),
    "fraud": ("report_fraud", "lost_card", "identity_theft", "freeze_account"),
}
REQUEST_TYPES = tuple(REQUEST_PHRASES)
FILE_NAMES = {
    "companies": "companies.json",
    "users": "user_profiles.json",
    "train": "train_tasks.jsonl",
    "val": "val_tasks.jsonl",
    "test": "test_tasks.jsonl",
}


class WorldDataError(ValueError):
    """A world directory that is missing files or fails validation."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Department:
    department_id: str
    type: str
    name: str
    phone_number: str
    description: str
    handles: tuple[str, ...]
    auth_fields: tuple[str, ...]
    alternate_auth_fields: tuple[str, ...]
    prerequisites: tuple[str, ...]

    def __post_init__(self):
        _check(self.type in DEPARTMENT_TYPES, f"{self.department_id}: bad type {self.type!r}")
        _check(bool(self.auth_fields), f"{self.department_id}: auth_fields is empty")
        for field in self.auth_fields + self.alternate_auth_fields:
            _check(field in AUTH_FIELDS, f"{self.department_id}: unknown auth field {field!r}")

    @functools.cached_property
    def accepted_sets(self) -> tuple[tuple[str, ...], ...]:
        """The auth field sets this department accepts, primary first."""
        if self.alternate_auth_fields:
            return (self.auth_fields, self.alternate_auth_fields)
        return (self.auth_fields,)


@dataclasses.dataclass(frozen=True)
class Company:
    company_id: str
    name: str
    industry: str
    aliases: tuple[str, ...]
    departments: tuple[Department, ...]

    def __post_init__(self):
        _check(2 <= len(self.departments) <= 5, f"{self.company_id}: needs 2-5 departments")


@dataclasses.dataclass(frozen=True)
class UserProfile:
    user_id: str
    values: Mapping[str, str | None]  # auth field -> value; None when missing
    missing_fields: tuple[str, ...]
    behavior: str
    emotion: str

    def __post_init__(self):
        _check(self.behavior in BEHAVIORS, f"{self.user_id}: bad behavior {self.behavior!r}")
        _check(self.emotion in EMOTIONS, f"{self.user_id}: bad emotion {self.emotion!r}")
        missing = {f for f in AUTH_FIELDS if self.values.get(f) is None}
        _check(missing == set(self.missing_fields), f"{self.user_id}: missing_fields mismatch")

    @property
    def name(self) -> str:
        return self.values["name"]

    def has(self, field: str) -> bool:
        return self.values.get(field) is not None


@dataclasses.dataclass(frozen=True)
class Request:
    request_type: str
    department_id: str


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    split: str
    level: int
    company_id: str
    user_id: str
    user_request: str
    requests: tuple[Request, ...]
    required_auth_fields: tuple[str, ...]
    held_out_company: bool

    def __post_init__(self):
        _check(self.split in SPLITS, f"{self.task_id}: bad split {self.split!r}")
        _check(self.level in LEVELS, f"{self.task_id}: bad level {self.level!r}")
        _check(bool(self.requests), f"{self.task_id}: no requests")


def auth_set_for(department: Department, user: UserProfile) -> tuple[str, ...]:
    """The auth set a user presents: the primary one, else the alternate (L4).

    Returns the primary set when the user can satisfy neither, so the caller
    sees which fields are missing.
    """
    for fields in department.accepted_sets:
        if all(user.has(f) for f in fields):
            return fields
    return department.auth_fields


@dataclasses.dataclass(frozen=True)
class World:
    companies: Mapping[str, Company]
    users: Mapping[str, UserProfile]
    tasks: Mapping[str, Task]  # task_id -> task, all splits
    departments: Mapping[str, Department]  # department_id -> department
    department_company: Mapping[str, str]  # department_id -> company_id

    def split(self, name: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.split == name]


# ---- decoding JSON records -------------------------------------------------------------


def department_from_json(record: dict) -> Department:
    return Department(
        department_id=record["department_id"],
        type=record["type"],
        name=record["name"],
        phone_number=record["phone_number"],
        description=record["description"],
        handles=tuple(record["handles"]),
        auth_fields=tuple(record["auth_fields"]),
        alternate_auth_fields=tuple(record["alternate_auth_fields"]),
        prerequisites=tuple(record["prerequisites"]),
    )


def company_from_json(record: dict) -> Company:
    return Company(
        company_id=record["company_id"],
        name=record["name"],
        industry=record["industry"],
        aliases=tuple(record["aliases"]),
        departments=tuple(department_from_json(d) for d in record["departments"]),
    )


def user_from_json(record: dict) -> UserProfile:
    return UserProfile(
        user_id=record["user_id"],
        values={f: record[f] for f in AUTH_FIELDS},
        missing_fields=tuple(record["missing_fields"]),
        behavior=record["behavior"],
        emotion=record["emotion"],
    )


def task_from_json(record: dict) -> Task:
    return Task(
        task_id=record["task_id"],
        split=record["split"],
        level=record["level"],
        company_id=record["company_id"],
        user_id=record["user_id"],
        user_request=record["user_request"],
        requests=tuple(Request(r["request_type"], r["department_id"]) for r in record["requests"]),
        required_auth_fields=tuple(record["required_auth_fields"]),
        held_out_company=record["held_out_company"],
    )


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_world(companies: list[dict], users: list[dict], tasks: list[dict]) -> World:
    """Builds a World from already-validated JSON records."""
    company_objs = {c["company_id"]: company_from_json(c) for c in companies}
    departments, department_company = {}, {}
    for company in company_objs.values():
        for d in company.departments:
            departments[d.department_id] = d
            department_company[d.department_id] = company.company_id
    return World(
        companies=company_objs,
        users={u["user_id"]: user_from_json(u) for u in users},
        tasks={t["task_id"]: task_from_json(t) for t in tasks},
        departments=departments,
        department_company=department_company,
    )


def load_world(data_dir: str | os.PathLike) -> World:
    """Loads and validates a world directory; refuses an invalid one.

    Raises WorldDataError whose message lists every problem with its file,
    record and field.
    """
    from ctu.world import schema  # schema imports this module's vocabularies

    errors = schema.validate_world(data_dir)
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        raise WorldDataError(
            f"invalid world in {os.fspath(data_dir)} ({len(errors)} errors); "
            f"regenerate it with `python -m launch.make_data --out=DIR`:\n  {shown}{more}"
        )
    d = os.fspath(data_dir)
    tasks = []
    for split in SPLITS:
        tasks += read_jsonl(os.path.join(d, FILE_NAMES[split]))
    return build_world(
        read_json(os.path.join(d, FILE_NAMES["companies"])),
        read_json(os.path.join(d, FILE_NAMES["users"])),
        tasks,
    )
