"""The chat format: special tokens and a Qwen2.5/hermes-style jinja chat template with tools.

Rendered form (the same bytes Qwen2.5-Instruct's template produces, without its default
"You are Qwen" system prompt):

    <|im_start|>system
    {system prompt}

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {one JSON schema per line}
    </tools>

    For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call><|im_end|>
    <|im_start|>user
    {user text}<|im_end|>
    <|im_start|>assistant
    {optional text}
    <tool_call>
    {"name": "search_company", "arguments": {"company_name": "Acme"}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    {tool result}
    </tool_response><|im_end|>
    <|im_start|>assistant

Decisions:
- A "tool" message is rendered as a user turn holding a `<tool_response>` block, as in
  Qwen2.5; consecutive tool messages (results of one assistant turn with several calls)
  share one user turn, one block each, in call order.
- Without tools the system turn is the system prompt alone; with neither, no system turn.
- A system message after the first is a system turn of its own where it stands, as in
  Qwen2.5's template. ctu puts the `<previous_attempts>` block there, after the tool
  schemas, so prompts with and without a critique share the whole first system turn.
- `arguments` may be a dict (rendered with `tojson`) or an already-encoded JSON string
  (rendered verbatim), so OpenAI-style messages render as they were sent.
- The policy's part of an assistant turn is everything after the generation prompt
  `<|im_start|>assistant\\n` up to and including `<|im_end|>`; the newline after
  `<|im_end|>` is scaffolding that belongs to the next turn.
"""

# Added tokens that are always single tokens. `special=True` ones are control tokens that
# `decode(..., skip_special_tokens=True)` drops; the tool and think markers are kept
# in decoded text (as Qwen2.5 does) so the tool-call parser can see them.
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
MARKUP_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
SPECIAL_TOKENS = CONTROL_TOKENS + MARKUP_TOKENS

# The token that ends every turn; the policy samples it and it carries loss.
END_OF_TURN = IM_END
GENERATION_PROMPT = IM_START + "assistant\n"

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _jinja_string(text: str) -> str:
    """A Python string as a jinja single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') %}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set ns.system = messages[0].content %}"
    "{%- endif %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if ns.system %}{{- ns.system + '\\n\\n' }}{%- endif %}"
    "{{- " + _jinja_string(TOOLS_PREAMBLE) + " }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- " + _jinja_string(TOOLS_POSTAMBLE) + " }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif ns.system %}"
    "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- if not loop.first %}"
    "{{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- elif message.role == 'user' %}"
    "{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- elif not message.content %}{{- '\\n' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- raise_exception('unknown message role: ' + message.role) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
