"""PhoneSystem: authentication -> routing -> service, one instance per episode.

Answers like a customer-service representative and fails with a specific
reason. The call history (departments reached) enforces routing prerequisites.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ctu.world import data
from ctu.world.directory import AuthCheck, CompanyDirectory

# Call statuses (the reward reads these, never the CSR's wording).
SERVED = "served"
UNKNOWN_NUMBER = "unknown_number"
MISSING_AUTH = "missing_auth"
WRONG_AUTH_VALUE = "wrong_auth_value"
WRONG_DEPARTMENT = "wrong_department"
PREREQUISITE_NOT_MET = "prerequisite_not_met"
ALREADY_SERVED = "already_served"


class CallResult(NamedTuple):
    status: str
    text: str  # what the representative says
    department_id: str | None  # None for an unknown number
    auth: AuthCheck | None  # None for an unknown number

    @property
    def authenticated(self) -> bool:
        return self.auth is not None and self.auth.ok


# What the representative says it did, per request type.
_SERVICE_PHRASES = {r: p.replace(" my ", " your ") for r, p in data.REQUEST_PHRASES.items()}


_TYPE_CODES = {t: t[:3].upper() for t in data.DEPARTMENT_TYPES}


def _phrase_list(fields) -> str:
    names = [f.replace("_", " ") for f in fields]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


class PhoneSystem:
    """The phones of every company, as one user experiences them in one episode."""

    def __init__(self, world: data.World, directory: CompanyDirectory, task, user):
        self._world = world
        self._directory = directory
        self._task = task
        self._user = user
        self.reached: list[str] = []  # department ids served, in order
        self._served = [False] * len(task.requests)
        # A department serves at most one request of a task (the validator checks it).
        self._request_index = {r.department_id: i for i, r in enumerate(task.requests)}
        self._first_name = user.name.split()[0]

    @property
    def all_served(self) -> bool:
        return all(self._served)

    def served_count(self) -> int:
        return sum(self._served)

    def call(self, phone_number: str, auth_info: Mapping[str, str]) -> CallResult:
        department = self._directory.department_for_phone(phone_number)
        if department is None:
            text = f"The number you have dialled, {phone_number}, is not in service."
            return CallResult(UNKNOWN_NUMBER, text, None, None)
        company = self._directory.company_of(department)
        greeting = self._directory.greeting(department)
        auth = self._directory.check_auth(department, auth_info, self._user)
        dept_id = department.department_id
        if auth.missing:
            text = (
                f"{greeting} To verify your identity I also need your {_phrase_list(auth.missing)}."
            )
            return CallResult(MISSING_AUTH, text, dept_id, auth)
        if auth.wrong:
            text = f"{greeting} The {_phrase_list(auth.wrong)} you gave doesn't match our records."
            return CallResult(WRONG_AUTH_VALUE, text, dept_id, auth)
        return self._route(department, company, greeting, auth)

    def _route(self, department, company, greeting, auth) -> CallResult:
        dept_id = department.department_id
        index = self._request_index.get(dept_id)
        if index is not None and self._served[index]:
            text = f"{greeting} We already took care of your request earlier."
            return CallResult(ALREADY_SERVED, text, dept_id, auth)
        if index is None:
            text = (
                f"{greeting} Thanks, you're verified, but {department.name} can't help with "
                f"what you need; {self._hint(company)}"
            )
            return CallResult(WRONG_DEPARTMENT, text, dept_id, auth)
        for prerequisite in department.prerequisites:
            if prerequisite not in self.reached:
                name = self._world.departments[prerequisite].name
                text = (
                    f"{greeting} Before we can help, you need to speak with our {name} "
                    "department first."
                )
                return CallResult(PREREQUISITE_NOT_MET, text, dept_id, auth)
        self._served[index] = True
        self.reached.append(dept_id)
        phrase = _SERVICE_PHRASES[self._task.requests[index].request_type]
        reference = f"{_TYPE_CODES[department.type]}-{department.phone_number[-4:]}-{index + 1}"
        text = (
            f"{greeting} Thank you, {self._first_name}, you're verified. I've helped you "
            f"{phrase}. Your reference number is {reference}."
        )
        return CallResult(SERVED, text, dept_id, auth)

    def _hint(self, company: data.Company) -> str:
        if company.company_id != self._task.company_id:
            return f"this is {company.name}, and we have no record of your request."
        pending = next((r for i, r in enumerate(self._task.requests) if not self._served[i]), None)
        if pending is None:
            return "and your other requests are all taken care of."
        right = self._world.departments[pending.department_id]
        return f"that's handled by our {right.name} department."
