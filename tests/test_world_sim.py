"""Simulators, tools and the environment: search, phone failures, users, fuzzing."""

import random

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctu.world import data, generate, phone, tools, users
from ctu.world.directory import CompanyDirectory
from ctu.world.env import Action, Environment, StepResult
from ctu.world.phone import PhoneSystem
from ctu.world.users import UserSimulator
from tests import toys


@pytest.fixture(scope="module")
def world():
    return toys.shipped_world()


@pytest.fixture(scope="module")
def directory(world):
    return CompanyDirectory(world.companies)


def _task(world, level, behavior=None):
    return next(
        t
        for t in world.split("train")
        if t.level == level and behavior in (None, world.users[t.user_id].behavior)
    )


# ---- CompanyDirectory -------------------------------------------------------------------


def test_search_finds_every_company_by_name_alias_and_typo(world, directory):
    rng = random.Random(0)
    for company in world.companies.values():
        queries = [company.name, *company.aliases, company.name.upper(), f"  {company.name} "]
        queries += [generate._typo(rng, company.name) for _ in range(3)]
        for q in queries:
            found = directory.search(q)
            assert found is not None and found.company_id == company.company_id, q


def test_search_rejects_unrelated_names(directory):
    for q in ["Zyxw Qqq", "", "   ", "!!!", "x" * 200]:
        assert directory.search(q) is None, q


def test_phone_lookup_accepts_formatting_but_not_unknown_numbers(world, directory):
    d = next(iter(world.departments.values()))
    digits = d.phone_number.replace("-", "").replace("+", "")
    spaced = f"+{digits[0]} ({digits[1:4]}) {digits[4:7]} {digits[7:]}"
    assert directory.department_for_phone(spaced) is d
    assert directory.department_for_phone("+1-800-000-0000") is None


def test_search_result_never_reveals_auth_requirements(world):
    env = Environment(world)
    for task in world.split("val")[:30]:
        env.reset(task.task_id)
        name = world.companies[task.company_id].name
        obs = env.step(Action("search_company", {"company_name": name})).observation
        assert "Departments" in obs
        for d in world.companies[task.company_id].departments:
            assert d.phone_number in obs
        for secret in ("account_number", "last_4_ssn", "date_of_birth", "credit_card", "verify"):
            assert secret not in obs


# ---- PhoneSystem ------------------------------------------------------------------------


def _phone_for(world, directory, task):
    user = world.users[task.user_id]
    return PhoneSystem(world, directory, task, user), user


def _auth(world, user, department_id):
    d = world.departments[department_id]
    return {f: user.values[f] for f in data.auth_set_for(d, user)}


def test_phone_failures_have_specific_reasons(world, directory):
    task = _task(world, 3)
    ph, user = _phone_for(world, directory, task)
    first, second = (r.department_id for r in task.requests)
    number = world.departments[second].phone_number
    good = _auth(world, user, second)

    r = ph.call("+1-800-000-0000", good)
    assert r.status == phone.UNKNOWN_NUMBER and "not in service" in r.text

    dropped = sorted(good)[0]
    r = ph.call(number, {k: v for k, v in good.items() if k != dropped})
    assert r.status == phone.MISSING_AUTH and dropped.replace("_", " ") in r.text

    r = ph.call(number, {**good, dropped: good[dropped] + "0"})
    assert r.status == phone.WRONG_AUTH_VALUE and dropped.replace("_", " ") in r.text

    r = ph.call(number, {**good, dropped: good[dropped].upper() + " "})
    assert r.status in (phone.WRONG_AUTH_VALUE, phone.PREREQUISITE_NOT_MET)

    r = ph.call(number, good)
    assert r.status == phone.PREREQUISITE_NOT_MET
    assert world.departments[first].name in r.text and r.authenticated

    assert ph.call(world.departments[first].phone_number, _auth(world, user, first)).status == (
        phone.SERVED
    )
    assert ph.call(number, good).status == phone.SERVED and ph.all_served
    assert ph.call(number, good).status == phone.ALREADY_SERVED


def test_wrong_department_names_the_right_one(world, directory):
    task = _task(world, 1)
    ph, user = _phone_for(world, directory, task)
    company = world.companies[task.company_id]
    right = world.departments[task.requests[0].department_id]
    wrong = next(d for d in company.departments if d.department_id != right.department_id)
    auth = {f: user.values[f] for f in data.AUTH_FIELDS if user.has(f)}
    r = ph.call(wrong.phone_number, {f: auth[f] for f in wrong.auth_fields if f in auth})
    if r.status == phone.WRONG_DEPARTMENT:
        assert right.name in r.text
    else:  # the user may lack this department's fields
        assert r.status == phone.MISSING_AUTH


def test_alternate_auth_set_is_accepted_for_level_4(world, directory):
    for task in [t for t in world.split("train") if t.level == 4][:20]:
        ph, user = _phone_for(world, directory, task)
        d = world.departments[task.requests[0].department_id]
        alternate = {f: user.values[f] for f in d.alternate_auth_fields}
        assert ph.call(d.phone_number, alternate).status == phone.SERVED


# ---- UserSimulator ----------------------------------------------------------------------


def test_user_is_deterministic_and_emotions_never_change_facts(world):
    task = _task(world, 2)
    profile = world.users[task.user_id]
    fields = list(data.AUTH_FIELDS)
    a = UserSimulator(profile, task, seed=3)
    b = UserSimulator(profile, task, seed=3)
    assert a.opening_message() == b.opening_message()
    assert a.fill_form(fields) == b.fill_form(fields)
    openings, facts = set(), set()
    for emotion in data.EMOTIONS:
        for behavior in data.BEHAVIORS:
            p = data.UserProfile(profile.user_id, profile.values, (), behavior, emotion)
            sim = UserSimulator(p, task, seed=0)
            openings.add(sim.opening_message())
            reply = sim.fill_form(fields)
            reply_values = {**reply.provided, **sim.reply("It means your SSN.").provided}
            facts.add(tuple(sorted(reply_values.items())))
            assert task.user_request in sim.opening_message()
    assert len(facts) == 1 and len(openings) >= 4


def test_missing_field_answers_i_dont_have_that(world):
    task = next(t for t in world.split("train") if t.level == 4)
    profile = world.users[task.user_id]
    reply = UserSimulator(profile, task).fill_form(list(data.AUTH_FIELDS))
    assert set(reply.lacking) == set(profile.missing_fields)
    for f in profile.missing_fields:
        assert f"{f}: I don't have that." in reply.text


def test_needs_clarification_withholds_then_answers(world):
    task = _task(world, 2, "needs_clarification")
    sim = UserSimulator(world.users[task.user_id], task)
    reply = sim.fill_form(list(task.required_auth_fields))
    assert len(reply.withheld) == 1 and "What do you mean" in reply.text
    (field,) = reply.withheld
    answer = sim.reply("It's the number printed on your statement.")
    assert answer.provided == {field: world.users[task.user_id].values[field]}
    assert not answer.done


def test_question_continues_and_report_ends(world):
    task = _task(world, 1, "difficult")
    sim = UserSimulator(world.users[task.user_id], task)
    assert not sim.reply("Shall I call them now?").done
    assert sim.reply("Your refund is processed.").done


def test_patience_allows_the_longest_perfect_episode():
    longest = 1 + 1 + 1 + 5 + 1  # search, form, clarification, five calls, report
    assert min(users.PATIENCE.values()) - users.DIFFICULT_PATIENCE_CUT >= longest


def test_user_hangs_up_when_patience_runs_out(world):
    task = _task(world, 1)
    env = Environment(world, max_turns=1000)
    env.reset(task.task_id)
    result, turns = None, 0
    while result is None or not result.done:
        result = env.step(Action("search_company", {"company_name": "nobody"}))
        turns += 1
    assert turns == env.episode.user.patience + 1
    assert result.info["ended_by"] == "hang_up" and result.reward == 0.0


# ---- Environment ------------------------------------------------------------------------


def test_perfect_trajectory_scores_one_on_every_shipped_task(world):
    env = Environment(world)
    failures = [t.task_id for t in world.tasks.values() if toys.run_perfect(env, t).reward != 1.0]
    assert failures == []


def test_perfect_trajectory_scores_one_on_another_seed():
    records = generate.generate_world(7)
    tasks = records["train"] + records["val"] + records["test"]
    world = data.build_world(records["companies"], records["users"], tasks)
    env = Environment(world)
    assert all(toys.run_perfect(env, t).reward == 1.0 for t in world.tasks.values())


def test_turn_limit_ends_the_episode(world):
    env = Environment(world, max_turns=3)
    task = _task(world, 1)
    env.reset(task.task_id)
    results = [env.step(Action("respond", {"content": "Working on it?"})) for _ in range(4)]
    assert [r.done for r in results] == [False, False, True, True]
    assert results[2].info["ended_by"] == "turn_limit"
    assert results[3].observation == "The conversation is over."


def test_caller_errors_raise_clearly(world):
    env = Environment(world)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(Action("respond", {"content": "hi"}))
    with pytest.raises(KeyError, match="nope"):
        env.reset("nope")


def test_tool_lifecycle(world):
    task = _task(world, 1)
    episode_env = Environment(world)
    episode_env.reset(task.task_id)
    tool = tools.SearchCompany()
    tool.create(episode_env.episode)
    obs, outcome = tool.execute({"company_name": world.companies[task.company_id].name})
    episode_env.episode.steps.append(tools.Step("search_company", {}, obs, outcome))
    assert tool.calc_reward() == 1.0
    tool.release()
    assert tool.episode is None


# ---- argument validation and fuzzing ----------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=10,
)
_FIELD = st.sampled_from([*data.AUTH_FIELDS, "ssn", "Name", " name", "account number"])
_ARGS = st.one_of(
    _JSON,
    st.fixed_dictionaries({"company_name": st.one_of(st.text(max_size=250), _JSON)}),
    st.fixed_dictionaries({"fields": st.one_of(st.lists(_FIELD, max_size=9), _JSON)}),
    st.fixed_dictionaries(
        {
            "phone_number": st.one_of(st.text(max_size=45), _JSON),
            "auth_info": st.one_of(st.dictionaries(_FIELD, st.text(max_size=210)), _JSON),
        },
        optional={"extra": _JSON},
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=_ARGS)
def test_fast_checker_agrees_with_jsonschema(args):
    for schema in tools.TOOL_SCHEMAS:
        params = schema["function"]["parameters"]
        expected = jsonschema.Draft202012Validator(params).is_valid(args)
        error = tools.ArgumentValidator("t", params).error(args)
        assert (error is None) == expected, (args, error)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(
        st.tuples(
            st.one_of(st.sampled_from([*tools.TOOL_NAMES, "respond"]), st.text(max_size=10)),
            _ARGS,
        ),
        max_size=12,
    )
)
def test_env_never_raises_on_model_output(actions):
    world = toys.shipped_world()
    env = Environment(world, max_turns=10)
    env.reset("train-0003")
    for name, kwargs in actions:
        result = env.step(Action(name, kwargs))
        assert isinstance(result, StepResult) and isinstance(result.observation, str)
        assert 0.0 <= result.reward <= 1.0
        assert len(result.observation) < 5000  # huge arguments never flood the context


def test_bad_arguments_say_what_was_wrong(world):
    env = Environment(world)
    env.reset(_task(world, 1).task_id)
    cases = [
        ("search_company", {"company_name": 3}, "company_name"),
        ("search_company", {"company_name": "x" * 10_000}, "limit of 200"),
        ("search_company", {}, "'company_name' is a required property"),
        ("auth_info_form", {"fields": ["ssn"]}, "'ssn' is not one of"),
        ("auth_info_form", {"fields": "name"}, "fields"),
        ("make_phone_call", {"phone_number": "1", "auth_info": {"acount": "1"}}, "'acount'"),
        ("make_phone_call", {"phone_number": "1"}, "'auth_info' is a required property"),
        ("make_phone_call", [1, 2], "JSON object"),
        ("respond", {"text": "hi"}, "content"),
        ("call_everyone", {}, "unknown tool 'call_everyone'"),
    ]
    for name, kwargs, expected in cases:
        observation = env.step(Action(name, kwargs)).observation
        assert observation.startswith("Error:") and expected in observation, (name, observation)


def test_tool_schemas_are_openai_functions_with_valid_json_schema():
    assert tuple(tools.TOOL_CLASSES) == tools.TOOL_NAMES  # one Tool class per schema
    for schema in tools.TOOL_SCHEMAS:
        assert schema["type"] == "function"
        function = schema["function"]
        assert set(function) == {"name", "description", "parameters"}
        jsonschema.Draft202012Validator.check_schema(function["parameters"])
        assert function["parameters"]["additionalProperties"] is False


def test_tool_rewards_count_a_clarified_field_as_collected(world):
    task = _task(world, 2, "needs_clarification")
    result = toys.run_perfect(Environment(world), task)
    assert result.info["tool_rewards"] == {name: 1.0 for name in tools.TOOL_NAMES}
