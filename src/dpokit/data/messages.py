"""Chat messages as users have them, normalized: OpenAI style (`role`/`content`) or ShareGPT (`from`/`value`),
content as a string or typed text parts; assistant messages that call tools (`tool_calls`, arguments as a
dict or a JSON string), tool results (`role: tool`, with `tool_call_id` and `name`), and a record's `tools`
(the JSON schemas the chat template shows the model). Nothing is dropped: what a record says about tools is
kept for the chat template and written back out by `dpokit data filter`."""

from __future__ import annotations

import json
import re
from typing import Any

from dpokit.data.readers import DataError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}

Message = dict[str, Any]
"""{"role", "content"} and, where the data has them, "tool_calls" (assistant), "tool_call_id" and "name"
(tool results)."""


def content_text(where: str, content: Any, key: str, role: str = "") -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # typed parts: [{"type": "text", "text"|"value": ...}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise DataError(where, f"only text content parts are supported, got {part!r:.60}", key)
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise DataError(where, f"text part without a string 'text'/'value': {part!r:.60}", key)
            parts.append(text)
        return "".join(parts)
    if role == "tool" and isinstance(content, dict):  # a tool's result given as a JSON object
        return json.dumps(content, ensure_ascii=False)
    raise DataError(where, f"message content must be a string, got {type(content).__name__}", key)


def message(where: str, msg: Any, key: str) -> Message:
    if not isinstance(msg, dict):
        raise DataError(where, f"expected a message object, got {type(msg).__name__}", key)
    role = msg.get("role", msg.get("from"))
    content = msg.get("content", msg.get("value"))
    calls = msg.get("tool_calls")
    if role is None or (content is None and not calls):
        raise DataError(where, f"message needs role/content (or from/value), got keys {sorted(msg)}", key)
    norm_role = ROLE_ALIASES.get(str(role).lower())
    if norm_role is None:
        raise DataError(where, f"unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}", key)
    out: Message = {
        "role": norm_role,
        "content": "" if content is None else content_text(where, content, key, norm_role),
    }
    if calls is not None:
        if norm_role != "assistant":
            raise DataError(
                where, f"a {norm_role} message with tool_calls: only the assistant calls tools", key
            )
        out["tool_calls"] = tool_calls(where, calls, f"{key}.tool_calls")
    for field in ("tool_call_id", "name"):
        if msg.get(field) is not None:
            out[field] = str(msg[field])
    return out


def tool_calls(where: str, calls: Any, key: str) -> list[dict]:
    """OpenAI-style calls ({"type": "function", "function": {"name", "arguments"}}, or {"name", "arguments"})
    with arguments as a dict (a JSON string is parsed: chat templates write them with `tojson`)."""
    if isinstance(calls, str):
        calls = _json(where, calls, key)
    if not isinstance(calls, list) or not calls:
        raise DataError(where, f"expected a non-empty list of tool calls, got {calls!r:.60}", key)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(where, f"a tool call needs a function name, got {call!r:.60}", f"{key}[{i}]")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = _json(where, args, f"{key}[{i}].arguments") if args.strip() else {}
        if not isinstance(args, dict):
            raise DataError(
                where, f"arguments must be a JSON object, got {args!r:.60}", f"{key}[{i}].arguments"
            )
        norm = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id") is not None:
            norm["id"] = str(call["id"])
        out.append(norm)
    return out


def tools(where: str, record: dict) -> list[dict] | None:
    """The record's `tools` column: JSON schemas of the functions the model may call (a list, or a JSON
    string of one, as TRL takes it); None when absent."""
    value = record.get("tools")
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        value = _json(where, value, "tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(where, f"expected a list of JSON schemas, got {value!r:.60}", "tools")
    return value


def _json(where: str, text: str, key: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"not valid JSON ({err.msg} at column {err.colno})", key) from None


def messages(where: str, record: dict, key: str) -> list[Message]:
    value = record.get(key)
    if not isinstance(value, list):
        raise DataError(where, f"expected a list of messages, got {type(value).__name__}", key)
    return [message(where, m, f"{key}[{i}]") for i, m in enumerate(value)]


def answers(where: str, value: Any, key: str) -> list[Message]:
    """A completion: a string (the assistant's answer), one message or a list of them, ending with the
    assistant (a text answer or a tool call)."""
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        msgs = [message(where, value, key)]
    elif isinstance(value, list):
        msgs = [message(where, m, f"{key}[{i}]") for i, m in enumerate(value)]
    else:
        raise DataError(
            where, f"expected a string, a message or a list of messages, got {type(value).__name__}", key
        )
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(where, "the completion must end with an assistant message", key)
    if not msgs[-1]["content"].strip() and not msgs[-1].get("tool_calls"):
        raise DataError(where, "empty completion (nothing to score)", key)
    return msgs


def has_tools(example) -> bool:
    """Whether an example carries tool calls, tool results or tool schemas."""
    if getattr(example, "tools", None):
        return True
    sides = [
        example.prompt,
        *(getattr(example, k) for k in ("chosen", "rejected", "completion") if hasattr(example, k)),
    ]
    return any(
        isinstance(side, list) and any(m.get("tool_calls") or m["role"] == "tool" for m in side)
        for side in sides
    )


TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
"""A turn of an Anthropic HH transcript ("\n\nHuman: ...\n\nAssistant: ...")."""


def transcript_messages(text: str) -> list[Message] | None:
    """An Anthropic HH transcript as chat messages (Human: user, Assistant: assistant, each stripped; the
    empty assistant turn a prompt ends with left out); None for text that does not start with a turn."""
    parts = TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    turns = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return turns or None
