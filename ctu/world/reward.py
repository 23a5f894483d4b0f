"""Task score with partial credit, penalties, failure type and feedback.

Ladder (SPEC): 0.0 no progress; 0.2 some needed auth collected; 0.3 all needed
auth collected; 0.5 authenticated somewhere; 0.7 authenticated at a department
the task needs; 1.0 every request served. Penalties are subtracted (floor 0),
so 1.0 needs one form call, no over-collection, no needless or failed calls,
exact auth sets and a final report.

Collected auth means values the user gave through the form (including a
clarification answer), never values the agent typed itself.
"""

from __future__ import annotations

import dataclasses

from ctu.world import data, feedback, phone
from ctu.world.tools import FormReply, Invalid, SearchOutcome
from ctu.world.users import UserReply

# Failure types (the first applicable one, see _failure_type).
SUCCESS = "success"
MALFORMED_CALL = "malformed_tool_call"
UNKNOWN_COMPANY = "unknown_company"
MISSING_AUTH = "missing_auth"
WRONG_AUTH_VALUE = "wrong_auth_value"
UNKNOWN_NUMBER = "unknown_number"
WRONG_DEPARTMENT = "wrong_department"
WRONG_ORDER = "wrong_order"
REPEATED_FORM = "repeated_form"
OVER_COLLECTION = "over_collection"
OVERSHARING = "oversharing"
NEEDLESS_CALLS = "needless_calls"
NO_FINAL_REPORT = "no_final_report"
INCOMPLETE = "incomplete"
FAILURE_TYPES = (
    SUCCESS,
    MALFORMED_CALL,
    UNKNOWN_COMPANY,
    MISSING_AUTH,
    WRONG_AUTH_VALUE,
    UNKNOWN_NUMBER,
    WRONG_DEPARTMENT,
    WRONG_ORDER,
    REPEATED_FORM,
    OVER_COLLECTION,
    OVERSHARING,
    NEEDLESS_CALLS,
    NO_FINAL_REPORT,
    INCOMPLETE,
)

# Ladder.
SOME_AUTH_SCORE = 0.2
ALL_AUTH_SCORE = 0.3
AUTHENTICATED_SCORE = 0.5
DEPARTMENT_SCORE = 0.7
COMPLETED_SCORE = 1.0
# Per call that passes auth values the user has not given through the form yet:
# 1.0 needs the one form, so guessed or memorised values cannot skip it.
UNCOLLECTED_AUTH_PENALTY = 0.2
# The spec says a second form call is penalised: bothering the user again.
REPEATED_FORM_PENALTY = 0.15
# Per field asked that no department in the task needs: personal data should be
# minimal, and a per-field cost makes "ask for everything" strictly worse.
OVER_COLLECTION_PENALTY_PER_FIELD = 0.05
# Per call that passes fields the department does not need (needless disclosure).
OVERSHARING_PENALTY = 0.05
# Per phone call that served nothing (failed, wrong, repeated): calling every
# number must cost more than it can earn.
NEEDLESS_CALL_PENALTY = 0.05
# Per search after the task's company was already found.
NEEDLESS_SEARCH_PENALTY = 0.05
# Per malformed tool call (unknown tool, bad arguments).
MALFORMED_CALL_PENALTY = 0.05
# Everything served but the user never got a report: the agent must close the loop.
NO_FINAL_REPORT_PENALTY = 0.1
# Call statuses that map onto a failure type.
_CALL_FAILURES = {
    phone.MISSING_AUTH: MISSING_AUTH,
    phone.WRONG_AUTH_VALUE: WRONG_AUTH_VALUE,
    phone.UNKNOWN_NUMBER: UNKNOWN_NUMBER,
    phone.WRONG_DEPARTMENT: WRONG_DEPARTMENT,
    phone.PREREQUISITE_NOT_MET: WRONG_ORDER,
    phone.ALREADY_SERVED: NEEDLESS_CALLS,
}


# Call failures the phone system reports before it looks at the request.
_BEFORE_ROUTING = (phone.MISSING_AUTH, phone.WRONG_AUTH_VALUE)


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    score: float
    prediction: str  # the agent's final report to the user ("" if none)
    feedback: str
    partial_scores: dict
    failure_type: str

    def __post_init__(self):
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score {self.score} outside [0, 1]")
        if self.failure_type not in FAILURE_TYPES:
            raise ValueError(f"unknown failure type {self.failure_type!r}")


@dataclasses.dataclass
class _Summary:
    """What the trajectory did, read from step outcomes."""

    company_found: bool = False
    needless_searches: int = 0
    searches: list = dataclasses.field(default_factory=list)
    forms: int = 0
    requested: set = dataclasses.field(default_factory=set)
    collected: set = dataclasses.field(default_factory=set)
    calls: list = dataclasses.field(default_factory=list)
    invalid: list = dataclasses.field(default_factory=list)
    uncollected_calls: int = 0  # calls passing values the user had not given yet


def _summarize(task: data.Task, world: data.World, steps) -> _Summary:
    s = _Summary()
    for step in steps:
        o = step.outcome
        if isinstance(o, SearchOutcome):
            s.needless_searches += s.company_found
            s.company_found |= o.company_id == task.company_id
            s.searches.append(o.query)
        elif isinstance(o, FormReply):
            s.forms += 1
            s.requested.update(o.provided, o.lacking, o.withheld)
            s.collected.update(o.provided)
        elif isinstance(o, UserReply):
            s.collected.update(o.provided)
        elif isinstance(o, phone.CallResult):
            s.calls.append(o)
            if o.auth is not None and not o.auth.given <= s.collected:
                s.uncollected_calls += 1
            if o.department_id and world.department_company[o.department_id] == task.company_id:
                s.company_found = True
        elif isinstance(o, Invalid):
            s.invalid.append(o.reason)
    return s


def _penalties(task: data.Task, s: _Summary, reported: bool, completed: bool) -> dict:
    over = s.requested - set(task.required_auth_fields)
    return {
        MISSING_AUTH: UNCOLLECTED_AUTH_PENALTY * s.uncollected_calls,
        REPEATED_FORM: REPEATED_FORM_PENALTY * max(0, s.forms - 1),
        OVER_COLLECTION: OVER_COLLECTION_PENALTY_PER_FIELD * len(over),
        OVERSHARING: OVERSHARING_PENALTY * sum(bool(c.auth and c.auth.extra) for c in s.calls),
        NEEDLESS_CALLS: NEEDLESS_CALL_PENALTY * sum(c.status != phone.SERVED for c in s.calls)
        + NEEDLESS_SEARCH_PENALTY * s.needless_searches,
        MALFORMED_CALL: MALFORMED_CALL_PENALTY * len(s.invalid),
        NO_FINAL_REPORT: NO_FINAL_REPORT_PENALTY * (completed and not reported),
    }


def _departments(task: data.Task) -> set:
    return {r.department_id for r in task.requests}


def _stage(task: data.Task, s: _Summary, served: set) -> float:
    task_departments = _departments(task)
    if task_departments <= served:
        return COMPLETED_SCORE
    if any(c.authenticated and c.department_id in task_departments for c in s.calls):
        return DEPARTMENT_SCORE
    if any(c.authenticated for c in s.calls):
        return AUTHENTICATED_SCORE
    needed = set(task.required_auth_fields)
    if needed <= s.collected:
        return ALL_AUTH_SCORE
    return SOME_AUTH_SCORE if needed & s.collected else 0.0


def _failure_type(task, s: _Summary, completed: bool, penalties: dict) -> str:
    if completed:
        return next((k for k, v in penalties.items() if v > 0), SUCCESS)
    if s.invalid and not s.calls and not s.searches and not s.forms:
        return MALFORMED_CALL
    if not s.company_found:
        return UNKNOWN_COMPANY
    if not set(task.required_auth_fields) <= s.collected:
        return MISSING_AUTH
    last_success = max((i for i, c in enumerate(s.calls) if c.status == phone.SERVED), default=-1)
    failures = [c for c in s.calls[last_success + 1 :] if c.status != phone.SERVED]
    if failures:
        last = failures[-1]
        if last.status in _BEFORE_ROUTING and last.department_id not in _departments(task):
            # The phone system authenticates before it routes, so a department that
            # handles none of the requests answers about its own auth fields; what the
            # agent got wrong is the number it dialled, not the fields it passed.
            return WRONG_DEPARTMENT
        return _CALL_FAILURES[last.status]
    # Nothing failed since the last served call, yet requests are pending: that is what
    # to fix first (the critique names them); penalties follow as notes.
    return INCOMPLETE


def compute_score_with_feedback(
    task: data.Task, world: data.World, trajectory, *, enhancer=None
) -> ScoreResult:
    """Scores an episode record (`tools.Episode`: steps, final_message).

    `enhancer` is an optional feedback.LLMFeedback that rewrites the rule-based
    feedback; it falls back to the rule-based text on any failure.
    """
    s = _summarize(task, world, trajectory.steps)
    served = {c.department_id for c in s.calls if c.status == phone.SERVED}
    completed = _departments(task) <= served
    reported = trajectory.final_message is not None
    penalties = _penalties(task, s, reported, completed)
    stage = _stage(task, s, served)
    score = round(max(0.0, stage - sum(penalties.values())), 6)
    failure = _failure_type(task, s, completed, penalties)
    context = feedback.FeedbackContext(
        failure_type=failure,
        task=task,
        world=world,
        collected=frozenset(s.collected),
        requested=frozenset(s.requested),
        searches=tuple(s.searches),
        calls=tuple(s.calls),
        served=frozenset(served),
        invalid=tuple(s.invalid),
        penalties={k: v for k, v in penalties.items() if v > 0},
        needless_searches=s.needless_searches,
    )
    parts = feedback.critique(context)
    text = parts.text() if enhancer is None else parts.rewritten(enhancer, trajectory)
    needed = set(task.required_auth_fields)
    partial = {
        "stage": stage,
        "company_found": float(s.company_found),
        "auth_collected": len(needed & s.collected) / len(needed),
        "authenticated": float(any(c.authenticated for c in s.calls)),
        "requests_served": len(served & _departments(task)) / len(task.requests),
        "form_calls": float(s.forms),
        "penalty": round(sum(penalties.values()), 6),
    }
    return ScoreResult(score, trajectory.final_message or "", text, partial, failure)
