"""Behaviour fields shared by scripted and model evaluations, and --num_tasks."""

import pytest

from ctu.world import agents, data, evaluation
from ctu.world.env import Action
from tests import toys


class _GreedyForm:
    """The oracle, except that its form asks for every auth field."""

    def __init__(self, world, seed):
        self.oracle = agents.make_policy("oracle", world, seed)

    def reset(self, task_id, observation, feedback=None):
        self.oracle.reset(task_id, observation, feedback)

    def act(self, observation):
        action = self.oracle.act(observation)
        if action.name == "auth_info_form":
            return Action("auth_info_form", {"fields": list(data.AUTH_FIELDS)})
        return action


def test_over_collection_counts_the_fields_no_department_needs():
    world = toys.shipped_world()
    policy = evaluation.PerEpisode(lambda seed: _GreedyForm(world, seed))
    tasks = evaluation.first_tasks(world.split("val"), 12)
    results = evaluation.run_episodes(policy, world, tasks, trials=1)
    for result, task in zip(results, tasks, strict=True):
        assert result.over_collected == len(data.AUTH_FIELDS) - len(task.required_auth_fields)
    rate = evaluation.behaviour(results)["over_collection_rate"]
    assert rate == pytest.approx(sum(r.over_collected > 0 for r in results) / len(results))
    assert rate > 0
    oracle = evaluation.run_episodes(
        evaluation.scripted_policy("oracle", world), world, tasks, trials=1
    )
    assert evaluation.behaviour(oracle)["over_collection_rate"] == 0.0


def test_num_tasks_takes_the_first_tasks_of_the_split():
    world = toys.shipped_world()
    policy = evaluation.scripted_policy("oracle", world)
    metrics = evaluation.evaluate(policy, world, "val", num_tasks=3, trials=2)
    assert metrics["num_tasks"] == 3 and metrics["episodes"] == 6
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        evaluation.evaluate(policy, world, "val", num_tasks=0)
