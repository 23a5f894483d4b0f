"""Does a policy copy what it reads? A teacher-forced probe of tool-call arguments.

Most of this agent's output is copied from its context: the company name from the
user's request, a phone number from the search result, auth values from the form's
answer. `copy_accuracy` replays the heuristic agent on tasks of a split, feeds each
conversation to the model (teacher forcing), and counts the argument values the
model's greedy next-token choice reproduces exactly, token for token, given the true
conversation so far. It needs one forward pass per episode, no sampling, so a warm
start can report it in seconds; a policy that writes perfect JSON but copies nothing
(a plateau of tiny from-scratch models) scores 0 here however low its SFT loss.

`teacher_forced_probe` reports the same pass by whole actions as well: how often the
model would take each of the heuristic's decisions (the first form's auth fields, the
first call's department and values, ...) exactly, which locates what an imitation
lacks when its episodes fail.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctu import prompts
from ctu.demonstrations import record_episode
from ctu.text.conversation import agent_spans
from ctu.world import agents, data
from ctu.world.env import Action, Environment

# Argument kinds reported, by where the value comes from.
COMPANY = "company_name"  # the user's request
PHONE = "phone_number"  # the search result
AUTH = "auth_values"  # the form's answer
_LENGTH_BUCKET = 512
# The heuristic's decisions `teacher_forced_probe` scores (`action/KIND`), in episode order.
ACTION_KINDS = (
    "search_company",
    "first_form",
    "first_call",
    "later_form",
    "later_call",
    "respond",
    "episode",
)


def _copied_values(action: Action) -> list[tuple[str, str]]:
    kwargs = dict(action.kwargs)
    if action.name == "search_company":
        return [(COMPANY, str(kwargs.get("company_name", "")))]
    if action.name == "make_phone_call":
        # A leading "+" merges with the JSON's opening quote into one token.
        values = [(PHONE, str(kwargs.get("phone_number", "")).lstrip("+"))]
        auth = kwargs.get("auth_info") or {}
        return values + [(AUTH, str(v)) for v in auth.values()]
    return []


def _find_in_agent_turns(
    tokens: Sequence[int], mask: Sequence[int], part: Sequence[int], start: int
) -> int:
    """The first position >= start where `part` occurs inside the agent's tokens."""
    for i in range(max(start, 1), len(tokens) - len(part) + 1):
        if list(tokens[i : i + len(part)]) == list(part) and all(mask[i : i + len(part)]):
            return i
    return -1


def _action_kinds(actions: Sequence[Action]) -> list[str]:
    """The decision each action stands for: the first form is the auth guess, the first
    call the routing, the later ones recover from what the phone said."""
    stems = {"auth_info_form": "form", "make_phone_call": "call"}
    kinds, seen = [], collections.Counter()
    for action in actions:
        seen[action.name] += 1
        if action.name not in stems:
            kinds.append(action.name)
        else:
            kinds.append(f"{'first' if seen[action.name] == 1 else 'later'}_{stems[action.name]}")
    return kinds


def teacher_forced_probe(
    model,
    tokenizer,
    world: data.World,
    split: str = "val",
    num_tasks: int = 20,
    seed: int = 0,
    thoughts: bool = False,
    call_fields: bool = False,
) -> dict[str, float]:
    """Teacher forcing on the heuristic's episodes of `split`: what the model's greedy
    next-token choice reproduces, given the true conversation so far.

    Copies (`copy/KIND`, see `copy_accuracy`) and whole actions: `action/KIND` is the
    fraction of the heuristic's actions of a kind whose every token is the model's
    choice, for `search_company`, `first_form` (the auth fields guessed from the
    request), `later_form`, `first_call` (routing and values), `later_call` and
    `respond`; `action/episode` the fraction of episodes right throughout. A kind with
    no example in the episodes is left out. With `thoughts` the episodes are
    demonstrations that reason first (`warm_start.thoughts`), and an action is right
    only when its thought is too; `call_fields` as `warm_start.call_fields_thoughts`.
    """
    tasks = world.split(split)[:num_tasks]
    if not tasks:
        raise ValueError(f"split {split!r} has no tasks to probe.")
    env = Environment(world, tasks, seed=seed)
    # A module's weights go in as an argument: closed over, they would be baked into
    # every compilation as constants (2.4 GB for a 0.6B model, minutes to compile).
    graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else (None, None)

    @jax.jit
    def greedy(state, tokens):
        forward = model if state is None else nnx.merge(graphdef, state)
        return jnp.argmax(forward(tokens)[0], axis=-1)

    hits: collections.Counter = collections.Counter()
    totals: collections.Counter = collections.Counter()
    for task in tasks:
        policy = agents.Recorder(agents.Heuristic(seed=seed, call_fields=call_fields))
        builder, _ = record_episode(
            env, policy, task.task_id, tokenizer, system=prompts.system_prompt(), thoughts=thoughts
        )
        tokens, mask = builder.tokens(), builder.loss_mask()
        # Right padding to a bucket keeps compiles few and, causal, changes nothing before.
        padded = tokens + [0] * (-len(tokens) % _LENGTH_BUCKET)
        predicted = np.asarray(greedy(state, jnp.asarray([padded], jnp.int32)))
        # predicted[t] is the model's choice for token t + 1.
        right = np.append(predicted[: len(tokens) - 1] == np.asarray(tokens[1:]), True)
        turns = agent_spans(mask)  # one per action; zip(strict=True) checks it
        for (start, end), kind in zip(turns, _action_kinds(policy.actions), strict=True):
            totals[f"action/{kind}"] += 1
            hits[f"action/{kind}"] += bool(right[start - 1 : end - 1].all())
        totals["action/episode"] += 1
        hits["action/episode"] += all(right[s - 1 : e - 1].all() for s, e in turns)
        cursor = 0
        for action in policy.actions:
            for kind, value in _copied_values(action):
                ids = tokenizer.encode(value, add_special_tokens=False)
                at = _find_in_agent_turns(tokens, mask, ids, cursor) if ids else -1
                if at < 0:
                    continue  # tokenized differently inside the call (or empty): not counted
                value_right = right[at - 1 : at - 1 + len(ids)]
                totals[f"copy/{kind}"] += 1
                hits[f"copy/{kind}"] += bool(value_right.all())
                totals[f"copy/{kind}/first_token"] += 1
                hits[f"copy/{kind}/first_token"] += bool(value_right[0])
                if len(ids) > 1:
                    totals[f"copy/{kind}/later_tokens"] += len(ids) - 1
                    hits[f"copy/{kind}/later_tokens"] += int(value_right[1:].sum())
                cursor = at + len(ids)
    return {key: hits[key] / totals[key] for key in totals}


def copy_accuracy(
    model, tokenizer, world: data.World, split: str = "val", num_tasks: int = 20, seed: int = 0
) -> dict[str, float]:
    """Fraction of copied argument values (company name, phone number, auth values)
    that the model reproduces exactly under teacher forcing on heuristic episodes.

    Returns `{"copy/company_name": f, "copy/phone_number": f, "copy/auth_values": f}`
    and, per kind, the fraction of first tokens right (`copy/KIND/first_token`) and of
    the tokens after the first (`copy/KIND/later_tokens`, the part the value's own
    first token locates, by induction); a kind with no value in the episodes is left out.
    """
    scores = teacher_forced_probe(model, tokenizer, world, split, num_tasks, seed)
    return {key: value for key, value in scores.items() if key.startswith("copy/")}
