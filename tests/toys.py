"""Shared toy fixtures for tests: tiny world, tiny model, tiny tokenizer.

Each area adds its own functions here; never rewrite another area's.
"""


# --- World (ctu/world): the shipped world and a perfect policy ---------------------------

WORLD_DIR = __import__("os").path.join(
    __import__("os").path.dirname(__import__("os").path.dirname(__file__)), "data", "world"
)


@__import__("functools").cache
def shipped_world():
    """The seed-0 world in data/world, loaded once per test process."""
    from ctu.world.data import load_world

    return load_world(WORLD_DIR)


def tiny_world(tmp_path, seed: int = 0) -> str:
    """Writes a freshly generated world under tmp_path; returns its directory."""
    from ctu.world import generate

    out = str(tmp_path / f"world_{seed}")
    generate.write_world(out, seed)
    return out


def perfect_actions(world, task, observation_after_form: str = ""):
    """The minimal perfect action list of a task (the oracle's plan).

    Pass the form's observation: a needs_clarification user withholds a field
    until the agent explains it, which costs one `respond`.
    """
    from ctu.world.data import auth_set_for
    from ctu.world.env import Action

    company = world.companies[task.company_id]
    user = world.users[task.user_id]
    yield Action("search_company", {"company_name": company.name})
    observation = yield Action("auth_info_form", {"fields": list(task.required_auth_fields)})
    if "What do you mean" in (observation or observation_after_form):
        yield Action("respond", {"content": "It is the detail the company uses to verify you."})
    for request in task.requests:
        department = world.departments[request.department_id]
        auth = {f: user.values[f] for f in auth_set_for(department, user)}
        yield Action(
            "make_phone_call", {"phone_number": department.phone_number, "auth_info": auth}
        )
    yield Action("respond", {"content": "All done: every request has been handled."})


def run_perfect(env, task):
    """Runs perfect_actions in env; returns the last StepResult."""
    obs = env.reset(task.task_id)
    plan = perfect_actions(env.world, task)
    action = next(plan)
    while True:
        result = env.step(action)
        if result.done:
            return result
        try:
            action = plan.send(result.observation)
        except StopIteration:
            return result
