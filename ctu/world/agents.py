"""Scripted policies: oracle, heuristic, random.

A policy plays one episode at a time: `reset(task_id, observation, feedback)`
with the user's opening message (and, on a retry, the critique of the failed
attempt), then `act(observation) -> Action` until the episode is done. Only
the oracle reads the task and the world; the heuristic and the random policy
see nothing but the observations and the critique.

- `Oracle` knows the task's departments, their order and auth sets (the
  alternate set where the user lacks a field). It solves every generated task
  with score 1.0, which is the proof that every task is solvable.
- `Heuristic` acts on what a sensible agent without company knowledge would
  do: search the company the user names, map the request to the department
  whose description mentions it, ask for the auth fields the department-type
  prior suggests, and learn from the phone within the episode (a missing field,
  a prerequisite department, a wrong department). On a retry it also follows
  what the critique names: the exact fields, a prerequisite, the right
  department, fields a department does not need.
- `RandomPolicy` makes seeded random tool calls with plausible-ish arguments.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from ctu.world import data, generate, tools
from ctu.world.env import Action

# Every policy ends the episode with a report that is not a question, which the
# user takes as the end of the conversation.
FINAL_REPORT = "All done: I called {company} and your request was taken care of."
# Explanations for a user who asks what a form field means.
FIELD_EXPLANATIONS = {
    "name": "your full name",
    "account_number": "your account number with the company",
    "last_4_ssn": "the last four digits of your Social Security number",
    "date_of_birth": "your date of birth",
    "address": "your home address",
    "phone": "your phone number",
    "credit_card_last4": "the last four digits of your credit card",
}
_FIELD_LINE = re.compile(r"^(\w+): (.+)$", re.MULTILINE)
_WITHHELD = re.compile(r"^(\w+): What do you mean by", re.MULTILINE)
_PHONE_NUMBER = re.compile(r"\+1-\d{3}-\d{3}-\d{4}")
_REFERENCE = re.compile(r"reference number is ([\w-]+)")
_DIRECTORY_LINE = re.compile(r"^- ([^:]+): (\+[\d-]+)\. (.*)$", re.MULTILINE)
_NOT_AVAILABLE = ("I don't have", "What do you mean")


class Policy:
    """The interface evaluation drives: one episode at a time."""

    def reset(self, task_id: str, observation: str, feedback: str | None = None) -> None:
        raise NotImplementedError

    def act(self, observation: str) -> Action:
        raise NotImplementedError


class Recorder(Policy):
    """Wraps a policy and keeps the actions it takes in the current episode."""

    def __init__(self, inner: Policy):
        self.inner = inner
        self.actions: list[Action] = []

    def reset(self, task_id: str, observation: str, feedback: str | None = None) -> None:
        self.actions = []
        self.inner.reset(task_id, observation, feedback)

    def act(self, observation: str) -> Action:
        action = self.inner.act(observation)
        self.actions.append(action)
        return action

    @property
    def thought(self) -> str:
        """The inner policy's reason for its last action ("" when it gives none)."""
        return getattr(self.inner, "thought", "")


def parse_auth_values(text: str) -> dict[str, str]:
    """Field values a user gave in a form reply or a clarification answer."""
    values = {}
    for field, value in _FIELD_LINE.findall(text):
        if field in data.AUTH_FIELDS and not value.startswith(_NOT_AVAILABLE):
            values[field] = value.strip()
    return values


def withheld_fields(text: str) -> list[str]:
    """Fields the user asked about instead of filling in."""
    return [f for f in _WITHHELD.findall(text) if f in data.AUTH_FIELDS]


def clarification(fields) -> str:
    return " ".join(f"By '{f}' I mean {FIELD_EXPLANATIONS[f]}." for f in fields)


def final_report(company_name: str, transcript: str) -> str:
    """The closing message, quoting every reference number the calls gave."""
    text = FINAL_REPORT.format(company=company_name)
    refs = _REFERENCE.findall(transcript)
    if refs:
        text += " Reference numbers: " + ", ".join(refs) + "."
    return text


# ---- oracle ----------------------------------------------------------------------------


class Oracle(Policy):
    """Follows the task's ground truth: one search, one exact form, calls in order."""

    def __init__(self, world: data.World):
        self.world = world

    def reset(self, task_id: str, observation: str, feedback: str | None = None) -> None:
        del feedback  # it needs none
        task = self.world.tasks[task_id]
        user = self.world.users[task.user_id]
        self.company = self.world.companies[task.company_id]
        self.form_fields = list(task.required_auth_fields)
        self.calls = [
            (dept.phone_number, data.auth_set_for(dept, user))
            for dept in (self.world.departments[r.department_id] for r in task.requests)
        ]
        self.values: dict[str, str] = {}
        self.transcript = ""
        self.stage = "search"

    def act(self, observation: str) -> Action:
        self.transcript += observation + "\n"
        if self.stage == "search":
            self.stage = "form"
            return Action("search_company", {"company_name": self.company.name})
        if self.stage == "form":
            self.stage = "form_reply"
            return Action("auth_info_form", {"fields": self.form_fields})
        if self.stage == "form_reply":
            self.values.update(parse_auth_values(observation))
            asked = withheld_fields(observation)
            self.stage = "calls"
            if asked:
                return Action("respond", {"content": clarification(asked)})
        else:  # a clarification answer carries the withheld values
            self.values.update(parse_auth_values(observation))
        if self.calls:
            phone_number, fields = self.calls.pop(0)
            auth = {f: self.values[f] for f in fields if f in self.values}
            return Action("make_phone_call", {"phone_number": phone_number, "auth_info": auth})
        return Action("respond", {"content": final_report(self.company.name, self.transcript)})


# ---- heuristic -------------------------------------------------------------------------

# What the heuristic believes about auth: the department-type prior and the
# global substitution rule, never a company's actual requirements.
AUTH_PRIOR = generate.AUTH_PRIOR
SUBSTITUTES = generate.SUBSTITUTES
_TYPE_BY_NAME = {name: kind for kind, name in data.DEPARTMENT_NAMES.items()}
_FIELD_BY_PHRASE = {phrase: field for field, phrase in generate.FIELD_PHRASES.items()}
_COMPANY_MENTION = (
    re.compile(r"can you call (.+?) for me\?"),
    re.compile(r"I need to .+ with (.+?)\.(?: I don't|$)"),
    re.compile(r"The company is (.+?)\.(?: I don't|$)"),
    re.compile(r"Could you contact (.+?)\?"),
)
_LACKING = re.compile(r"I don't have my (.+?)\.")
_NEEDS_FIELDS = re.compile(r"I also need your (.+?)\.$")
_PREREQUISITE = re.compile(r"speak with our (.+?) department first")
_HANDLED_BY = re.compile(r"that's handled by our (.+?) department")
# Attempts per department before the heuristic gives up on it.
MAX_ATTEMPTS_PER_DEPARTMENT = 3
# Actions after which the heuristic wraps up whatever state it is in.
MAX_ACTIONS = 24


def _company_mention(message: str) -> str:
    for pattern in _COMPANY_MENTION:
        match = pattern.search(message)
        if match:
            return match.group(1)
    return message


def _phrase_fields(text: str) -> list[str]:
    """'account number, phone and last 4 ssn' -> field names."""
    parts = re.split(r", | and ", text)
    return [p.replace(" ", "_") for p in parts if p.replace(" ", "_") in data.AUTH_FIELDS]


_FIELD_LIST = r"([a-z_0-9]+(?:, [a-z_0-9]+)*)"
_DEPT_PHONE = r"\((\+[\d-]+)\)"


@dataclasses.dataclass(frozen=True)
class FeedbackHints:
    """What a rule-based critique (ctu/world/feedback.py) says to do differently."""

    company: str | None = None
    needed_fields: tuple[str, ...] = ()  # the task's exact form fields
    add_fields: tuple[tuple[str, str], ...] = ()  # (department phone, field)
    drop_fields: tuple[tuple[str, str], ...] = ()  # (department phone, field)
    prerequisites: tuple[tuple[str, str], ...] = ()  # (department phone, its prerequisite's)
    right_department: str | None = None  # phone
    right_department_name: str | None = None  # as the critique names it, company first
    calls: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (phone, auth fields), in order

    @classmethod
    def parse(cls, text: str) -> FeedbackHints:
        def fields(group: str) -> list[str]:
            return [f for f in group.split(", ") if f in data.AUTH_FIELDS]

        company = re.search(r"The user needs (.+?)\. ", text)
        needed = re.search(
            r"(?:ask only for |every needed field \(|all needed fields \()" + _FIELD_LIST, text
        )
        lacked = re.findall(r"Your call to [^(]*" + _DEPT_PHONE + " lacked " + _FIELD_LIST, text)
        extra = re.findall(
            r"You gave [^(]*" + _DEPT_PHONE + r" details it does not need \(" + _FIELD_LIST, text
        )
        order = re.findall(_DEPT_PHONE + r" requires that you reach ([^.]*) first", text)
        right = re.search(r"The right department is ([^(]*) " + _DEPT_PHONE, text)
        return cls(
            company=company.group(1) if company else None,
            needed_fields=tuple(fields(needed.group(1))) if needed else (),
            add_fields=tuple((phone, f) for phone, group in lacked for f in fields(group)),
            drop_fields=tuple((phone, f) for phone, group in extra for f in fields(group)),
            prerequisites=tuple(
                (phone, before)
                for phone, group in order
                for before in re.findall(_DEPT_PHONE, group)
            ),
            right_department=right.group(2) if right else None,
            right_department_name=right.group(1) if right else None,
            calls=_shown_calls(text),
        )


def _shown_calls(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The first well-formed `The calls: [...]` list of a critique (ctu/world/feedback.py):
    (phone, auth fields) per call, in order; () when there is none."""
    for match in re.finditer(r"The calls: ", text):
        try:
            calls, _ = json.JSONDecoder().raw_decode(text, match.end())
            return tuple(
                (c["phone_number"], tuple(f for f in c["auth_info"] if f in data.AUTH_FIELDS))
                for c in calls
            )
        except (ValueError, TypeError, KeyError):
            continue  # cut short by the block's token budget, or not ours
    return ()


class Heuristic(Policy):
    """Directory search + type prior + lessons from the phone, within one episode.

    After each action `thought` says, in a line, the decision behind it, for
    demonstrations that reason before they act (`warm_start.thoughts`): before the
    first form, the user's requests in their words, each followed by the user's own
    separator and then the department whose directory line offers it, and the fields
    the user lacks ("Requests: freeze my account and (Fraud) get a refund. (Billing)
    Lacks account_number."); before a call, the department and its number as the
    directory lists them ("Call Fraud: +1-800-555-0100."); otherwise
    "". Each separator comes straight after the words it follows in the user's
    message, so whether the list goes on is read where it is copied from. With
    `cite_feedback`, the first form's thought cites what a critique says about it in
    the critique's words: it opens with the right department when the critique names
    one in this directory ("Feedback: The right department is Acme Fraud.") and ends
    with the task's fields when it lists them ("Feedback: all needed fields (name,
    phone)."), so the decision can be copied from a few tokens back. With `call_fields`,
    a call's thought ends with the fields it passes ("Call Fraud: +1-800-555-0100.
    Fields: name, phone.").
    """

    def __init__(self, seed=0, cite_feedback: bool = False, call_fields: bool = False):
        del seed  # deterministic: the same observations give the same actions
        self.cite_feedback = cite_feedback
        self.call_fields = call_fields

    def reset(self, task_id: str, observation: str, feedback: str | None = None) -> None:
        del task_id  # the heuristic does not peek at the task
        self.hints = FeedbackHints.parse(feedback or "")
        self.message = observation
        self.asks = [  # the user's requests in their words, in the order they come
            phrase
            for _, phrase in sorted(
                (observation.find(p), p) for p in data.REQUEST_PHRASES.values() if p in observation
            )
        ]
        self.requests = [phrase.replace(" my ", " your ") for phrase in self.asks]  # as listed
        match = _LACKING.search(observation)
        phrases = match.group(1).split(" or my ") if match else []
        self.lacking = {_FIELD_BY_PHRASE[p] for p in phrases if p in _FIELD_BY_PHRASE}
        self.departments: dict[str, tuple[str, str]] = {}  # name -> (phone, description)
        self.plan: list[str] = []  # department names still to call, in order
        self.guess: dict[str, list[str]] = {}  # department name -> auth fields to send
        self.attempts: dict[str, int] = {}
        self.values: dict[str, str] = {}
        self.asked: set[str] = set()
        self.company_name = self.hints.company or _company_mention(observation)
        self.searches = 0
        self.transcript = ""
        self.last: Action | None = None
        self.actions = 0
        self.thought = ""

    def act(self, observation: str) -> Action:
        self.transcript += observation + "\n"
        self.thought = ""
        action = self._next(observation)
        self.last = action
        self.actions += 1
        return action

    def _guess_fields(self, department_name: str) -> list[str]:
        fields = list(AUTH_PRIOR[_TYPE_BY_NAME[department_name]])
        for field in sorted(self.lacking & set(fields)):
            fields.remove(field)
            fields.append(next(s for s in SUBSTITUTES[field] if s not in fields))
        return [f for f in data.AUTH_FIELDS if f in fields]

    def _form(self, fields) -> Action:
        fields = [f for f in data.AUTH_FIELDS if f in set(fields)]
        self.asked.update(fields)
        return Action("auth_info_form", {"fields": fields})

    def _call(self, name: str) -> Action:
        # The directory's own "Name: number", so the number is copied from its line.
        self.thought = f"Call {name}: {self.departments[name][0]}."
        self.attempts[name] = self.attempts.get(name, 0) + 1
        auth = {f: self.values[f] for f in self.guess[name] if f in self.values}
        if self.call_fields:
            self.thought += f" Fields: {', '.join(auth)}."
        return Action(
            "make_phone_call", {"phone_number": self.departments[name][0], "auth_info": auth}
        )

    def _report(self) -> Action:
        return Action("respond", {"content": final_report(self.company_name, self.transcript)})

    def _next(self, observation: str) -> Action:
        if self.actions >= MAX_ACTIONS:
            return self._report()
        if self.last is None:
            self.searches += 1
            return Action("search_company", {"company_name": self.company_name})
        if self.last.name == "search_company":
            return self._after_search(observation)
        if self.last.name in ("auth_info_form", "respond"):
            self.values.update(parse_auth_values(observation))
            asked = withheld_fields(observation)
            if asked:
                return Action("respond", {"content": clarification(asked)})
        if self.last.name == "make_phone_call":
            self._learn_from_call(observation)
        return self._next_call()

    def _after_search(self, observation: str) -> Action:
        self.departments = {
            name: (phone, description)
            for name, phone, description in _DIRECTORY_LINE.findall(observation)
            if name in _TYPE_BY_NAME
        }
        if not self.departments:
            if self.searches == 1 and self.company_name != self.message:
                self.company_name = self.message  # let the fuzzy search try the whole message
                self.searches += 1
                return Action("search_company", {"company_name": self.company_name})
            return Action("respond", {"content": "Sorry, I could not find that company."})
        routes = []
        for k, (ask, request) in enumerate(zip(self.asks, self.requests, strict=True)):
            name = next((n for n, (_, d) in self.departments.items() if request in d), None)
            after = "." if k == len(self.asks) - 1 else "," if k < len(self.asks) - 2 else " and"
            routes.append(ask + after + ("" if name is None else f" ({name})"))
            if name is not None and name not in self.plan:
                self.plan.append(name)
        thought = [f"Requests: {' '.join(routes)}"] if routes else []
        if not self.plan:
            self.plan = [next(iter(self.departments))]
            thought.append(f"Try {self.plan[0]}.")
        lacks = [f for f in data.AUTH_FIELDS if f in self.lacking]
        self.thought = " ".join(thought + ([f"Lacks {', '.join(lacks)}."] if lacks else []))
        for name in self.departments:
            self.guess[name] = self._guess_fields(name)
        self._apply_hints()
        right = self.hints.right_department
        if self.cite_feedback and right in {phone for phone, _ in self.departments.values()}:
            # the department the critique names, in its words, before the plan follows it
            cited = f"Feedback: The right department is {self.hints.right_department_name}."
            self.thought = f"{cited} {self.thought}".strip()
        if self.hints.needed_fields:
            form = self._form(self.hints.needed_fields)
            if self.cite_feedback:  # the critique's list, in its words, next to the form
                cited = ", ".join(form.kwargs["fields"])
                self.thought = f"{self.thought} Feedback: all needed fields ({cited}).".strip()
            return form
        return self._form({f for name in self.plan for f in self.guess[name]})

    def _apply_hints(self) -> None:
        """Folds a critique of an earlier attempt into the plan and the auth guesses."""
        by_phone = {phone: name for name, (phone, _) in self.departments.items()}
        hints = self.hints
        if hints.right_department in by_phone and by_phone[hints.right_department] not in self.plan:
            self.plan.append(by_phone[hints.right_department])
        for phone, before in hints.prerequisites:
            if phone in by_phone and before in by_phone:
                name, first = by_phone[phone], by_phone[before]
                if first in self.plan:
                    self.plan.remove(first)
                index = self.plan.index(name) if name in self.plan else len(self.plan)
                self.plan.insert(index, first)
        if hints.needed_fields:
            for name in self.guess:
                self.guess[name] = [f for f in self.guess[name] if f in hints.needed_fields]
            if len(self.plan) == 1:  # one department: the task's fields are exactly its own
                self.guess[self.plan[0]] = list(hints.needed_fields)
        for phone, field in hints.add_fields:
            if phone in by_phone and field not in self.guess[by_phone[phone]]:
                self.guess[by_phone[phone]].append(field)
        for phone, field in hints.drop_fields:
            if phone in by_phone and field in self.guess[by_phone[phone]]:
                self.guess[by_phone[phone]].remove(field)
        shown = [(by_phone[phone], fields) for phone, fields in hints.calls if phone in by_phone]
        if shown:  # the calls the critique shows, as it shows them, supersede the rest
            self.plan = [name for name, _ in shown]
            for name, fields in shown:
                self.guess[name] = list(fields)

    def _learn_from_call(self, observation: str) -> None:
        name = self.plan[0]
        if "you're verified. I've helped you" in observation or "already took care" in observation:
            self.plan.pop(0)
            return
        needs, before, handled = (
            _NEEDS_FIELDS.search(observation),
            _PREREQUISITE.search(observation),
            _HANDLED_BY.search(observation),
        )
        if needs:
            missing = _phrase_fields(needs.group(1))
            self.guess[name] = [f for f in data.AUTH_FIELDS if f in set(self.guess[name] + missing)]
        elif before and before.group(1) in self.departments:
            prerequisite = before.group(1)
            if prerequisite in self.plan:
                self.plan.remove(prerequisite)
            self.plan.insert(0, prerequisite)
        elif handled and handled.group(1) in self.departments:
            self.plan[0] = handled.group(1)
        if self.attempts.get(self.plan[0], 0) >= MAX_ATTEMPTS_PER_DEPARTMENT or not (
            needs or before or handled
        ):
            self.plan.pop(0)  # wrong values, unknown number, or stuck: give up on it

    def _next_call(self) -> Action:
        while self.plan:
            name = self.plan[0]
            unknown = [f for f in self.guess[name] if f not in self.values]
            missing = [f for f in unknown if f not in self.asked]
            if missing:
                return self._form(missing)  # a second form costs, but it unblocks the call
            if unknown:  # the user does not have it: nothing more to try here
                self.plan.pop(0)
                continue
            return self._call(name)
        return self._report()


# ---- random ----------------------------------------------------------------------------

# Relative odds of each action kind for the random policy.
RANDOM_ACTION_WEIGHTS = {
    "search_company": 3,
    "auth_info_form": 2,
    "make_phone_call": 4,
    "respond": 1,
    "malformed": 0.5,
}


class RandomPolicy(Policy):
    """Seeded random tool calls, with arguments drawn from what it has seen."""

    def __init__(self, seed=0):
        self.seed = seed

    def reset(self, task_id: str, observation: str, feedback: str | None = None) -> None:
        del feedback
        self.rng = random.Random(f"{self.seed}:{task_id}")
        self.words = re.findall(r"[A-Z][a-z]+(?: [A-Z][a-z]+)?", observation) or ["Company"]
        self.numbers: list[str] = []
        self.values: dict[str, str] = {}

    def act(self, observation: str) -> Action:
        rng = self.rng
        self.numbers += _PHONE_NUMBER.findall(observation)
        self.values.update(parse_auth_values(observation))
        kind = rng.choices(list(RANDOM_ACTION_WEIGHTS), list(RANDOM_ACTION_WEIGHTS.values()))[0]
        if kind == "search_company":
            return Action(kind, {"company_name": rng.choice(self.words)})
        if kind == "auth_info_form":
            return Action(kind, {"fields": rng.sample(data.AUTH_FIELDS, rng.randint(1, 4))})
        if kind == "make_phone_call":
            number = (
                rng.choice(self.numbers)
                if self.numbers and rng.random() < 0.8
                else f"+1-800-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
            )
            fields = rng.sample(sorted(self.values), rng.randint(0, len(self.values)))
            return Action(
                kind, {"phone_number": number, "auth_info": {f: self.values[f] for f in fields}}
            )
        if kind == "respond":
            content = rng.choice(("Could you tell me more?", "I have done what I can. Goodbye."))
            return Action(kind, {"content": content})
        # A malformed call now and then: a wrong argument name or type.
        return Action(
            rng.choice(tools.TOOL_NAMES), rng.choice(({"name": "x"}, {"fields": "name"}, []))
        )


POLICIES = ("oracle", "heuristic", "random")


def make_policy(name: str, world: data.World, seed=0) -> Policy:
    """A scripted policy by name; `seed` varies the random policy per episode."""
    if name == "oracle":
        return Oracle(world)
    if name == "heuristic":
        return Heuristic(seed)
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
