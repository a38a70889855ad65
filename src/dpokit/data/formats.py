"""Detect the format of each raw record and normalize it to a `PreferenceExample`.

Formats (detected per record, by field names):
- standard: `prompt`, `chosen`, `rejected` strings;
- implicit prompt: `chosen`, `rejected` full texts sharing a prefix (Anthropic HH);
- conversational: `prompt` as a message list, `chosen`/`rejected` as message lists or strings; or
  `chosen`/`rejected` (or `chosen_messages`/`rejected_messages`) as whole conversations that share a prefix;
- ShareGPT (LLaMA-Factory): `conversations` + `chosen`/`rejected` single messages with `from`/`value`;
- a conversation and its last assistant turn's alternatives: `messages` + `chosen`/`rejected` (strings or
  messages);
- rated lists: a prompt with several scored completions (UltraFeedback's raw `instruction` + `completions`,
  or `prompt`/`messages` + `completions` with scores), one pair per better-worse couple (lists.py).
Messages may use `role`/`content` or `from`/`value`, content a string or typed parts, and carry tool calls
and tool results; a `tools` column holds the functions' JSON schemas (messages.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dpokit.data import messages as msgs
from dpokit.data.readers import DataError

HH_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair, normalized.

    Text examples have `str` prompt/chosen/rejected; conversational ones have message lists
    (`[{"role", "content"}]`), where chosen/rejected are the messages that follow the prompt.
    """

    prompt: str | list[msgs.Message]
    chosen: str | list[msgs.Message]
    rejected: str | list[msgs.Message]
    weight: float = 1.0
    where: str = ""
    format: str = "standard"
    meta: dict = field(default_factory=dict, compare=False)
    tools: list | None = None
    """JSON schemas of the functions the model may call (the record's `tools` column), for the template."""


@dataclass(frozen=True)
class UnpairedExample:
    """One unpaired example for KTO-style losses: a completion labelled desirable (True) or not."""

    prompt: str | list[msgs.Message]
    completion: str | list[msgs.Message]
    label: bool
    weight: float = 1.0
    where: str = ""
    format: str = "unpaired"
    tools: list | None = None


def normalize(where: str, record: Any) -> PreferenceExample:
    """The preference pair of one record (the first of a rated list's: see normalize_pairs)."""
    return normalize_pairs(where, record)[0]


def normalize_pairs(where: str, record: Any, list_pairs: str = "best_vs_rest") -> list[PreferenceExample]:
    """The preference pairs of one record (one, or several for a rated list); raise DataError naming
    `where` and the field when the record is not usable.

    Optional quality fields (`score_chosen`, `score_rejected`, `confidence`) and the `tools` column are read
    in every format; `list_pairs`: how a rated list becomes pairs (lists.py)."""
    if isinstance(record, dict) and isinstance(record.get("completions"), list):
        from dpokit.data.lists import rated_list

        examples = rated_list(where, record, list_pairs)
    else:
        examples = [_normalize(where, record)]
        scores = _scores(where, record)
        if scores:
            examples = [dataclasses.replace(examples[0], meta={**examples[0].meta, **scores})]
    schemas = msgs.tools(where, record)
    return [dataclasses.replace(e, tools=schemas) for e in examples] if schemas else examples


def _normalize(where: str, record: Any) -> PreferenceExample:
    if not isinstance(record, dict):
        raise DataError(
            where, f"expected an object with prompt/chosen/rejected fields, got {type(record).__name__}"
        )
    if "label" in record and "chosen" not in record:
        raise DataError(
            where,
            "an unpaired record (completion + label), but the loss needs preference pairs; "
            "use loss.type=kto (or apo_zero_unpaired) for unpaired data",
            "label",
        )
    weight = _weight(where, record)
    if "response1" in record and "response2" in record:
        return _votes(where, record, weight)
    if "conversations" in record:
        return _sharegpt(where, record, weight)
    if "chosen_messages" in record or "rejected_messages" in record:
        chosen = msgs.messages(where, record, "chosen_messages")
        rejected = msgs.messages(where, record, "rejected_messages")
        return _split_conversations(where, chosen, rejected, weight, "conversational")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(where, f"missing field (found: {sorted(record)})", key)
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None and "messages" in record:
        return _conversation_alternatives(where, record, weight)
    if prompt is None:
        if isinstance(chosen, list) and isinstance(rejected, list):
            return _split_conversations(
                where,
                msgs.messages(where, record, "chosen"),
                msgs.messages(where, record, "rejected"),
                weight,
                "conversational",
            )
        _need_str(where, record, "chosen")
        _need_str(where, record, "rejected")
        return _split_implicit(where, chosen, rejected, weight)
    if isinstance(prompt, list):
        prompt_msgs = msgs.messages(where, record, "prompt")
        if not prompt_msgs:
            raise DataError(where, "empty message list", "prompt")
        completions = [msgs.answers(where, record[key], key) for key in ("chosen", "rejected")]
        return PreferenceExample(prompt_msgs, completions[0], completions[1], weight, where, "conversational")
    _need_str(where, record, "prompt")
    for key in ("chosen", "rejected"):
        _need_str(where, record, key)
        _need_nonempty(where, record[key], key)
    return PreferenceExample(prompt, chosen, rejected, weight, where, "standard")


SCORE_FIELDS = ("score_chosen", "score_rejected", "confidence", "margin")
"""Optional numbers of a pair: scores and confidence (filters), the margin a reward model must win by."""


def score_gap(meta: dict) -> float | None:
    """A pair's score_chosen - score_rejected; None unless it has both."""
    if "score_chosen" in meta and "score_rejected" in meta:
        return meta["score_chosen"] - meta["score_rejected"]
    return None


def _scores(where: str, record: dict) -> dict:
    """Optional numeric quality fields carried into `meta` (for confidence filtering)."""
    meta = {}
    for key in SCORE_FIELDS:
        if record.get(key) is None:
            continue
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(where, f"expected a finite number, got {value!r}", key)
        meta[key] = float(value)
    return meta


def _votes(where: str, record: dict, weight: float) -> PreferenceExample:
    """PandaLM style: instruction (+ input) or prompt (text or chat messages: `dpokit label export
    --format votes`), response1, response2 and annotator votes annotator1, annotator2, ...
    (1 = response1 better, 2 = response2 better, 0 = tie). The majority label over all votes decides
    ([1, 0, 0] is a tie); `agreement` is the share of annotators who voted with it. A tie (majority 0 or
    no strict majority) is a valid record with no preference: `meta["tie"]`, response1 as `chosen`; the
    filters drop it before training, counted."""
    if "prompt" in record:  # dpokit label's export: the prompt as text or chat messages
        prompt = record["prompt"]
        if isinstance(prompt, list):
            prompt = msgs.messages(where, record, "prompt")
        elif not (isinstance(prompt, str) and prompt.strip()):
            raise DataError(where, "expected text or a list of chat messages", "prompt")
    elif not isinstance(record.get("instruction"), str):
        raise DataError(where, "expected a string (or a prompt field)", "instruction")
    vote_keys = sorted(k for k in record if re.fullmatch(r"annotator\d+", k))
    if not vote_keys:
        raise DataError(
            where, "response1/response2 records need annotator votes (annotator1, ...)", "annotator1"
        )
    votes = []
    for key in vote_keys:
        if record[key] not in (0, 1, 2) or isinstance(record[key], bool):
            raise DataError(where, f"expected a vote 0, 1 or 2, got {record[key]!r}", key)
        votes.append(record[key])
    counts = sorted(((votes.count(v), v) for v in (0, 1, 2)), reverse=True)
    (top, label), (second, _) = counts[0], counts[1]
    tie = label == 0 or top == second
    if "prompt" in record:
        text = prompt
    else:
        text = record["instruction"]
        if isinstance(record.get("input"), str) and record["input"].strip():
            text += "\n\n" + record["input"]
    # some responses are JSON booleans (`true`): take their text
    responses = [str(record[k]) if record[k] is not None else "" for k in ("response1", "response2")]
    better, worse = (1, 0) if label == 2 and not tie else (0, 1)
    for i in (better, worse):
        _need_nonempty(where, responses[i], f"response{i + 1}")
    meta = {"agreement": top / len(votes), "votes": votes, **({"tie": True} if tie else {})}
    names = record.get("annotator_names")
    if names is not None:
        index = [int(k.removeprefix("annotator")) - 1 for k in vote_keys]
        if not (
            isinstance(names, list)
            and all(isinstance(n, str) for n in names)
            and sorted(index) == list(range(len(names)))
        ):
            raise DataError(
                where, f"expected {len(votes)} names, the Nth for the annotatorN field", "annotator_names"
            )
        meta["annotators"] = [names[i] for i in index]
    return PreferenceExample(
        text if isinstance(text, list) else [{"role": "user", "content": text}],
        [{"role": "assistant", "content": responses[better]}],
        [{"role": "assistant", "content": responses[worse]}],
        weight,
        where,
        "votes",
        meta,
    )


def _weight(where: str, record: dict) -> float:
    if "weight" not in record or record["weight"] is None:
        return 1.0
    w = record["weight"]
    if isinstance(w, str):
        try:
            w = float(w)
        except ValueError:
            raise DataError(where, f"expected a number, got {w!r}", "weight") from None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise DataError(where, f"expected a finite number >= 0, got {w!r}", "weight")
    return float(w)


def _need_str(where: str, record: dict, key: str) -> None:
    if not isinstance(record[key], str):
        raise DataError(where, f"expected a string, got {type(record[key]).__name__}", key)


def _need_nonempty(where: str, text: str, key: str) -> None:
    if not text.strip():
        raise DataError(where, "empty completion (nothing to score)", key)


def _conversation_alternatives(where: str, record: dict, weight: float) -> PreferenceExample:
    """`messages` (the conversation so far) + `chosen`/`rejected`: the alternatives for the next assistant
    turn (strings, messages, or lists of messages)."""
    prompt = msgs.messages(where, record, "messages")
    if not prompt:
        raise DataError(where, "empty message list", "messages")
    if prompt[-1]["role"] not in ("user", "tool", "system"):
        raise DataError(
            where,
            f"the conversation ends with a {prompt[-1]['role']} turn; chosen/rejected are the alternatives for "
            "the next assistant turn, so it must end with the user's (or a tool's) turn",
            "messages",
        )
    chosen, rejected = (msgs.answers(where, record[k], k) for k in ("chosen", "rejected"))
    return PreferenceExample(prompt, chosen, rejected, weight, where, "conversational")


def _sharegpt(where: str, record: dict, weight: float) -> PreferenceExample:
    prompt = msgs.messages(where, record, "conversations")
    if not prompt:
        raise DataError(where, "empty conversation", "conversations")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise DataError(where, "the prompt must end with a human turn before the answers", "conversations")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(where, "missing field", key)
    chosen = msgs.answers(where, record["chosen"], "chosen")
    rejected = msgs.answers(where, record["rejected"], "rejected")
    return PreferenceExample(prompt, chosen, rejected, weight, where, "sharegpt")


def _split_conversations(
    where: str, chosen: list[msgs.Message], rejected: list[msgs.Message], weight: float, fmt: str
) -> PreferenceExample:
    """Whole conversations on both sides: the shared leading messages are the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(where, "chosen and rejected conversations share no leading prompt message", "chosen")
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    for key, side in (("chosen", c), ("rejected", r)):
        if side[-1]["role"] != "assistant":
            raise DataError(where, "the conversation must end with an assistant message", key)
        if not side[-1].get("tool_calls"):
            _need_nonempty(where, side[-1]["content"], key)
    return PreferenceExample(prompt, c, r, weight, where, fmt)


def split_implicit_prompt(chosen: str, rejected: str) -> int:
    """Index where the shared prompt ends in an implicit-prompt pair.

    Anthropic HH: take the longest common prefix, then back off to the last "\\n\\nAssistant:" lying
    fully inside it (splitting each side at its own last marker gives different prompts when a response
    contains an inline "Human:" turn). Without the marker, back off to the last whitespace of the prefix.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    marker = common.rfind(HH_MARKER)
    if marker >= 0:
        return marker + len(HH_MARKER)
    if n == limit:  # one side is a prefix of the other: keep a word boundary
        n = max(common.rfind(" "), common.rfind("\n"))
        return max(n, 0)
    while n > 0 and not common[n - 1].isspace():
        n -= 1
    return n


def _split_implicit(where: str, chosen: str, rejected: str, weight: float) -> PreferenceExample:
    cut = split_implicit_prompt(chosen, rejected)
    if cut == 0:
        raise DataError(
            where, "no 'prompt' field and chosen/rejected share no prefix to use as one", "prompt"
        )
    c, r = chosen[cut:], rejected[cut:]
    _need_nonempty(where, c, "chosen")
    _need_nonempty(where, r, "rejected")
    return PreferenceExample(chosen[:cut], c, r, weight, where, "implicit")


def normalize_unpaired(where: str, record: Any) -> UnpairedExample:
    """`prompt`/`completion`/`label`, or `messages` (the last assistant turn is the completion) + `label`."""
    if not isinstance(record, dict):
        raise DataError(
            where, f"expected an object with prompt/completion/label, got {type(record).__name__}"
        )
    if "chosen" in record or "rejected" in record or "conversations" in record:
        raise DataError(
            where,
            "a preference pair (chosen/rejected), but loss.type is unpaired (kto, apo_zero_unpaired), which needs "
            "prompt/completion/label records; use a paired loss such as sigmoid, or unpaired data",
            "chosen",
        )
    if "label" not in record:
        raise DataError(where, f"missing field (found: {sorted(record)})", "label")
    label = record["label"]
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool) and label not in (0, 1):
        raise DataError(where, f"expected true/false, got {label!r}", "label")
    weight = _weight(where, record)
    schemas = msgs.tools(where, record)
    if "messages" in record:
        conversation = msgs.messages(where, record, "messages")
        if len(conversation) < 2 or conversation[-1]["role"] != "assistant":
            raise DataError(
                where, "needs a prompt and a final assistant message (the completion)", "messages"
            )
        if not conversation[-1].get("tool_calls"):
            _need_nonempty(where, conversation[-1]["content"], "messages")
        return UnpairedExample(
            conversation[:-1], conversation[-1:], bool(label), weight, where, "unpaired", schemas
        )
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(where, f"missing field (found: {sorted(record)})", key)
    if isinstance(record["prompt"], list):
        prompt = msgs.messages(where, record, "prompt")
        completion = msgs.answers(where, record["completion"], "completion")
        return UnpairedExample(prompt, completion, bool(label), weight, where, "unpaired", schemas)
    _need_str(where, record, "prompt")
    _need_str(where, record, "completion")
    _need_nonempty(where, record["completion"], "completion")
    return UnpairedExample(record["prompt"], record["completion"], bool(label), weight, where)
