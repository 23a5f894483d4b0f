"""Parse tool calls out of untrusted model output; never raises.

`parse_tool_calls(text, tools)` cleans the text (cuts it at the first end-of-turn token,
drops other special tokens and `<think>` blocks), then tries, in order, the formats
models emit and keeps the first that yields calls:

  hermes       `<tool_call>{...}</tool_call>` blocks, one or several; a missing closing
               tag on the last block is tolerated (Qwen, Hermes, many fine-tunes)
  function_tag `<function=name>{...}</function>` (Llama 3.1 custom tool format)
  code_fence   JSON in ``` / ```json fences (GPT-style and chatty models)
  json         a JSON object or list in the prose: `{"name", "arguments"|"parameters"}`,
               OpenAI `{"tool_calls": [{"function": {"name", "arguments"}}]}` (arguments
               an object or a JSON string), `{"function": {...}}`, or a list of these
               (Mistral `[TOOL_CALLS] [...]`, Llama `<|python_tag|>{...}`)
  pythonic     `[search_company(company_name="Acme")]` for known tool names (Llama 3.2);
               read with `ast.literal_eval` on each keyword value, never eval
  none         no call: the text is a message to the user

A method name gets "+repair" when JSON needed `json_repair.repair`. Calls are then
validated against the tools' JSON schemas. Contract: `calls` holds the valid calls;
`error` is None only when every call found was valid (and no markup was left that
looked like a failed attempt at one), otherwise it says what was wrong, naming the
known tools or the bad field. `content` is the text outside the calls.
"""

import ast
import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from absl import logging

from ctu.text import chat_template, json_repair

# Safety limits on untrusted input (they bound parsing work, not a length budget).
MAX_INPUT_CHARS = 65536
MAX_JSON_CANDIDATES = 64
MAX_CALLS = 16
MAX_ERROR_CHARS = 300

_END_OF_TURN = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|eom_id\|>|<\|end\|>|</s>")
_ROLE_HEADER = re.compile(
    r"<\|im_start\|>[a-z]*\n?|<\|start_header_id\|>[a-z]*<\|end_header_id\|>\n*"
)
_OTHER_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<s>|\[/?INST\]|\[TOOL_CALLS\]")
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|(?=<tool_call>)|\Z)", re.DOTALL)
_FUNCTION_TAG = re.compile(r"<function=([A-Za-z0-9_.\-]{1,64})>(.*?)(?:</function>|\Z)", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*([A-Za-z_]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_ARGUMENT_KEYS = ("arguments", "parameters", "args")
_NAME_KEY = re.compile(r"[\"']name[\"']\s*:")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclasses.dataclass(frozen=True)
class ParseResult:
    calls: list[ToolCall]
    content: str
    method: str
    error: str | None


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------- cleaning


def _drop_think(text: str) -> str:
    """Removes `<think>...</think>` blocks in one linear pass (no regex backtracking)."""
    kept: list[str] = []
    pos = 0
    while True:
        start = text.find("<think>", pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        end = text.find("</think>", start)
        if end < 0:  # never closed: reasoning runs to the first call, else to the end
            call = text.find("<tool_call>", start)
            kept.append(text[call:] if call >= 0 else "")
            break
        pos = end + len("</think>")
    text = "".join(kept)
    if "</think>" in text:  # the template opened <think> in the prompt
        text = text[text.rindex("</think>") + len("</think>") :]
    return text


def clean_text(text: str) -> str:
    """Text of one assistant turn without end-of-turn tokens, headers or reasoning."""
    start = 0
    for match in _END_OF_TURN.finditer(text):
        if text[start : match.start()].strip():
            text = text[start : match.start()]
            break
        start = match.end()  # a stray end-of-turn token before anything else
    else:
        text = text[start:]
    text = _ROLE_HEADER.sub("", text)
    text = _OTHER_SPECIAL.sub("", text)
    return _drop_think(text).strip()


# ----------------------------------------------------------------------- normalisation


def _call_dicts(value: Any, known: set[str]) -> list[dict] | None:
    """The call objects in a parsed JSON value, or None if it does not look like calls."""
    if isinstance(value, list):  # a flat list of call objects, never nested lists
        if not value or not all(isinstance(item, dict) for item in value):
            return None
        calls: list[dict] = []
        for item in value:
            item_calls = _call_dicts(item, known)
            if item_calls is None:
                return None
            calls.extend(item_calls)
        return calls
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("tool_calls"), list):
        return _call_dicts(value["tool_calls"], known | {"*"})
    for key in ("function", "function_call"):
        if isinstance(value.get(key), dict):
            return [value[key]]
    name = value.get("name")
    if isinstance(name, str) and (
        any(k in value for k in _ARGUMENT_KEYS) or name in known or "*" in known
    ):
        return [value]
    return None


def _to_tool_call(raw: dict) -> tuple[ToolCall | None, str | None, bool]:
    """(call, error, repaired) for one raw call object."""
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        return None, "tool call without a name", False
    arguments: Any = None
    for key in _ARGUMENT_KEYS:
        if key in raw:
            arguments = raw[key]
            break
    repaired = False
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        if not arguments.strip():
            arguments = {}
        else:
            try:
                arguments, repaired = json_repair.loads_tolerant(arguments)
            except (ValueError, RecursionError):
                return None, f"arguments of {name!r} are not valid JSON: {_short(arguments)}", False
    if not isinstance(arguments, dict):
        return (
            None,
            f"arguments of {name!r} must be a JSON object, got {_short(repr(arguments))}",
            False,
        )
    return ToolCall(name=name, arguments=arguments), None, repaired


# -------------------------------------------------------------------------- extraction


@dataclasses.dataclass
class _Found:
    """Call objects found by one method, the spans they came from, and any errors."""

    raw_calls: list[dict] = dataclasses.field(default_factory=list)
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    repaired: bool = False


def _load_calls(body: str, known: set[str], found: _Found) -> bool:
    """Adds the calls in a JSON text to `found`; False if it holds no call JSON.

    The whole body is tried first; failing that, JSON values embedded in it (a block
    with prose around the JSON).
    """
    body = body.strip()
    fence = _FENCE.fullmatch(body)
    if fence is not None:
        body = fence.group(2).strip()
    try:
        value, repaired = json_repair.loads_tolerant(body)
        calls = _call_dicts(value, known)
        error = None if calls is not None else f"JSON is not a tool call: {_short(body)}"
    except (ValueError, RecursionError) as e:
        calls, repaired, error = None, False, f"invalid JSON ({e}): {_short(body)}"
    if calls is None:
        embedded = _bare_json(body, known)
        if not embedded.raw_calls:
            found.errors.append(error)
            return False
        calls, repaired = embedded.raw_calls, embedded.repaired
    found.raw_calls.extend(calls)
    found.repaired |= repaired
    return True


def _hermes(text: str, known: set[str]) -> _Found:
    found = _Found()
    for match in _HERMES.finditer(text):
        found.spans.append(match.span())
        _load_calls(match.group(1), known, found)
    return found


def _function_tag(text: str, known: set[str]) -> _Found:
    found = _Found()
    for match in _FUNCTION_TAG.finditer(text):
        found.spans.append(match.span())
        args = match.group(2).strip() or "{}"
        try:
            value, repaired = json_repair.loads_tolerant(args)
        except (ValueError, RecursionError) as e:
            found.errors.append(f"invalid JSON arguments ({e}): {_short(args)}")
            continue
        found.raw_calls.append({"name": match.group(1), "arguments": value})
        found.repaired |= repaired
    return found


def _code_fence(text: str, known: set[str]) -> _Found:
    found = _Found()
    for match in _FENCE.finditer(text):
        body = match.group(2).strip()
        if body[:1] not in ("{", "["):
            continue
        attempt = _Found()
        if _load_calls(body, known, attempt):
            found.raw_calls.extend(attempt.raw_calls)
            found.spans.append(match.span())
            found.repaired |= attempt.repaired
        elif known & set(re.findall(r"[A-Za-z_]+", body)) or '"name"' in body:
            found.errors.extend(attempt.errors)  # an attempt at a call that failed
    return found


def _bare_json(text: str, known: set[str]) -> _Found:
    """JSON values in prose, tried at each `{` / `[` (bounded work on hostile input)."""
    found = _Found()
    decoder = json.JSONDecoder(parse_constant=json_repair.reject_constant)
    pos, tried, budget = 0, 0, 4 * MAX_INPUT_CHARS  # budget: chars the Python scans may read
    while tried < MAX_JSON_CANDIDATES:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            break
        start = min(starts)
        tried += 1
        try:
            value, end = decoder.raw_decode(text, start)
            repaired = False
        except (ValueError, RecursionError):
            if budget <= 0:
                break
            end = json_repair.matching_end(text, start)
            candidate = text[start:end]
            budget -= 2 * len(candidate)
            if not _NAME_KEY.search(candidate):
                pos = start + 1
                continue
            try:
                value, repaired = json_repair.loads_tolerant(candidate)
            except (ValueError, RecursionError) as e:
                found.errors.append(f"invalid JSON ({e}): {_short(candidate)}")
                pos = start + 1
                continue
        calls = _call_dicts(value, known)
        if calls is None:
            pos = start + 1  # e.g. a list whose first element is a call object
            continue
        found.raw_calls.extend(calls)
        found.spans.append((start, end))
        found.repaired |= repaired
        pos = end
    return found


def _pythonic(text: str, known: set[str]) -> _Found:
    found = _Found()
    if not known:
        return found
    names = "|".join(re.escape(n) for n in sorted(known))
    for match in re.finditer(rf"\b({names})\(([^()]*)\)", text):
        try:
            node = ast.parse(f"f({match.group(2)})", mode="eval").body
            if not isinstance(node, ast.Call):
                raise ValueError("not a call")
            if len(node.args) == 1 and not node.keywords:  # name({"key": value})
                arguments = ast.literal_eval(node.args[0])
            elif node.args:
                raise ValueError("only keyword arguments are supported")
            else:
                arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                if None in arguments:
                    raise ValueError("**kwargs are not supported")
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as e:
            found.errors.append(f"cannot read call {_short(match.group(0))}: {e}")
            continue
        found.raw_calls.append({"name": match.group(1), "arguments": arguments})
        found.spans.append(match.span())
    return found


_METHODS = (
    ("hermes", _hermes),
    ("function_tag", _function_tag),
    ("code_fence", _code_fence),
    ("json", _bare_json),
    ("pythonic", _pythonic),
)


# -------------------------------------------------------------------------- validation


def _function_schemas(tools: Sequence[dict] | None) -> dict[str, dict]:
    """name -> parameters schema, from OpenAI `{"type": "function", "function": {...}}`
    schemas or bare `{name, parameters}` ones."""
    schemas: dict[str, dict] = {}
    for tool in tools or ():
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            schemas[function["name"]] = function.get("parameters") or {"type": "object"}
    return schemas


# Text the chat template would read as structure if a tool echoed it back: a special
# token spelled out (JSON escapes such as "\\u003c|im_end|\\u003e" get past the cleaning
# of the raw text), or markup the template wraps turns and calls in.
_STRUCTURE = re.compile(
    "|".join(
        [_END_OF_TURN.pattern, _OTHER_SPECIAL.pattern]
        + [re.escape(t) for t in chat_template.MARKUP_TOKENS]
    )
)


def _unsafe_text_error(call: ToolCall) -> str | None:
    """An error when a string in the call (its name, any key or value at any depth) could
    change the conversation's structure once a tool echoes it into an observation or a
    critique, or cannot be encoded (a lone UTF-16 surrogate from a JSON escape). The
    text itself is not quoted back."""
    stack: list = [call.name, call.arguments]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a tool call may not hold invalid unicode (a lone surrogate)"
            if _STRUCTURE.search(item):
                return "a tool call may not spell out special tokens or chat markup"
    return None


def _validation_error(call: ToolCall, schemas: dict[str, dict]) -> str | None:
    import jsonschema

    if not schemas:
        return None
    if call.name not in schemas:
        return f"unknown tool {_short(call.name, 80)!r}; known tools: {', '.join(sorted(schemas))}"
    validator_cls = jsonschema.validators.validator_for(schemas[call.name])
    error = jsonschema.exceptions.best_match(
        validator_cls(schemas[call.name]).iter_errors(call.arguments)
    )
    if error is None:
        return None
    field = ".".join(str(p) for p in error.absolute_path)
    if not field and error.validator == "required":
        field = error.message.split("'")[1] if "'" in error.message else ""
    where = f" field {field!r}:" if field else ""
    return f"invalid arguments for {call.name}:{where} {_short(error.message, 200)}"


def _attempt_errors(text: str, known: set[str]) -> list[str]:
    """Errors for text that tried to call a tool in no format we read: a tool name right
    before a JSON object (`search_company: {...}`), not a name mentioned in prose."""
    if "<tool_call>" in text:
        return ["found <tool_call> but no call JSON in it"]
    for name in sorted(known):
        if re.search(rf"\b{re.escape(name)}\s*[:(]?\s*\{{", text):
            return [f"text names tool {name!r} before a JSON object but holds no parsable call"]
    return []


# ------------------------------------------------------------------------------- parse


def parse_tool_calls(
    text: Any, tools: Sequence[dict] | None, *, debug: bool = False
) -> ParseResult:
    """The tool calls in one assistant turn; never raises (see the module docstring)."""
    try:
        result = _parse(text, tools, debug)
    except Exception as e:  # untrusted input must never crash a rollout
        result = ParseResult([], "", "none", f"parser error {type(e).__name__}: {_short(str(e))}")
    if debug:
        logging.info(
            "parse_tool_calls: method=%s calls=%s error=%s",
            result.method,
            [c.name for c in result.calls],
            result.error,
        )
    return result


def _parse(text: Any, tools: Sequence[dict] | None, debug: bool) -> ParseResult:
    if not isinstance(text, str):
        return ParseResult([], "", "none", f"expected text, got {type(text).__name__}")
    if len(text) > MAX_INPUT_CHARS:
        return ParseResult(
            [], "", "none", f"output too long to parse ({len(text)} > {MAX_INPUT_CHARS} chars)"
        )
    schemas = _function_schemas(tools)
    known = set(schemas)
    text = clean_text(text)

    method, found = "none", _Found()
    for name, extract in _METHODS:
        attempt = extract(text, known)
        if attempt.raw_calls:
            method, found = name, attempt
            break
        if attempt.errors and not found.errors:
            method, found = name, attempt  # remember the first failed attempt
        if debug:
            why = attempt.errors[0] if attempt.errors else "no match"
            logging.info("parse_tool_calls: %s found no call, falling back (%s)", name, why)

    content = text
    for start, end in sorted(found.spans, reverse=True):
        content = content[:start] + content[end:]
    content = re.sub(r"</?tool_call>", "", content).strip()
    if method == "pythonic" and re.fullmatch(r"[\[\],\s]*", content):
        content = ""  # the brackets and commas of a pythonic call list
    content = re.sub(r"\n{3,}", "\n\n", content)

    calls: list[ToolCall] = []
    errors = list(found.errors)
    if len(found.raw_calls) > MAX_CALLS:
        errors.append(f"too many tool calls ({len(found.raw_calls)} > {MAX_CALLS})")
    for raw in found.raw_calls[:MAX_CALLS]:
        call, error, repaired = _to_tool_call(raw)
        found.repaired |= repaired
        error = error or _unsafe_text_error(call) or _validation_error(call, schemas)
        if error is None:
            calls.append(call)
        else:
            errors.append(error)
    if not found.raw_calls and not errors:
        errors.extend(_attempt_errors(text, known))
    if found.repaired and method != "none":
        method += "+repair"
    error = "; ".join(errors[:3]) if errors else None
    if error is not None and not calls and not found.raw_calls:
        method = method.split("+")[0]
    return ParseResult(calls=calls, content=content, method=method, error=error)
