"""Scripted policies: the oracle solves every task, the heuristic sits in between."""

import collections
import re

import numpy as np
import pytest

from ctu.world import agents, data, evaluation, phone
from ctu.world.env import Environment
from ctu.world.feedback import task_calls
from tests import toys


def _run(world, name, tasks, trials=1, seed=0):
    policy = evaluation.scripted_policy(name, world)
    return evaluation.run_episodes(policy, world, tasks, trials=trials, seed=seed)


def test_oracle_solves_every_task_of_the_shipped_world():
    world = toys.shipped_world()
    tasks = list(world.tasks.values())
    assert {t.split for t in tasks} == set(data.SPLITS) and len(tasks) == 1100
    results = _run(world, "oracle", tasks)
    failed = [(r.task_id, r.score, r.failure_type) for r in results if r.score != 1.0]
    assert not failed, failed[:10]
    assert {r.ended_by for r in results} == {"user"}  # it always closes with a report
    behaviour = evaluation.summarize(results, trials=1)["behaviour"]
    assert behaviour == {
        "info_gathering_completeness": 1.0,
        "call_order_correctness": 1.0,
        "tool_call_efficiency": 1.0,  # minimal_actions counts exactly the oracle's plan
        "over_collection_rate": 0.0,
        "malformed_call_rate": 0.0,
        "tool_calls_per_episode": pytest.approx(sum(2 + len(t.requests) for t in tasks) / 1100),
    }


def test_oracle_solves_every_task_of_another_seed(tmp_path):
    world = data.load_world(toys.tiny_world(tmp_path, seed=1))
    results = _run(world, "oracle", world.split("test"), seed=5)
    assert all(r.score == 1.0 for r in results)


def test_heuristic_is_strictly_between_random_and_oracle():
    world = toys.shipped_world()
    tasks = world.split("val")
    rates = {}
    for name in agents.POLICIES:
        results = _run(world, name, tasks)
        rates[name] = evaluation.summarize(results, trials=1)
    success = {name: m["success_rate"] for name, m in rates.items()}
    score = {name: m["mean_score"] for name, m in rates.items()}
    assert success["random"] < success["heuristic"] < success["oracle"] == 1.0, success
    assert score["random"] < score["heuristic"] < score["oracle"], score
    assert 0.2 < success["heuristic"] < 0.9, success  # a fair share, not all


def test_heuristic_does_not_peek_at_the_task():
    world = toys.shipped_world()
    task = world.split("val")[3]
    env_actions = []
    for task_id in (task.task_id, "not-a-task"):
        env = Environment(world, [task])
        policy = agents.Heuristic()
        observation = env.reset(task.task_id)
        policy.reset(task_id, observation)
        actions = []
        while True:
            actions.append(policy.act(observation))
            result = env.step(actions[-1])
            observation = result.observation
            if result.done:
                break
        env_actions.append(actions)
    assert env_actions[0] == env_actions[1]


def _episode(world, policy, task):
    env = Environment(world, [task])
    observation = env.reset(task.task_id)
    policy.reset(task.task_id, observation)
    while True:
        result = env.step(policy.act(observation))
        observation = result.observation
        if result.done:
            return env.episode, result


def test_heuristic_learns_routing_from_the_phone():
    """Told "speak with X first", it calls X next and then retries the first department."""
    world = toys.shipped_world()
    recovered = 0
    for task in (t for t in world.split("train") if t.level == 3):
        episode, result = _episode(world, agents.Heuristic(), task)
        calls = [s.outcome for s in episode.steps if s.name == "make_phone_call"]
        if calls and calls[0].status == phone.PREREQUISITE_NOT_MET:
            prerequisite, dependent = (r.department_id for r in task.requests)
            assert calls[0].department_id == dependent
            assert calls[1].department_id == prerequisite
            if episode.phone.all_served:
                assert [c.department_id for c in calls][-1] == dependent
                recovered += 1
    assert recovered >= 10


def test_random_policy_is_seeded():
    world = toys.shipped_world()
    tasks = world.split("val")[:20]
    first = _run(world, "random", tasks, seed=3)
    again = _run(world, "random", tasks, seed=3)
    other = _run(world, "random", tasks, seed=4)
    assert first == again
    assert [r.num_actions for r in first] != [r.num_actions for r in other]
    assert sum(r.malformed_calls for r in first) > 0  # it exercises the error path too


def test_parse_auth_values_reads_form_and_clarification_replies():
    form = "Let me see...\nname: Ava Chen\naddress: 1 Oak St, Lakeside\nphone: I don't have that.\n"
    form += "last_4_ssn: What do you mean by 'last_4_ssn'?"
    assert agents.parse_auth_values(form) == {"name": "Ava Chen", "address": "1 Oak St, Lakeside"}
    assert agents.withheld_fields(form) == ["last_4_ssn"]
    answer = "Oh, you mean the last four digits of my Social Security number.\nlast_4_ssn: 0042"
    assert agents.parse_auth_values(answer) == {"last_4_ssn": "0042"}


def test_unknown_policy_name_is_a_clear_error():
    with pytest.raises(ValueError, match="oracle, heuristic, random"):
        agents.make_policy("genius", toys.shipped_world())


def test_feedback_hints_read_the_world_critiques():
    """Parsed from real rule-based critiques, the field hints are the task's exact fields."""
    world = toys.shipped_world()
    first = _run(world, "heuristic", world.split("val") + world.split("test"))
    checked = calls = 0
    for result in first:
        hints = agents.FeedbackHints.parse(result.feedback)
        if hints.needed_fields:
            assert hints.needed_fields == world.tasks[result.task_id].required_auth_fields
            checked += 1
        company = world.companies[world.tasks[result.task_id].company_id]
        phones = {d.phone_number for d in company.departments}
        for phone_number, _ in hints.drop_fields + hints.add_fields + hints.prerequisites:
            assert phone_number in phones
        if hints.calls:
            task = world.tasks[result.task_id]
            shown = [(c["phone_number"], tuple(c["auth_info"])) for c in task_calls(world, task)]
            assert list(hints.calls) == shown
            calls += 1
    assert checked >= 20 and calls >= 20


def test_feedback_hints_skip_a_calls_list_cut_short():
    """A critique cut at the block's token budget ends mid-list: no calls, not an error;
    a whole list after it is still read."""
    whole = 'The calls: [{"phone_number": "+1-800-555-0100", "auth_info": ["name"]}].'
    assert agents.FeedbackHints.parse(whole[:-12] + " ...").calls == ()
    assert agents.FeedbackHints.parse(whole[:-12] + " " + whole).calls == (
        ("+1-800-555-0100", ("name",)),
    )


def test_heuristic_makes_the_calls_the_critique_shows():
    """Reading a critique that shows the task's calls, the heuristic dials those numbers
    in that order with those fields (and the user's values). Critiques
    of the heuristic's and the random policy's failures on the validation tasks."""
    world = toys.shipped_world()
    tasks = world.split("val")
    followed = 0
    for critic in ("heuristic", "random"):
        for r in _run(world, critic, tasks):
            hints = agents.FeedbackHints.parse(r.feedback)
            if not hints.calls:
                continue
            task = world.tasks[r.task_id]
            actions, _ = _play_thinking(world, task, agents.Heuristic(), r.feedback)
            made = [
                (a.kwargs["phone_number"], tuple(a.kwargs["auth_info"]))
                for a in actions
                if a.name == "make_phone_call"
            ]
            assert made == list(hints.calls), (r.feedback, made)
            followed += 1
    assert followed >= 100


def test_feedback_helps_the_heuristic_and_not_the_others():
    world = toys.shipped_world()
    metrics = {
        name: evaluation.evaluate(
            evaluation.scripted_policy(name, world), world, "val", mode="feedback"
        )
        for name in agents.POLICIES
    }
    heuristic = metrics["heuristic"]
    failures = heuristic["episodes"] * (1 - heuristic["success_rate"])
    assert heuristic["with_feedback"]["retried"] == round(failures)
    assert heuristic["with_feedback"]["success_rate"] > heuristic["success_rate"]
    # critiques show the calls that solve the task (ctu/world/feedback.py), and it makes them
    assert heuristic["with_feedback"]["success_rate"] == 1.0
    assert metrics["oracle"]["with_feedback"]["retried"] == 0
    assert metrics["random"]["with_feedback"]["success_rate"] == metrics["random"]["success_rate"]


def _play_thinking(world, task, heuristic, feedback=None):
    """One episode of `heuristic` on `task`: its actions and the thought before each."""
    policy = agents.Recorder(heuristic)
    env = Environment(world, [task])
    observation = env.reset(task.task_id)
    policy.reset(task.task_id, observation, feedback=feedback)
    thoughts = []
    while True:
        action = policy.act(observation)
        thoughts.append(policy.thought)
        result = env.step(action)
        observation = result.observation
        if result.done:
            return policy.actions, thoughts


def test_heuristic_thoughts_state_the_decisions_its_actions_follow():
    """Before the first form the thought routes each request to the department whose
    directory line offers it, and the form is those departments' prior fields (with
    substitutes for the ones the user lacks); before a call it names the department
    whose number is dialled. Checked against the world on every train task."""
    world = toys.shipped_world()
    route = re.compile(r"([a-z][a-z ]*?)(?:,| and|\.) \(([A-Z][a-z]+(?: [A-Z][a-z]+)*)\)")
    forms = calls = 0
    for task in world.split("train"):
        company = world.companies[task.company_id]
        by_name = {d.name: d for d in company.departments}
        actions, thoughts = _play_thinking(world, task, agents.Heuristic())
        names = [a.name for a in actions]
        if "auth_info_form" in names:
            at = names.index("auth_info_form")
            requests = re.match(r"Requests: (.+?\.(?: \([A-Za-z ]+\))?)(?: |$)", thoughts[at])
            requests = requests.group(1)
            # the user's own list, word for word, once the departments are taken out
            assert re.sub(r" \([A-Za-z ]+\)", "", requests)[:-1] in task.user_request
            routes = [(r.removeprefix("and "), name) for r, name in route.findall(requests)]
            assert routes, thoughts[at]
            for request, name in routes:
                assert request in task.user_request
                assert request.replace(" my ", " your ") in by_name[name].description
            lacks = re.search(r"Lacks ([a-z_, 0-9]+)\.", thoughts[at])
            lacking = set(lacks.group(1).split(", ")) if lacks else set()
            fields = set(actions[at].kwargs["fields"])
            assert not fields & lacking
            if not lacking:
                kinds = {by_name[name].type for _, name in routes}
                assert fields == {f for k in kinds for f in agents.AUTH_PRIOR[k]}
            forms += 1
        for action, thought in zip(actions, thoughts, strict=True):
            if action.name == "make_phone_call":
                name, number = re.fullmatch(r"Call (.+): (\+[-\d]+)\.", thought).groups()
                assert by_name[name].phone_number == number == action.kwargs["phone_number"]
                calls += 1
            elif action.name != "auth_info_form":
                assert thought == ""
    assert forms > 400 and calls > forms


def test_heuristic_cites_what_the_critique_says_about_its_first_form():
    """With cite_feedback, a retry's first-form thought opens with "Feedback: The right
    department is ..." in the critique's words when it names one, and ends with
    "Feedback: all needed fields (...)." when it lists the task's fields, and asks for
    exactly those; its actions are the plain heuristic's, and without critique it cites
    nothing. Critiques of the heuristic's and the random policy's failures."""
    world = toys.shipped_world()
    tasks = world.split("val")
    cited = collections.Counter()
    for critic in ("heuristic", "random"):
        critiques = {r.task_id: r.feedback for r in _run(world, critic, tasks) if r.score < 1}
        for task in tasks:
            critique = critiques.get(task.task_id, "")
            runs = {}
            for cite in (False, True):
                heuristic = agents.Heuristic(cite_feedback=cite)
                runs[cite] = _play_thinking(world, task, heuristic, critique or None)
            (plain, plain_thoughts), (citing, citing_thoughts) = runs[False], runs[True]
            assert citing == plain
            listed = re.search(  # the three templates that list the task's fields
                r"(?:ask only for |every needed field \(|all needed fields \()([a-z_0-9, ]+)",
                critique,
            )
            right = re.search(r"The right department is ([^(]+) \(", critique)
            for action, thought, before in zip(
                citing, citing_thoughts, plain_thoughts, strict=True
            ):
                if thought == before:
                    continue
                assert action.name == "auth_info_form"
                department = re.match(r"Feedback: The right department is ([^.]+)\. ?", thought)
                if department is not None:
                    assert right is not None and department.group(1) == right.group(1)
                    # the cited department is one the plan then routes a request to
                    routed = re.findall(r"\((\w[\w ]*)\)", thought[department.end() :])
                    assert any(department.group(1).endswith(" " + r) for r in routed)
                    thought = thought[department.end() :]
                    cited["department"] += 1
                fields = re.search(r" ?Feedback: all needed fields \(([a-z_0-9, ]+)\)\.$", thought)
                if fields is not None:
                    assert listed is not None
                    assert fields.group(1) == listed.group(1) == ", ".join(action.kwargs["fields"])
                    thought = thought[: fields.start()]
                    cited["fields"] += 1
                assert thought == before
    assert cited["fields"] >= 10 and cited["department"] >= 3, cited


def test_heuristic_call_thoughts_name_the_fields_the_call_passes():
    """With call_fields, a call's thought is the plain one followed by the auth fields the
    call passes, in its order; every other thought and every action is unchanged. Cold
    and reading critiques of the random policy's failures, on the validation tasks."""
    world = toys.shipped_world()
    tasks = world.split("val")
    critiques = {r.task_id: r.feedback for r in _run(world, "random", tasks) if r.score < 1}
    calls = 0
    for task in tasks:
        for critique in (None, critiques.get(task.task_id)):
            plain, plain_thoughts = _play_thinking(world, task, agents.Heuristic(), critique)
            actions, thoughts = _play_thinking(
                world, task, agents.Heuristic(call_fields=True), critique
            )
            assert actions == plain
            for action, thought, before in zip(actions, thoughts, plain_thoughts, strict=True):
                if action.name != "make_phone_call":
                    assert thought == before
                    continue
                fields = ", ".join(action.kwargs["auth_info"])
                assert thought == f"{before} Fields: {fields}."
                calls += 1
    assert calls > 2 * len(tasks)


def test_tool_call_efficiency_is_measured_where_the_job_got_done():
    """Over the episodes that served every request, penalised or not: a success has no
    needless action by the reward's definition, so successes alone would always give
    1. The heuristic completes tasks with extra calls; its efficiency shows them."""
    world = toys.shipped_world()
    results = _run(world, "heuristic", world.split("val"))
    completed = [r for r in results if r.completed]
    assert any(not r.success for r in completed)
    want = np.mean([min(1.0, r.minimal_actions / r.num_actions) for r in completed])
    efficiency = evaluation.summarize(results, trials=1)["behaviour"]["tool_call_efficiency"]
    assert efficiency == pytest.approx(want) and efficiency < 1.0
    assert all(r.minimal_actions == r.num_actions for r in results if r.success)
