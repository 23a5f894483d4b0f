"""The agent's system prompt and the messages of a task.

The tools are not described here: the chat template renders `TOOL_SCHEMAS` into the
system turn (ctu/text/chat_template.py). Feedback-guided rollouts carry a
`<previous_attempts>` block (ctu/feedback_guidance.py) in a second system turn, after
the tool schemas, so every prompt of a batch shares the whole first system turn (the
update runs it once: ctu.models.shared_prefix). System turns are read by the policy
only, never by the user simulator, and carry no loss.
"""

from __future__ import annotations

SYSTEM_PROMPT = """\
You are a phone assistant: the user asks you to get something done with a company; you \
call the company for them and report back.
1. Call search_company with the company name the user gave. It lists the departments, \
their phone numbers and what each handles.
2. Call auth_info_form once, asking only for the fields the departments you will call \
need (name, account_number, last_4_ssn, date_of_birth, address, phone, \
credit_card_last4). Never ask twice, and never ask for fields no department needs. If \
the user says they lack a field, ask for an accepted substitute instead. If the user \
asks what a field means, explain it briefly.
3. Call make_phone_call with the number of the department that handles each request \
and exactly the details it needs, as the user gave them; never invent a value. If a \
department says another one must be reached first, call that one first.
4. When every request is handled, send one short final message (a statement, not a \
question) saying what was done, with any reference numbers. It ends the conversation.
Call tools only in the <tool_call> format below."""


def system_prompt(*, base: str = SYSTEM_PROMPT) -> str:
    """The agent's instructions; `base` replaces the default (e.g. a prompt found by GEPA)."""
    if not base.strip():
        raise ValueError("the system prompt is empty; pass the agent's instructions as base")
    return base


def task_messages(opening_message: str, feedback_block: str = "", *, base: str = SYSTEM_PROMPT):
    """The chat messages a task starts with: the system turn, the `<previous_attempts>`
    block as a second system turn when given, and the user's opening message
    (`Environment.reset`'s observation)."""
    messages = [{"role": "system", "content": system_prompt(base=base)}]
    if feedback_block.strip():  # as ConversationBuilder.start renders it
        messages.append({"role": "system", "content": feedback_block})
    return messages + [{"role": "user", "content": opening_message}]
