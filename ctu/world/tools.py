"""The agent's tools: OpenAI function schemas (the one place) and Tool classes.

A tool lives for one episode: `create(episode)`, `execute(arguments)` any number
of times, `calc_reward()`, `release()`. Arguments are validated against the
schema; anything wrong becomes an observation, never an exception.

Validation runs a checker compiled once from the schema (a small subset of JSON
Schema, ~1 us); only when it fails does jsonschema run, to word the error.
tests/test_world_tools.py checks the two agree.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import NamedTuple

import jsonschema

from ctu.world import data, phone
from ctu.world.directory import CompanyDirectory
from ctu.world.users import FormReply, UserReply, UserSimulator

# Longest string argument accepted; real names and numbers are far shorter, and
# a cap keeps a runaway generation from flooding the observation.
MAX_STRING_LENGTH = 200
MAX_PHONE_LENGTH = 40
# An error message quotes at most this many characters of the bad value.
MAX_ERROR_CHARS = 300

TOOL_SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": "search_company",
            "description": "Find a company by name; returns its departments, their phone "
            "numbers and what each handles.",
            "parameters": {
                "type": "object",
                "properties": {
                    "company_name": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_STRING_LENGTH,
                        "description": "The company's name as the user gave it.",
                    }
                },
                "required": ["company_name"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "auth_info_form",
            "description": "Ask the user, once, for the authentication details the calls "
            "will need. Returns the values the user has.",
            "parameters": {
                "type": "object",
                "properties": {
                    "fields": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(data.AUTH_FIELDS)},
                        "minItems": 1,
                        "maxItems": len(data.AUTH_FIELDS),
                        "uniqueItems": True,
                        "description": "Auth fields to ask for.",
                    }
                },
                "required": ["fields"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "make_phone_call",
            "description": "Call a department with the user's auth details; the "
            "representative verifies them, routes and serves the request.",
            "parameters": {
                "type": "object",
                "properties": {
                    "phone_number": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_PHONE_LENGTH,
                    },
                    "auth_info": {
                        "type": "object",
                        "properties": {
                            f: {"type": "string", "maxLength": MAX_STRING_LENGTH}
                            for f in data.AUTH_FIELDS
                        },
                        "additionalProperties": False,
                        "description": "Auth field -> value, as the user gave it.",
                    },
                },
                "required": ["phone_number", "auth_info"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_NAMES = tuple(t["function"]["name"] for t in TOOL_SCHEMAS)
RESPOND = "respond"
RESPOND_SCHEMA = {
    "type": "object",
    "properties": {"content": {"type": "string", "maxLength": 4000}},
    "required": ["content"],
    "additionalProperties": False,
}

# ---- validation ------------------------------------------------------------------------

_KNOWN_KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "items",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "description",
}
# Stands in for "no upper bound" in length checks.
_UNBOUNDED = float("inf")


def compile_checker(schema: dict) -> Callable[[object], bool]:
    """A fast validity check for the JSON Schema subset the tool schemas use.

    One specialised closure per schema node (string, array, object), so a check
    costs a few isinstance/len calls; unsupported keywords are refused.
    """
    unknown = set(schema) - _KNOWN_KEYWORDS
    if unknown or schema.get("type") not in ("string", "array", "object"):
        raise ValueError(f"compile_checker does not support {schema}; extend it")
    kind = schema["type"]
    if kind == "string":
        return _string_checker(schema)
    if kind == "array":
        return _array_checker(schema)
    return _object_checker(schema)


def _string_checker(schema: dict) -> Callable[[object], bool]:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength", _UNBOUNDED)
    if "enum" in schema:
        allowed = frozenset(schema["enum"])
        return lambda x: x.__class__ is str and x in allowed and lo <= len(x) <= hi
    return lambda x: isinstance(x, str) and lo <= len(x) <= hi


def _array_checker(schema: dict) -> Callable[[object], bool]:
    lo, hi = schema.get("minItems", 0), schema.get("maxItems", _UNBOUNDED)
    item = compile_checker(schema["items"]) if "items" in schema else (lambda x: True)
    unique = schema.get("uniqueItems", False)

    def check(x) -> bool:
        if not isinstance(x, list) or not lo <= len(x) <= hi:
            return False
        for i in x:
            if not item(i):
                return False
        return not unique or _unique(x)

    return check


def _unique(items: list) -> bool:
    try:
        return len(set(items)) == len(items)
    except TypeError:  # unhashable items: let jsonschema decide
        return False


def _object_checker(schema: dict) -> Callable[[object], bool]:
    properties = schema.get("properties", {})
    props = {k: compile_checker(v) for k, v in properties.items()}
    required = tuple(schema.get("required", ()))
    closed = schema.get("additionalProperties", True) is False
    shared = {json_key(v) for v in properties.values()}
    if closed and not required and len(shared) == 1:  # e.g. auth_info: field -> string
        only = next(iter(properties.values()))
        if set(only) <= {"type", "maxLength", "description"} and only["type"] == "string":
            return _string_map_checker(frozenset(properties), only.get("maxLength", _UNBOUNDED))

    def check(x) -> bool:
        if not isinstance(x, dict):
            return False
        for k in required:
            if k not in x:
                return False
        for k, v in x.items():
            sub = props.get(k) if k.__class__ is str else None
            if sub is None:
                if closed:
                    return False
            elif not sub(v):
                return False
        return True

    return check


def json_key(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True)


def _string_map_checker(keys: frozenset, max_length) -> Callable[[object], bool]:
    """A closed object whose every property is a string of bounded length, inlined."""

    def check(x) -> bool:
        if not isinstance(x, dict):
            return False
        for k, v in x.items():
            if k not in keys or v.__class__ is not str or len(v) > max_length:
                return False
        return True

    return check


class ArgumentValidator:
    """Fast check + jsonschema wording for one tool's parameters."""

    def __init__(self, name: str, schema: dict):
        self.name = name
        self._fast = compile_checker(schema)
        self._full = jsonschema.Draft202012Validator(schema)

    def error(self, arguments) -> str | None:
        """None when valid, else a message naming the argument and the problem."""
        if not isinstance(arguments, dict):
            return f"{self.name}: arguments must be a JSON object, got {type(arguments).__name__}."
        if self._fast(arguments):
            return None
        error = jsonschema.exceptions.best_match(self._full.iter_errors(arguments))
        if error is None:  # the fast check was stricter than the schema
            return None
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "arguments"
        if error.validator in ("maxLength", "maxItems"):
            message = f"is longer than the limit of {error.validator_value}"
        else:
            message = error.message[:MAX_ERROR_CHARS]
        return f"{self.name}: invalid {where}: {message}."


# ---- episode state and the trajectory record -------------------------------------------


class Step(NamedTuple):
    """One agent action and what came of it; the reward reads `outcome`."""

    name: str
    arguments: object
    observation: str
    outcome: object  # SearchOutcome | FormReply | phone.CallResult | UserReply | Invalid


class SearchOutcome(NamedTuple):
    query: str
    company_id: str | None


class Invalid(NamedTuple):
    """A tool call that could not run: unknown tool or bad arguments."""

    reason: str


@dataclasses.dataclass
class Episode:
    """Mutable state of one episode, shared by its tools and the environment."""

    task: data.Task
    world: data.World
    directory: CompanyDirectory
    user: UserSimulator
    phone: phone.PhoneSystem
    steps: list = dataclasses.field(default_factory=list)
    final_message: str | None = None  # the agent's report, when the user ended the call
    ended_by: str | None = None  # "user" | "hang_up" | "turn_limit"


class Tool:
    """Base class: schema-checked arguments, per-episode lifecycle."""

    name: str = ""

    def __init__(self):
        schema = next(t for t in TOOL_SCHEMAS if t["function"]["name"] == self.name)
        self.validator = ArgumentValidator(self.name, schema["function"]["parameters"])
        self.episode: Episode | None = None

    def create(self, episode: Episode) -> None:
        self.episode = episode

    def execute(self, arguments) -> tuple[str, object]:
        """(observation, outcome); never raises for bad arguments."""
        error = self.validator.error(arguments)
        if error is not None:
            return f"Error: {error}", Invalid(error)
        return self._run(arguments)

    def _run(self, arguments) -> tuple[str, object]:
        raise NotImplementedError

    def calc_reward(self) -> float:
        """This tool's own progress in [0, 1]; the task score is in reward.py."""
        raise NotImplementedError

    def release(self) -> None:
        self.episode = None

    def _outcomes(self, kind) -> list:
        return [s.outcome for s in self.episode.steps if isinstance(s.outcome, kind)]


class SearchCompany(Tool):
    name = "search_company"

    def _run(self, arguments):
        query = arguments["company_name"]
        company = self.episode.directory.search(query)
        if company is None:
            return f"No company matches '{query}'.", SearchOutcome(query, None)
        return self.episode.directory.describe(company), SearchOutcome(query, company.company_id)

    def calc_reward(self) -> float:
        found = any(
            o.company_id == self.episode.task.company_id for o in self._outcomes(SearchOutcome)
        )
        return float(found)


class AuthInfoForm(Tool):
    name = "auth_info_form"

    def _run(self, arguments):
        reply = self.episode.user.fill_form(arguments["fields"])
        return reply.text, reply

    def calc_reward(self) -> float:
        needed = set(self.episode.task.required_auth_fields)
        # A clarification answer (UserReply) completes the form's withheld fields.
        got = {f for o in self._outcomes((FormReply, UserReply)) for f in o.provided}
        return len(needed & got) / len(needed)


class MakePhoneCall(Tool):
    name = "make_phone_call"

    def _run(self, arguments):
        result = self.episode.phone.call(arguments["phone_number"], arguments["auth_info"])
        return result.text, result

    def calc_reward(self) -> float:
        return self.episode.phone.served_count() / len(self.episode.task.requests)


TOOL_CLASSES = {cls.name: cls for cls in (SearchCompany, AuthInfoForm, MakePhoneCall)}
