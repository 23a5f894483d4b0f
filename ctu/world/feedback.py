"""Feedback on an episode: rule-based templates, optional LLM rewrite with a cache.

Rule-based feedback is the default: one sentence per failure type that says
what went wrong and what to do next, naming fields, departments, numbers and
prerequisites, then the corrected form and calls as JSON, then one short note per
other penalty (`rule_based_feedback`). Failure-type strings are
the constants in ctu/world/reward.py (kept as literals here to avoid a cycle).

`LLMFeedback` rewrites the prose of that text (not the JSON, which follows the
rewrite verbatim: `Critique.rewritten`) through an OpenAI-compatible
`/chat/completions` endpoint (plain urllib), caches answers on disk keyed by
the request, and falls back to the rule-based prose on any error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.request
from collections.abc import Mapping

from ctu.world import data

# LLM feedback is capped at this many tokens (SPEC: <= 100).
MAX_LLM_FEEDBACK_TOKENS = 100


@dataclasses.dataclass(frozen=True)
class FeedbackContext:
    """Everything the templates need, from reward._summarize."""

    failure_type: str
    task: data.Task
    world: data.World
    collected: frozenset
    requested: frozenset
    searches: tuple
    calls: tuple  # phone.CallResult, in order
    served: frozenset
    invalid: tuple  # error messages of malformed calls
    penalties: Mapping[str, float]  # failure type -> penalty, only those > 0
    needless_searches: int = 0  # searches after the task's company was found


def _fields(fields) -> str:
    ordered = [f for f in data.AUTH_FIELDS if f in set(fields)]
    return ", ".join(ordered) if ordered else "none"


def _dept(ctx: FeedbackContext, department_id: str) -> str:
    d = ctx.world.departments[department_id]
    company = ctx.world.companies[ctx.world.department_company[department_id]]
    return f"{company.name} {d.name} ({d.phone_number})"


def _pending(ctx: FeedbackContext) -> list[str]:
    return [r.department_id for r in ctx.task.requests if r.department_id not in ctx.served]


def _last_failed_call(ctx: FeedbackContext):
    return next((c for c in reversed(ctx.calls) if c.status != "served"), None)


def _success(ctx):
    return (
        "Task completed correctly: one form with exactly the needed details, the right "
        "departments in order, and a report to the user."
    )


def _malformed(ctx):
    return (
        f"Your tool call could not run: {ctx.invalid[0]} "
        "Call a listed tool with JSON arguments that match its schema."
    )


def _unknown_company(ctx):
    name = ctx.world.companies[ctx.task.company_id].name
    tried = ", ".join(f"'{q[:60]}'" for q in ctx.searches[:3])
    did = f"Your searches ({tried}) did not find it." if tried else "You never searched for it."
    return (
        f"The user needs {name}. {did} "
        f"Call search_company with the company the user named, e.g. '{name}'."
    )


def _missing_auth(ctx):
    needed = set(ctx.task.required_auth_fields)
    missing = needed - ctx.collected
    call = _last_failed_call(ctx)
    if not missing and call is not None and call.auth is not None and call.auth.missing:
        # The phone asks for the missing fields of the auth set closest to what was
        # passed, which may be one this user cannot complete: name what is missing from
        # the set the user has (`data.auth_set_for`), as the calls' JSON does.
        department = ctx.world.departments[call.department_id]
        usable = data.auth_set_for(department, ctx.world.users[ctx.task.user_id])
        lacked = [f for f in usable if f not in call.auth.given] or call.auth.missing
        return (
            f"Your call to {_dept(ctx, call.department_id)} lacked {_fields(lacked)}; "
            "pass every field the department requires in auth_info."
        )
    if not missing:
        return (
            "You passed auth details before the user gave them; collect them with "
            "auth_info_form first and pass the values exactly as the user gave them."
        )
    depts = ", ".join(_dept(ctx, r.department_id) for r in ctx.task.requests)
    return (
        f"You never collected {_fields(missing)} from the user, which {depts} require(s). "
        f"Ask for all needed fields ({_fields(needed)}) in a single auth_info_form call "
        "before phoning."
    )


def _wrong_value(ctx):
    call = _last_failed_call(ctx)
    return (
        f"The {_fields(call.auth.wrong)} you gave {_dept(ctx, call.department_id)} did not "
        "match the user's records; pass the values exactly as the user gave them."
    )


def _unknown_number(ctx):
    pending = _pending(ctx)
    target = f" The department you need next is {_dept(ctx, pending[0])}." if pending else ""
    return (
        f"You dialled a number that is not in service.{target} "
        "Use the numbers search_company returns."
    )


def _wrong_department(ctx):
    call = _last_failed_call(ctx)
    pending = _pending(ctx)
    right = _dept(ctx, pending[0]) if pending else "none"
    return (
        f"{_dept(ctx, call.department_id)} does not handle this request. The right department "
        f"is {right}; match the request to the department descriptions."
    )


def _wrong_order(ctx):
    call = _last_failed_call(ctx)
    d = ctx.world.departments[call.department_id]
    missing = [p for p in d.prerequisites if p not in ctx.served] or list(d.prerequisites)
    prereq = ", ".join(_dept(ctx, p) for p in missing)
    return (
        f"{_dept(ctx, call.department_id)} requires that you reach {prereq} first. "
        f"Call the prerequisite department before {d.name}."
    )


def _repeated_form(ctx):
    return (
        "You used auth_info_form more than once. Ask for every needed field "
        f"({_fields(ctx.task.required_auth_fields)}) in one form."
    )


def _over_collection(ctx):
    extra = ctx.requested - set(ctx.task.required_auth_fields)
    return (
        f"You asked the user for {_fields(extra)}, which no department in this task needs; "
        f"ask only for {_fields(ctx.task.required_auth_fields)}."
    )


def _oversharing(ctx):
    call = next(c for c in ctx.calls if c.auth and c.auth.extra)
    return (
        f"You gave {_dept(ctx, call.department_id)} details it does not need "
        f"({_fields(call.auth.extra)}); pass each department only its required fields."
    )


def _needless_calls(ctx):
    failed = sum(c.status != "served" for c in ctx.calls)
    wasted = [f"{failed} phone call(s) that achieved nothing"] if failed else []
    if ctx.needless_searches:
        wasted.append(f"{ctx.needless_searches} search(es) after the company was found")
    return (
        f"You made {' and '.join(wasted) or 'calls that achieved nothing'}; plan the calls "
        "from the search result and call each department once."
    )


def _no_report(ctx):
    return (
        "Every request was handled, but you never reported back to the user; finish with "
        "a short summary message (respond)."
    )


def _incomplete(ctx):
    pending = ", ".join(_dept(ctx, p) for p in _pending(ctx))
    return (
        f"You stopped before finishing: {pending} still needed a call. Keep going until "
        "every request is served, then report to the user."
    )


TEMPLATES = {
    "success": _success,
    "malformed_tool_call": _malformed,
    "unknown_company": _unknown_company,
    "missing_auth": _missing_auth,
    "wrong_auth_value": _wrong_value,
    "unknown_number": _unknown_number,
    "wrong_department": _wrong_department,
    "wrong_order": _wrong_order,
    "repeated_form": _repeated_form,
    "over_collection": _over_collection,
    "oversharing": _oversharing,
    "needless_calls": _needless_calls,
    "no_final_report": _no_report,
    "incomplete": _incomplete,
}


# Failure types whose critique always lists the task's form fields (missing_auth does
# when the form left some out). The task's calls are shown after any failure the form or
# a call could have caused: all but these.
_FORM_KINDS = {"repeated_form", "over_collection"}
_NOT_CALL_KINDS = {"success", "malformed_tool_call", "unknown_company", "no_final_report"}


def task_calls(world: data.World, task: data.Task) -> list[dict]:
    """The calls that solve `task`, in order: each department's number and the auth fields
    it takes from this user (`data.auth_set_for`: the alternate set when the user lacks
    the primary one), in form order."""
    user = world.users[task.user_id]
    calls = []
    for request in task.requests:
        department = world.departments[request.department_id]
        fields = set(data.auth_set_for(department, user))
        calls.append(
            {
                "phone_number": department.phone_number,
                "auth_info": [f for f in data.AUTH_FIELDS if f in fields],
            }
        )
    return calls


def _arguments_to_copy(ctx: FeedbackContext, kinds) -> list[str]:
    """The corrected tool arguments, written as the policy writes them: JSON.

    A critique that lists fields in prose ("name, phone") leaves the policy to rewrite
    the list as the form's JSON; a small policy copies JSON it has seen token for token
    far more often than it rewrites prose (docs/results.md section 2). The form's fields
    are shown when the critique lists the task's fields. The calls, each department's
    number and the names of the fields it takes (never the user's values: those the
    policy reads from the form's reply), are shown after a failure of the form or a
    call, all of them in order, since a retry starts again from the search.
    """
    shown = []
    needed = set(ctx.task.required_auth_fields)
    form_kinds = _FORM_KINDS | ({"missing_auth"} if needed - ctx.collected else set())
    if form_kinds & set(kinds):
        fields = [f for f in data.AUTH_FIELDS if f in needed]
        shown.append(f"The form: {json.dumps({'fields': fields})}.")
    if set(kinds) - _NOT_CALL_KINDS:
        shown.append(f"The calls: {json.dumps(task_calls(ctx.world, ctx.task))}.")
    return shown


@dataclasses.dataclass(frozen=True)
class Critique:
    """A critique's parts: the main template's sentence, the corrected arguments as
    JSON sentences (`_arguments_to_copy`), and one note per other penalty."""

    main: str
    arguments: tuple[str, ...]
    notes: tuple[str, ...]

    def text(self) -> str:
        """The main sentence, the arguments, then the notes: a block too long for
        `max_feedback_tokens` is cut from the end, so the notes go last."""
        return " ".join([self.main, *self.arguments, *self.notes])

    def rewritten(self, enhancer, trajectory) -> str:
        """The prose (main sentence and notes) as `enhancer` (`LLMFeedback`) rewrites it
        within its token cap, then the arguments verbatim: a rewrite of JSON in at most
        100 tokens drops or paraphrases it, and copying it is what a small policy can do
        with a critique (docs/results.md section 2)."""
        prose = " ".join([self.main, *self.notes])
        rewrite = enhancer.enhance(prose, trajectory)
        if rewrite == prose:  # the enhancer fell back: the rule-based order
            return self.text()
        return " ".join([rewrite, *self.arguments])


def critique(ctx: FeedbackContext) -> Critique:
    """The rule-based critique of an episode."""
    kinds = [ctx.failure_type, *(k for k in ctx.penalties if k != ctx.failure_type)]
    return Critique(
        main=TEMPLATES[kinds[0]](ctx),
        arguments=tuple(_arguments_to_copy(ctx, kinds)),
        notes=tuple("Also: " + TEMPLATES[k](ctx) for k in kinds[1:]),
    )


def rule_based_feedback(ctx: FeedbackContext) -> str:
    """The rule-based critique's text (`Critique.text`)."""
    return critique(ctx).text()


# ---- optional LLM enhancement ----------------------------------------------------------

_SYSTEM = (
    "You coach a customer-service agent that uses tools. Rewrite the critique below "
    "in at most 100 tokens: reference the agent's actions, say why they failed and what "
    "to do next. Keep every field name, department, phone number and company name."
)


def action_summary(trajectory) -> str:
    """One line per agent action, for the LLM prompt."""
    lines = []
    for step in trajectory.steps:
        args = json.dumps(step.arguments, sort_keys=True, default=str)[:200]
        lines.append(f"{step.name}({args}) -> {step.observation[:160]}")
    return "\n".join(lines)


class LLMFeedback:
    """Rewrites rule-based feedback with an OpenAI-compatible endpoint; cached on disk."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        cache_dir: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.cache_dir = cache_dir
        self.api_key = api_key
        self.timeout_s = timeout_s
        os.makedirs(cache_dir, exist_ok=True)

    def enhance(self, rule_feedback: str, trajectory) -> str:
        """The rewritten feedback, or `rule_feedback` if the endpoint fails."""
        request = {
            "model": self.model,
            "max_tokens": MAX_LLM_FEEDBACK_TOKENS,
            "temperature": 0.0,
            "messages": [
                {"role": "system", "content": _SYSTEM},
                {
                    "role": "user",
                    "content": f"Actions:\n{action_summary(trajectory)}\n\n"
                    f"Critique: {rule_feedback}",
                },
            ],
        }
        body = json.dumps(request, sort_keys=True).encode()
        path = os.path.join(self.cache_dir, hashlib.sha256(body).hexdigest() + ".json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)["feedback"]
        try:
            text = self._post(body)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return rule_feedback  # the endpoint is optional; never fail an episode on it
        text = " ".join(text.split()[:MAX_LLM_FEEDBACK_TOKENS])  # guard if max_tokens is ignored
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"feedback": text}, f)
        os.replace(tmp, path)
        return text

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
            reply = json.loads(response.read().decode("utf-8"))
        text = reply["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"no text in the completion: {text!r:.80}")
        text = text.strip()
        return text
