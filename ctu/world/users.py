"""UserSimulator: the person the agent is helping.

Behaviour (cooperative / needs_clarification / difficult) changes how the user
fills the auth form and answers questions; the emotional variant changes
wording and patience. Neither ever changes a fact: the values given are the
profile's values, and a missing field is always "I don't have that".
Deterministic given (seed, task_id).
"""

from __future__ import annotations

import random
from typing import NamedTuple

from ctu.world import data

# Agent turns before the user hangs up. The longest perfect episode is 9 turns
# (search, form, clarification, 5 calls, report), so every variant stays solvable.
PATIENCE = {"control": 40, "confusion": 30, "anxiety": 25, "frustration": 20, "anger": 16}
# Difficult users run out of patience sooner; 16 - 4 still leaves room.
DIFFICULT_PATIENCE_CUT = 4
# Fields whose names confuse a needs_clarification user, in the order they ask.
JARGON_FIELDS = ("last_4_ssn", "credit_card_last4", "account_number", "date_of_birth")
FIELD_MEANINGS = {
    "name": "my full name",
    "account_number": "my account number",
    "last_4_ssn": "the last four digits of my Social Security number",
    "date_of_birth": "my date of birth",
    "address": "my home address",
    "phone": "my phone number",
    "credit_card_last4": "the last four digits of my credit card",
}
_OPENING_MOOD = {
    "control": ("", ""),
    "frustration": ("I've been going around in circles on this. ", "This is taking forever. "),
    "anxiety": ("I'm really worried about this. ", "I hope this can be fixed quickly. "),
    "anger": ("I'm furious about this. ", "This is completely unacceptable. "),
    "confusion": ("I'm not sure how any of this works. ", "Sorry, I get confused by this. "),
}
_HANG_UP = {
    "control": "I need to go now. Goodbye.",
    "frustration": "Forget it, this is going nowhere. Goodbye.",
    "anxiety": "I can't deal with this any more, I'm hanging up.",
    "anger": "That's it. I'm hanging up.",
    "confusion": "I'm lost, I'll try again another time. Bye.",
}
_FORM_REMARK = {
    "cooperative": ("Here you go.", "Sure, here are my details."),
    "needs_clarification": ("Okay, here is what I can fill in.", "Let me see..."),
    "difficult": ("Fine. Here.", "Why do you need all this? Whatever, here."),
}
_ANSWER = {
    "cooperative": "Yes, please go ahead.",
    "needs_clarification": "I think so? Yes, please do whatever is needed.",
    "difficult": "Just get it done.",
}
_GOODBYE = {
    "control": "Great, thank you for your help. Goodbye.",
    "frustration": "Finally. Thanks.",
    "anxiety": "Thank you so much, that's a relief.",
    "anger": "About time. Bye.",
    "confusion": "Oh, okay, I think I understand. Thank you!",
}


class FormReply(NamedTuple):
    text: str
    provided: dict  # field -> value, given now
    lacking: tuple[str, ...]  # asked for, but the user does not have them
    withheld: tuple[str, ...]  # the user has them but asks what they mean first


class UserReply(NamedTuple):
    text: str
    provided: dict  # field -> value, given in answer to a clarification
    done: bool  # the user ended the conversation


class UserSimulator:
    """One user in one episode."""

    def __init__(self, profile: data.UserProfile, task: data.Task, *, seed: int = 0):
        self.profile = profile
        self.task = task
        self._rng = random.Random(f"{seed}:{task.task_id}")
        self._mood = self._rng.choice(_OPENING_MOOD[profile.emotion])
        self._remark = self._rng.choice(_FORM_REMARK[profile.behavior])
        self.patience = PATIENCE[profile.emotion] - (
            DIFFICULT_PATIENCE_CUT if profile.behavior == "difficult" else 0
        )
        self._turns = 0
        self._pending: tuple[str, ...] = ()

    def opening_message(self) -> str:
        return self._mood + self.task.user_request

    def tick(self) -> bool:
        """Counts one agent turn; True when the user's patience has run out."""
        self._turns += 1
        return self._turns > self.patience

    def hang_up_message(self) -> str:
        return _HANG_UP[self.profile.emotion]

    def fill_form(self, fields) -> FormReply:
        values = self.profile.values
        withheld = ()
        if self.profile.behavior == "needs_clarification":
            withheld = tuple(f for f in JARGON_FIELDS if f in fields and values[f] is not None)[:1]
            self._pending = withheld
        provided, lacking, lines = {}, [], [self._remark]
        for f in fields:
            value = values[f]
            if value is None:
                lacking.append(f)
                lines.append(f"{f}: I don't have that.")
            elif f in withheld:
                lines.append(f"{f}: What do you mean by '{f}'?")
            else:
                provided[f] = value
                lines.append(f"{f}: {value}")
        return FormReply("\n".join(lines), provided, tuple(lacking), withheld)

    def reply(self, message: str) -> UserReply:
        """Answers a `respond` message: a clarification, a question or the final report."""
        if self._pending:
            provided = {f: self.profile.values[f] for f in self._pending}
            self._pending = ()
            text = "\n".join(
                f"Oh, you mean {FIELD_MEANINGS[f]}.\n{f}: {v}" for f, v in provided.items()
            )
            return UserReply(text, provided, done=False)
        if message.rstrip().endswith("?"):
            return UserReply(_ANSWER[self.profile.behavior], {}, done=False)
        return UserReply(_GOODBYE[self.profile.emotion], {}, done=True)
