"""Reward ladder, penalties, anti-gaming, feedback content and the LLM feedback cache."""

import collections
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctu.world import data, evaluation, feedback, reward, tools
from ctu.world.env import Action, Environment
from tests import toys


@pytest.fixture(scope="module")
def world():
    return toys.shipped_world()


@pytest.fixture(scope="module")
def env(world):
    return Environment(world, max_turns=40)


def _task(world, level, n=0):
    return [t for t in world.split("train") if t.level == level][n]


def _auth(world, task, department_id, user=None):
    user = world.users[task.user_id]
    d = world.departments[department_id]
    return {f: user.values[f] for f in data.auth_set_for(d, user)}


def _run(env, task, actions, report=True):
    """Runs actions (answering a clarification question), then a report; final StepResult."""
    env.reset(task.task_id)
    result = None
    for action in actions:
        result = env.step(action)
        if "What do you mean" in result.observation:
            result = env.step(Action("respond", {"content": "It is on your card."}))
        if result.done:
            return result
    if report:
        return env.step(Action("respond", {"content": "All done."}))
    return result


def _search(world, task):
    return Action("search_company", {"company_name": world.companies[task.company_id].name})


def _form(fields):
    return Action("auth_info_form", {"fields": list(fields)})


def _call(world, department_id, auth):
    return Action(
        "make_phone_call",
        {"phone_number": world.departments[department_id].phone_number, "auth_info": auth},
    )


def _proper(world, task):
    actions = [_search(world, task), _form(task.required_auth_fields)]
    for r in task.requests:
        actions.append(_call(world, r.department_id, _auth(world, task, r.department_id)))
    return actions


# ---- the ladder ----------------------------------------------------------------------


def test_ladder_stages(world, env):
    task = _task(world, 3)
    first, second = (r.department_id for r in task.requests)
    needed = list(task.required_auth_fields)
    wrong = next(
        d
        for d in world.companies[task.company_id].departments
        if d.department_id not in (first, second)
    )
    user = world.users[task.user_id]
    all_values = {f: user.values[f] for f in data.AUTH_FIELDS if user.has(f)}
    wrong_auth = {f: all_values[f] for f in data.auth_set_for(wrong, user) if f in all_values}
    stages = {
        0.0: [_search(world, task)],
        0.2: [_search(world, task), _form(needed[:1])],
        0.3: [_search(world, task), _form(needed)],
        0.5: [_search(world, task), _form(needed), _call(world, wrong.department_id, wrong_auth)],
        0.7: [
            _search(world, task),
            _form(needed),
            _call(world, second, _auth(world, task, second)),
        ],
        1.0: _proper(world, task),
    }
    for stage, actions in stages.items():
        result = _run(env, task, actions)
        assert result.info["partial_scores"]["stage"] == stage, (stage, result.info)
        penalty = result.info["partial_scores"]["penalty"]
        assert result.reward == pytest.approx(max(0.0, stage - penalty))
    assert _run(env, task, stages[1.0]).reward == 1.0


@pytest.mark.parametrize(
    "mutate,failure,penalty",
    [
        ("second_form", reward.REPEATED_FORM, reward.REPEATED_FORM_PENALTY),
        ("extra_field", reward.OVER_COLLECTION, reward.OVER_COLLECTION_PENALTY_PER_FIELD),
        # Oversharing needs an over-collected field first, which is reported first.
        ("overshare", reward.OVER_COLLECTION, reward.OVERSHARING_PENALTY),
        ("extra_call", reward.NEEDLESS_CALLS, reward.NEEDLESS_CALL_PENALTY),
        ("bad_call", reward.MALFORMED_CALL, reward.MALFORMED_CALL_PENALTY),
        ("no_report", reward.NO_FINAL_REPORT, reward.NO_FINAL_REPORT_PENALTY),
    ],
)
def test_each_penalty_costs_its_constant(world, mutate, failure, penalty):
    env = Environment(world, max_turns=6)
    task = next(
        t
        for t in world.split("train")
        if t.level == 1
        and world.users[t.user_id].behavior == "cooperative"
        and len(t.required_auth_fields) < 4
    )
    actions = _proper(world, task)
    d = task.requests[0].department_id
    user = world.users[task.user_id]
    extra = next(f for f in data.AUTH_FIELDS if f not in task.required_auth_fields and user.has(f))
    if mutate == "second_form":
        actions.insert(2, _form(task.required_auth_fields))
    elif mutate == "extra_field":
        actions[1] = _form([*task.required_auth_fields, extra])
    elif mutate == "overshare":
        actions[1] = _form([*task.required_auth_fields, extra])
        actions[2] = _call(world, d, {**_auth(world, task, d), extra: user.values[extra]})
        penalty += reward.OVER_COLLECTION_PENALTY_PER_FIELD
    elif mutate == "extra_call":
        actions.append(actions[-1])
    elif mutate == "bad_call":
        actions.insert(0, Action("make_phone_call", {"phone": "x"}))
    if mutate == "no_report":
        actions += [Action("respond", {"content": "Anything else?"})] * 10
    result = _run(env, task, actions, report=mutate != "no_report")
    assert result.done
    assert result.reward == pytest.approx(1.0 - penalty)
    assert result.info["failure_type"] == failure
    if mutate == "overshare":
        assert "does not need" in result.info["feedback"]


# ---- the reward cannot be gamed -------------------------------------------------------


def _adversaries(world, task):
    user = world.users[task.user_id]
    company = world.companies[task.company_id]
    everything = [f for f in data.AUTH_FIELDS]
    values = {f: user.values[f] for f in data.AUTH_FIELDS if user.has(f)}
    proper = _proper(world, task)
    numbers = [d.department_id for d in company.departments]
    if set(task.required_auth_fields) != set(everything):  # else asking for all is proper
        yield "ask_everything", [_search(world, task), _form(everything)] + proper[2:]
    yield (
        "call_every_number_twice",
        [_search(world, task), _form(everything)] + [_call(world, d, values) for d in numbers * 2],
    )
    yield "repeat_form", [proper[0], proper[1], proper[1]] + proper[2:]
    yield (
        "extra_keys",
        proper[:2]
        + [
            Action(
                "make_phone_call", {**a.kwargs, "auth_info": {**a.kwargs["auth_info"], "pin": "1"}}
            )
            for a in proper[2:]
        ],
    )
    yield (
        "case_whitespace",
        proper[:2]
        + [
            Action(
                "make_phone_call",
                {
                    **a.kwargs,
                    "auth_info": {k: f" {v.upper()} " for k, v in a.kwargs["auth_info"].items()},
                },
            )
            for a in proper[2:]
        ],
    )
    yield "skip_form", [proper[0]] + proper[2:]
    yield "search_spam", [proper[0]] * 5 + proper[1:]


def test_adversarial_policies_never_reach_a_proper_score(world, env):
    for task in world.split("val"):
        for name, actions in _adversaries(world, task):
            result = _run(env, task, actions)
            assert result.reward < 1.0, (name, task.task_id, result.info)
        assert _run(env, task, _proper(world, task)).reward == 1.0


def _random_action(world, task, draw):
    company = world.companies[task.company_id]
    user = world.users[task.user_id]
    departments = list(company.departments) + list(world.companies["C000"].departments)
    kind = draw(st.sampled_from(["search", "form", "call", "respond", "junk"]))
    if kind == "search":
        name = draw(st.sampled_from([company.name, company.aliases[0], "Acme", "Nobody"]))
        return Action("search_company", {"company_name": name})
    if kind == "form":
        fields = draw(st.lists(st.sampled_from(data.AUTH_FIELDS), min_size=1, unique=True))
        return Action("auth_info_form", {"fields": fields})
    if kind == "call":
        d = draw(st.sampled_from(departments))
        fields = draw(st.lists(st.sampled_from(data.AUTH_FIELDS), unique=True))
        tamper = draw(st.booleans())
        auth = {f: (user.values[f] or "0") + (" " if tamper else "") for f in fields}
        return Action("make_phone_call", {"phone_number": d.phone_number, "auth_info": auth})
    if kind == "respond":
        return Action("respond", {"content": draw(st.sampled_from(["ok?", "It means x.", "Done"]))})
    return Action(draw(st.sampled_from(["make_phone_call", "hack"])), {"x": 1})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data_=st.data())
def test_random_policies_score_in_range_and_one_only_when_proper(data_):
    world = toys.shipped_world()
    task = data_.draw(st.sampled_from(world.split("val")))
    env = Environment(world, max_turns=15)
    env.reset(task.task_id)
    result = None
    for _ in range(15):
        result = env.step(_random_action(world, task, data_.draw))
        if result.done:
            break
    assert 0.0 <= result.reward <= 1.0
    if not result.done:
        return
    steps = env.episode.steps
    if result.reward == 1.0:  # only a proper solution earns full marks
        forms = [s for s in steps if s.name == "auth_info_form" and s.observation[:6] != "Error:"]
        assert len(forms) == 1
        assert set(forms[0].arguments["fields"]) == set(task.required_auth_fields)
        calls = [s for s in steps if s.name == "make_phone_call"]
        assert len(calls) == len(task.requests)
        assert all(s.outcome.status == "served" and not s.outcome.auth.extra for s in calls)


# ---- feedback -------------------------------------------------------------------------


def test_every_failure_type_has_a_template():
    assert set(feedback.TEMPLATES) == set(reward.FAILURE_TYPES)


def test_feedback_names_fields_departments_numbers_and_prerequisites(world, env):
    task = _task(world, 3)
    first, second = (world.departments[r.department_id] for r in task.requests)
    needed = list(task.required_auth_fields)

    info = _run(env, task, [_search(world, task), _form(needed[1:])]).info
    assert info["failure_type"] == reward.MISSING_AUTH and needed[0] in info["feedback"]

    wrong_order = [_search(world, task), _form(needed)]
    wrong_order.append(_call(world, second.department_id, _auth(world, task, second.department_id)))
    info = _run(env, task, wrong_order).info
    assert info["failure_type"] == reward.WRONG_ORDER
    assert first.name in info["feedback"] and first.phone_number in info["feedback"]

    info = _run(env, task, [Action("search_company", {"company_name": "Nobody Inc"})]).info
    assert info["failure_type"] == reward.UNKNOWN_COMPANY
    assert world.companies[task.company_id].name in info["feedback"]

    info = _run(env, task, [Action("auth_info_form", {"fields": "all"})]).info
    assert info["failure_type"] == reward.MALFORMED_CALL and "fields" in info["feedback"]


def test_feedback_on_wrong_department_names_the_right_one(world, env):
    for task in [t for t in world.split("train") if t.level == 1][:20]:
        right = world.departments[task.requests[0].department_id]
        user = world.users[task.user_id]
        for wrong in world.companies[task.company_id].departments:
            fields = data.auth_set_for(wrong, user)
            if wrong is right or not all(user.has(f) for f in fields):
                continue
            actions = [_search(world, task), _form(task.required_auth_fields)]
            actions.append(_call(world, wrong.department_id, {f: user.values[f] for f in fields}))
            info = _run(env, task, actions).info
            assert info["failure_type"] == reward.WRONG_DEPARTMENT
            assert right.name in info["feedback"] and right.phone_number in info["feedback"]
            return
    pytest.fail("no wrong-department case found")


def test_a_wrong_department_that_refuses_the_auth_is_still_the_wrong_department(world, env):
    """The phone system authenticates before it routes: a department that handles none of
    the requests and lacks a field of its own is a wrong number, not missing auth."""
    cases = 0
    for task in [t for t in world.split("train") if t.level in (1, 2)]:
        right = world.departments[task.requests[0].department_id]
        user = world.users[task.user_id]
        needed = set(task.required_auth_fields)
        for wrong in world.companies[task.company_id].departments:
            theirs = set(data.auth_set_for(wrong, user))
            if wrong is right or theirs <= needed or not all(user.has(f) for f in needed):
                continue
            given = {f: user.values[f] for f in needed}  # the task's fields, not theirs
            actions = [
                _search(world, task),
                _form(needed),
                _call(world, wrong.department_id, given),
            ]
            result = _run(env, task, actions)
            if env.episode.steps[-2].outcome.status != "missing_auth":
                continue  # it also accepts the task's fields
            assert result.info["failure_type"] == reward.WRONG_DEPARTMENT
            assert right.phone_number in result.info["feedback"]
            assert wrong.phone_number in result.info["feedback"]
            # The same fields, one short, given to the right department: missing auth.
            short = dict(list(given.items())[1:])
            actions = [
                _search(world, task),
                _form(needed),
                _call(world, right.department_id, short),
            ]
            info = _run(env, task, actions).info
            assert info["failure_type"] == reward.MISSING_AUTH
            # the form had every field: the critique is about the call, and shows no form
            assert " lacked " in info["feedback"] and "The form:" not in info["feedback"]
            cases += 1
            break
    assert cases >= 10


def test_feedback_on_repeated_form_and_over_collection(world, env):
    task = _task(world, 2)
    extra = next(f for f in data.AUTH_FIELDS if f not in task.required_auth_fields)
    actions = _proper(world, task)
    actions[1] = _form([*task.required_auth_fields, extra])
    info = _run(env, task, actions).info
    assert info["failure_type"] == reward.OVER_COLLECTION and extra in info["feedback"]
    actions = _proper(world, task)
    actions.insert(2, actions[1])
    info = _run(env, task, actions).info
    assert info["failure_type"] == reward.REPEATED_FORM and "once" in info["feedback"].lower()


# What each critique of the form or a call says, in its own words (ctu/world/feedback.py).
_FORM_OR_CALL_FAILURES = (
    "never collected",
    "lacked",
    "before the user gave them",
    "did not match the user's records",
    "not in service",
    "does not handle this request",
    "requires that you reach",
    "more than once",
    "which no department in this task needs",
    "details it does not need",
    "achieved nothing",
    "stopped before finishing",
)


def test_critiques_show_the_corrected_arguments_as_json(world, env):
    """Over the random policy's failures: a critique that lists the task's fields in prose
    shows the form's arguments as JSON, exactly those fields, valid for the form's schema.
    One that criticises the form or a call shows the task's calls, with field names and
    no values: the department it names to dial among them, and the calls, filled in with
    the values the user gives, solve the task after that form. No other critique shows
    either."""
    form_schema = next(t for t in tools.TOOL_SCHEMAS if t["function"]["name"] == "auth_info_form")
    valid_form = tools.compile_checker(form_schema["function"]["parameters"])
    tasks = {t.task_id: t for t in world.split("val")}
    results = evaluation.run_episodes(
        evaluation.scripted_policy("random", world), world, list(tasks.values()), trials=1, seed=1
    )
    shown = collections.Counter()
    for r in results:
        text, task = r.feedback, tasks[r.task_id]
        listed = re.search(r"(?:ask only for |every needed field \(|all needed fields \()", text)
        form = re.search(r" The form: (\{.*?\})\.(?: |$)", text)
        assert (form is None) == (listed is None), text
        if form is not None:
            arguments = json.loads(form.group(1))
            assert valid_form(arguments)
            assert set(arguments["fields"]) == set(task.required_auth_fields)
            shown["form"] += 1
        calls = re.search(r" The calls: (\[.*?\]\}\])\.(?: |$)", text)
        criticised = any(phrase in text for phrase in _FORM_OR_CALL_FAILURES)
        assert (calls is None) == (not criticised), text
        if calls is None:
            continue
        calls = json.loads(calls.group(1))
        user = world.users[task.user_id]
        assert all(user.values[f] not in text for c in calls for f in c["auth_info"]), text
        named = re.search(
            r"(?:The right department|The department you need next) is [^(]*\((\+[\d-]+)\)", text
        )
        if named is not None:
            assert named.group(1) in [c["phone_number"] for c in calls]
            shown["named"] += 1
        replay = [_search(world, task), _form(task.required_auth_fields)]
        for c in calls:
            auth = {f: user.values[f] for f in c["auth_info"]}
            replay.append(Action("make_phone_call", {**c, "auth_info": auth}))
        assert _run(env, task, replay).info["score"] == 1.0, text
        shown["calls"] += 1
    assert shown["form"] >= 60 and shown["calls"] >= 80 and shown["named"] >= 5, shown


def test_needless_calls_feedback_counts_what_was_wasted(world, env):
    """The critique of needless calls counts the failed calls and the searches after the
    company was found, each as what it is."""
    task = _task(world, 1)
    proper = _proper(world, task)
    _run(env, task, [proper[0], proper[0], *proper[1:]])
    result = env.episode
    scored = reward.compute_score_with_feedback(task, world, result)
    assert scored.failure_type == "needless_calls", scored
    assert scored.feedback.startswith("You made 1 search(es) after the company was found;")
    assert "phone call(s)" not in scored.feedback
    wrong = next(
        d
        for d in world.departments
        if d not in {r.department_id for r in task.requests}
        and world.department_company[d] == task.company_id
    )
    _run(env, task, [*proper[:2], _call(world, wrong, {}), *proper[2:]])
    scored = reward.compute_score_with_feedback(task, world, env.episode)
    assert "1 phone call(s) that achieved nothing" in scored.feedback, scored.feedback


def test_missing_auth_names_the_fields_this_user_can_give(world, env):
    """A level-4 user lacks a field of the department's primary auth set. A call with only
    the fields both sets share is refused for the primary set's missing field (the closest
    set); the critique names the alternate set's field, which the user has."""
    tasks = [t for t in world.split("train") if t.level == 4][:10]
    assert tasks
    for task in tasks:
        department = world.departments[task.requests[0].department_id]
        user = world.users[task.user_id]
        shared = [f for f in department.auth_fields if f in department.alternate_auth_fields]
        usable = data.auth_set_for(department, user)
        call = _call(world, task.requests[0].department_id, {f: user.values[f] for f in shared})
        _run(env, task, [_search(world, task), _form(task.required_auth_fields), call])
        scored = reward.compute_score_with_feedback(task, world, env.episode)
        prose = scored.feedback.split(" The calls:")[0]
        assert scored.failure_type == "missing_auth", scored
        lacking = [f for f in department.auth_fields if not user.has(f)]
        assert lacking and not any(f in prose for f in lacking), prose
        assert all(f in prose for f in usable if f not in shared), prose


def test_a_pending_request_is_what_the_critique_names_first(world, env):
    """Level 3: the second department called first (refused: its prerequisite), then the
    first served, then a report. The score counts the served request less the failed
    call; the failure is the unfinished request, named, with the failed call as a note."""
    task = next(t for t in world.split("train") if t.level == 3)
    first, second = (r.department_id for r in task.requests)
    calls = [_call(world, d, _auth(world, task, d)) for d in (second, first)]
    _run(env, task, [_search(world, task), _form(task.required_auth_fields), *calls])
    scored = reward.compute_score_with_feedback(task, world, env.episode)
    assert scored.failure_type == "incomplete", scored
    assert 0 < scored.score < 1
    assert scored.feedback.startswith(
        f"You stopped before finishing: {world.companies[task.company_id].name}"
    )
    assert world.departments[second].phone_number in scored.feedback.split(" The calls:")[0]
    assert "Also: You made 1 phone call(s) that achieved nothing" in scored.feedback


# ---- LLM feedback through a fake OpenAI-compatible server ------------------------------


def test_llm_feedback_uses_endpoint_then_cache_and_falls_back(world, env, tmp_path):
    reply = "Call Fraud first, then Billing."
    with toys.fake_completions(reply) as (base, requests):
        enhancer = feedback.LLMFeedback(base, "fake", cache_dir=str(tmp_path / "cache"))
        task = _task(world, 1)
        # A wrong form, then a call: a critique with the form's and the calls' JSON.
        dept = world.departments[task.requests[0].department_id]
        call = {"phone_number": dept.phone_number, "auth_info": {"name": "x"}}
        _run(env, task, [_search(world, task), _form(["name"]), Action("make_phone_call", call)])
        plain = reward.compute_score_with_feedback(task, world, env.episode)
        first = reward.compute_score_with_feedback(task, world, env.episode, enhancer=enhancer)
        again = reward.compute_score_with_feedback(task, world, env.episode, enhancer=enhancer)
        assert len(requests) == 1 and len(os.listdir(tmp_path / "cache")) == 1
        assert requests[0]["max_tokens"] == feedback.MAX_LLM_FEEDBACK_TOKENS
    # The rewrite replaces the prose; the JSON to copy follows it as the rules wrote it,
    # and the endpoint never saw it.
    arguments = re.findall(r"The (?:form|calls): [\[{].*?[\]}]\.", plain.feedback)
    assert any(a.startswith("The calls:") for a in arguments), plain.feedback
    assert first.feedback == again.feedback == " ".join([reply, *arguments])
    sent = requests[0]["messages"][1]["content"]
    assert "Critique:" in sent and all(a not in sent for a in arguments)
    assert plain.feedback.split(" The ")[0] in sent  # the main sentence is rewritten
    # An endpoint that fails leaves the rule-based critique exactly as it was.
    offline = feedback.LLMFeedback(base, "fake", cache_dir=str(tmp_path / "other"), timeout_s=1)
    fallback = reward.compute_score_with_feedback(task, world, env.episode, enhancer=offline)
    assert fallback.feedback == plain.feedback
    # So does one that answers without text ("content": null, or only whitespace).
    for empty in (None, "  "):
        with toys.fake_completions(empty) as (base, _):
            silent = feedback.LLMFeedback(base, "fake", cache_dir=str(tmp_path / repr(empty)))
            scored = reward.compute_score_with_feedback(task, world, env.episode, enhancer=silent)
        assert scored.feedback == plain.feedback
