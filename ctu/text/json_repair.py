"""Tolerant JSON loading for model output: a small, careful repair step, never eval.

`loads_tolerant` first tries strict `json.loads`. Only if that fails does it rewrite the
text in one pass of a character state machine that knows where strings are, then tries
`json.loads` once more. The repairs are the mistakes models make that have one obvious
meaning:
- single-quoted strings -> double-quoted (inner double quotes escaped, `\\'` unescaped);
- trailing commas before `}` or `]` (and at the end) removed;
- Python literals `True`, `False`, `None` outside strings -> `true`, `false`, `null`;
- missing closing brackets at the end appended in the right order.
An unterminated string is not repaired: a truncated value must not pass as a real one.
"""

import json
from typing import Any

_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CLOSER = {"{": "}", "[": "]"}


def reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def loads_strict(text: str) -> Any:
    """`json.loads` without NaN/Infinity (not JSON; models should not send them)."""
    return json.loads(text, parse_constant=reject_constant)


def _drop_trailing_comma(out: list[str]) -> None:
    i = len(out) - 1
    while i >= 0 and out[i].isspace():
        i -= 1
    if i >= 0 and out[i] == ",":
        del out[i]


def repair(text: str) -> str:
    """The repaired text; raises ValueError when the text cannot be repaired safely."""
    out: list[str] = []
    stack: list[str] = []
    quote: str | None = None  # the quote character of the string we are in, if any
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\" and i + 1 < n:
                nxt = text[i + 1]
                if nxt == "'":
                    out.append("'")  # \' is not a JSON escape
                else:
                    out.append(ch + nxt)
                i += 2
                continue
            if ch == quote:
                out.append('"')
                quote = None
            elif ch == '"':
                out.append('\\"')  # a double quote inside a single-quoted string
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ch == "\r":
                out.append("\\r")
            else:
                out.append(ch)
            i += 1
            continue
        if ch in "\"'":
            quote = ch
            out.append('"')
        elif ch in "{[":
            stack.append(ch)
            out.append(ch)
        elif ch in "}]":
            _drop_trailing_comma(out)
            if stack and _CLOSER[stack[-1]] == ch:
                stack.pop()
            out.append(ch)
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_PYTHON_LITERALS.get(word, word))
            i = j
            continue
        else:
            out.append(ch)
        i += 1
    if quote is not None:
        raise ValueError("unterminated string")
    _drop_trailing_comma(out)
    out.extend(_CLOSER[open_bracket] for open_bracket in reversed(stack))
    return "".join(out)


def loads_tolerant(text: str) -> tuple[Any, bool]:
    """(value, repaired). Raises ValueError or RecursionError when nothing parses."""
    try:
        return loads_strict(text), False
    except ValueError:
        pass
    return loads_strict(repair(text)), True


def matching_end(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`, or len(text) if none.

    String-aware (both quote styles) and iterative, so deep nesting cannot recurse.
    """
    depth = 0
    quote: str | None = None
    i, n = start, len(text)
    while i < n:
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n
