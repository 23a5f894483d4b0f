"""Environment (tau-bench style): reset(task_id) -> opening message, step(Action).

An episode ends when the user ends the conversation (the agent's final report,
or the user's patience runs out) or at `max_turns` agent actions. The reward is
0 until then, and the final score after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ctu.world import data, reward, tools
from ctu.world.directory import CompanyDirectory
from ctu.world.phone import PhoneSystem
from ctu.world.users import UserReply, UserSimulator

# Agent actions per episode; the longest perfect episode needs 9.
DEFAULT_MAX_TURNS = 30
EPISODE_OVER = "The conversation is over."


class Action(NamedTuple):
    """A tool call (`name` in TOOL_NAMES) or `respond` with kwargs {"content": str}."""

    name: str
    kwargs: object = {}  # noqa: B006 (never mutated)


class StepResult(NamedTuple):
    observation: str
    reward: float
    done: bool
    info: dict


class Environment:
    """Runs episodes of a world's tasks; one episode at a time per instance."""

    def __init__(
        self,
        world: data.World,
        tasks: Iterable[data.Task] | None = None,
        *,
        max_turns: int = DEFAULT_MAX_TURNS,
        seed: int = 0,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.world = world
        self.tasks = {t.task_id: t for t in (world.tasks.values() if tasks is None else tasks)}
        self.max_turns = max_turns
        self.seed = seed
        self.directory = CompanyDirectory(world.companies)
        self._respond = tools.ArgumentValidator(tools.RESPOND, tools.RESPOND_SCHEMA)
        self._tools = {name: cls() for name, cls in tools.TOOL_CLASSES.items()}
        self.episode: tools.Episode | None = None
        self._final: StepResult | None = None

    def reset(self, task_id: str) -> str:
        """Starts an episode; returns the user's opening message."""
        task = self.tasks.get(task_id)
        if task is None:
            raise KeyError(
                f"unknown task_id {task_id!r}; this environment has {len(self.tasks)} tasks"
            )
        profile = self.world.users[task.user_id]
        self.episode = tools.Episode(
            task=task,
            world=self.world,
            directory=self.directory,
            user=UserSimulator(profile, task, seed=self.seed),
            phone=PhoneSystem(self.world, self.directory, task, profile),
        )
        for tool in self._tools.values():
            tool.create(self.episode)
        self._final = None
        return self.episode.user.opening_message()

    def step(self, action: Action) -> StepResult:
        if self.episode is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self._final is not None:
            return self._final._replace(observation=EPISODE_OVER)
        episode = self.episode
        observation, outcome = self._execute(action)
        episode.steps.append(tools.Step(action.name, action.kwargs, observation, outcome))
        if isinstance(outcome, UserReply) and outcome.done:
            episode.final_message = action.kwargs["content"]
            episode.ended_by = "user"
        elif episode.user.tick():
            observation += "\n" + episode.user.hang_up_message()
            episode.ended_by = "hang_up"
        elif len(episode.steps) >= self.max_turns:
            episode.ended_by = "turn_limit"
        if episode.ended_by is None:
            return StepResult(observation, 0.0, False, {})
        return self._finish(observation)

    def _execute(self, action: Action) -> tuple[str, object]:
        name = action.name
        if name == tools.RESPOND:
            error = self._respond.error(action.kwargs)
            if error is not None:
                return f"Error: {error}", tools.Invalid(error)
            reply = self.episode.user.reply(action.kwargs["content"])
            return reply.text, reply
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(tools.TOOL_NAMES)
            error = f"unknown tool {str(name)[:80]!r}; use one of {known} or respond"
            return f"Error: {error}.", tools.Invalid(error)
        return tool.execute(action.kwargs)

    def _finish(self, observation: str) -> StepResult:
        result = reward.compute_score_with_feedback(self.episode.task, self.world, self.episode)
        info = {
            "score": result.score,
            "partial_scores": result.partial_scores,
            "failure_type": result.failure_type,
            "feedback": result.feedback,
            "prediction": result.prediction,
            "ended_by": self.episode.ended_by,
            "tool_rewards": {n: t.calc_reward() for n, t in self._tools.items()},
        }
        for tool in self._tools.values():
            tool.release()
        self._final = StepResult(observation, result.score, True, info)
        return self._final
