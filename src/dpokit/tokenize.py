"""Turn PreferenceExamples into token ids: chat template, EOS, truncation, prefix checks.

Text pairs: prompt tokenized with the tokenizer's special tokens (BOS where it adds one), each completion
without them plus EOS. Conversational pairs: the chat template renders prompt (with the generation prompt)
and prompt + completion; the prompt tokens must be a prefix of the prompt + completion tokens, and the
completion is what follows them (so it ends with the template's end-of-turn tokens).

Trained tokens: a completion of one message (text, or one assistant turn) is trained whole. A completion of
several messages (a conversation whose sides differ before the last turn, a tool call followed by its result
and the answer) is trained on its assistant turns only by default (`targets`: assistant): tool results and
user turns in it are context the model reads, not text it is scored on; `last` trains its final assistant
turn only, `all` every token after the prompt. Each turn's span comes from rendering the conversation up to
it (with the assistant header for an assistant turn, which stays context as the prompt's does), which must
be a prefix of the whole rendering.

Truncation: the prompt keeps its last `max_prompt_length` tokens; each completion keeps its first
`max_length - len(prompt)` tokens. A pair with an empty completion, or no trained token left, is dropped
and counted, never trained.

`encode_example` states the encoding of one pair; `tokenize_pairs` / `tokenize_unpaired` compute the same
ids with batched tokenizer calls (`encode_many`), which use every core.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpokit.data import DataError, PreferenceExample, UnpairedExample
from dpokit.data.formats import score_gap


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    where: str = ""
    chosen_targets: tuple[bool, ...] | None = None
    """Which chosen tokens are trained (scored); None: every one."""
    rejected_targets: tuple[bool, ...] | None = None
    margin: float = 0.0
    """A reward model's required margin for this pair (a `margin` column)."""
    score_gap: float | None = None
    """score_chosen - score_rejected when the pair has both (losses that regress on scores: REBEL)."""


@dataclass
class TokenizeStats:
    pairs: int = 0
    kept: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "kept": self.kept,
            "prompts_truncated": self.prompts_truncated,
            "completions_truncated": self.completions_truncated,
            "dropped": dict(self.dropped),
        }


@dataclass(frozen=True)
class TokenizedUnpaired:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    weight: float = 1.0
    where: str = ""
    completion_targets: tuple[bool, ...] | None = None


PREFIX_MISMATCH = (
    "the chat template's prompt tokens are not a prefix of prompt + completion tokens; "
    "this template cannot separate prompt from answer (use a text format or another template)"
)


def render(tokenizer, messages: list, tools=None, add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` (with the `tools` schemas when the data has them)."""
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )


def encode_prompt(prompt, tokenizer, tools=None) -> list[int]:
    if isinstance(prompt, list):
        text = render(tokenizer, prompt, tools, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(
    prompt, prompt_ids: list[int], completion, tokenizer, where: str, side: str, tools=None
) -> list[int]:
    """Token ids of one completion after `prompt` (whose ids are `prompt_ids`)."""
    if isinstance(prompt, list):
        full_text = render(tokenizer, prompt + completion, tools)
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(where, PREFIX_MISMATCH, side)
        return full_ids[len(prompt_ids) :]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + eos


def encode_example(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Untruncated (prompt_ids, chosen_ids, rejected_ids) of one pair."""
    tools = example.tools
    prompt_ids = encode_prompt(example.prompt, tokenizer, tools)
    chosen = encode_completion(
        example.prompt, prompt_ids, example.chosen, tokenizer, example.where, "chosen", tools
    )
    rejected = encode_completion(
        example.prompt, prompt_ids, example.rejected, tokenizer, example.where, "rejected", tools
    )
    return prompt_ids, chosen, rejected


def truncate(
    prompt: list[int],
    completions: list[list[int]],
    max_length: int,
    max_prompt_length: int,
    stats,
    targets=None,
):
    """Prompt keeps its last max_prompt_length tokens; completions their first max_length - len(prompt)
    (and their `targets` masks with them)."""
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats.prompts_truncated += 1
    budget = max(max_length - len(prompt), 0)
    if any(len(c) > budget for c in completions):
        stats.completions_truncated += 1
    masks = [None if t is None else t[:budget] for t in (targets or [None] * len(completions))]
    return prompt, [c[:budget] for c in completions], masks


ENCODE_BATCH = 1024
"""Examples per call of the fast tokenizer: a list of texts is encoded on every core at once (HH on 2 cores:
2.6x one text at a time), to the same ids."""


def encode_many(items: list[tuple], tokenizer, targets: str = "assistant") -> list:
    """encode_prompt + encode_completion of each item (prompt, completions, where, sides, tools), in order,
    with one batched tokenizer call per kind of text: per item (prompt_ids, [completion_ids, ...], [trained
    mask or None, ...]) or the DataError that encode_completion would raise for it. The same ids as one text
    at a time."""
    texts: dict[bool, list[str]] = {True: [], False: []}  # add_special_tokens -> texts

    def slot(special: bool, text: str) -> tuple[bool, int]:
        texts[special].append(text)
        return special, len(texts[special]) - 1

    plan = []
    for prompt, completions, _, _, tools in items:
        if isinstance(prompt, list):  # conversational: the template renders prompt, and prompt + completion
            p = slot(False, render(tokenizer, prompt, tools, add_generation_prompt=True))
            cs = [slot(False, render(tokenizer, prompt + c, tools)) for c in completions]
            turns = [_turn_slots(slot, tokenizer, prompt, c, tools, targets) for c in completions]
        else:
            p = slot(True, prompt)
            cs, turns = [slot(False, c) for c in completions], [None] * len(completions)
        plan.append((p, cs, turns))
    ids = {k: tokenizer(v, add_special_tokens=k)["input_ids"] if v else [] for k, v in texts.items()}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ((pk, pi), cs, turns), (prompt, completions_in, where, sides, _) in zip(plan, items, strict=True):
        prompt_ids = ids[pk][pi]
        if not isinstance(prompt, list):
            out.append((prompt_ids, [ids[k][i] + eos for k, i in cs], [None] * len(cs)))
            continue
        completions, masks = [], []
        for (k, i), side, turn, messages in zip(cs, sides, turns, completions_in, strict=True):
            full = ids[k][i]
            mask = _trained(full, prompt_ids, turn, messages, ids, targets)
            if mask is False:
                completions = DataError(where, PREFIX_MISMATCH, side)
                break
            completions.append(full[len(prompt_ids) :])
            masks.append(mask)
        out.append(completions if isinstance(completions, DataError) else (prompt_ids, completions, masks))
    return out


def _turn_slots(slot, tokenizer, prompt: list, completion: list, tools, targets: str):
    """For a completion of several messages: the renderings that bound each of its turns (up to message i,
    without and, before an assistant turn, with its header); None when every token is trained."""
    if len(completion) == 1 or targets == "all":
        return None
    bounds = []
    for i in range(1, len(completion)):
        end = slot(False, render(tokenizer, prompt + completion[:i], tools))
        start = (
            slot(False, render(tokenizer, prompt + completion[:i], tools, add_generation_prompt=True))
            if completion[i]["role"] == "assistant"
            else end
        )
        bounds.append((end, start))
    return bounds


def _trained(full: list[int], prompt_ids: list[int], turns, messages: list, ids: dict, targets: str):
    """The trained-token mask of one completion (None: every token), or False when a rendering is not a
    prefix of the whole (the template cannot separate the turns)."""
    prefixes = [prompt_ids] + ([ids[k][i] for bound in turns for k, i in bound] if turns else [])
    if any(full[: len(p)] != p for p in prefixes):
        return False
    if turns is None:
        return None
    base = len(prompt_ids)
    starts = [base] + [len(ids[k][i]) for _, (k, i) in turns]
    ends = [len(ids[k][i]) for (k, i), _ in turns] + [len(full)]
    chosen = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if targets == "last":
        chosen = chosen[-1:]
    mask = [False] * (len(full) - base)
    for i in chosen:
        mask[starts[i] - base : ends[i] - base] = [True] * (ends[i] - starts[i])
    return tuple(mask)


TOOL_PROBE = [
    {"role": "user", "content": "dpokit probe"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "dpokit_probe_call", "arguments": {"q": 1}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_0", "name": "dpokit_probe_call", "content": "dpokit_probe_result"},
]
TOOL_SCHEMA = [
    {
        "type": "function",
        "function": {
            "name": "dpokit_probe_tool",
            "description": "probe",
            "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}},
        },
    }
]


def template_tool_problem(tokenizer, examples) -> str | None:
    """What the chat template drops of the tools in `examples` (tool calls, tool results, schemas), said
    once with the fix; None when it renders what the data holds (or the data holds no tools)."""
    from dpokit.data.messages import has_tools

    with_tools = [e for e in examples if has_tools(e)]
    if not with_tools:
        return None
    text = render(tokenizer, TOOL_PROBE, TOOL_SCHEMA if any(e.tools for e in with_tools) else None)
    missing = [
        what
        for what, marker in (("tool calls", "dpokit_probe_call"), ("tool results", "dpokit_probe_result"))
        if marker not in text
    ]
    if any(e.tools for e in with_tools) and "dpokit_probe_tool" not in text:
        missing.append("the tools column (function schemas)")
    if not missing:
        return None
    left_out = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
    return (
        f"{len(with_tools)} records hold tool calls or tools (first: {with_tools[0].where}), but this model's chat "
        f"template leaves out {left_out}: they would be trained as nothing. Fix: "
        "data.chat_template=chatml-tools (dpokit's ChatML template with tools), or a Jinja file of a template "
        "that renders them"
    )


def _tokenize_all(
    examples,
    item,
    build,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool,
    targets: str = "assistant",
):
    """Shared loop: encode (batched) -> truncate -> drop (and count) empty completions -> build. `item(example)`:
    (prompt, completions, where, sides, tools) for encode_many."""
    problem = template_tool_problem(tokenizer, examples)
    if problem:
        raise DataError(examples[0].where.split(":")[0] if examples else "data", problem)
    stats = TokenizeStats()
    out = []
    for start in range(0, len(examples), ENCODE_BATCH):
        chunk = examples[start : start + ENCODE_BATCH]
        encoded_chunk = encode_many([item(e) for e in chunk], tokenizer, targets)
        for example, encoded in zip(chunk, encoded_chunk, strict=True):
            stats.pairs += 1
            if isinstance(encoded, DataError):
                if not skip_invalid:
                    raise encoded
                stats.dropped["chat template prefix mismatch"] += 1
                continue
            prompt_ids, completions, masks = encoded
            prompt, completions, masks = truncate(
                prompt_ids, completions, max_length, max_prompt_length, stats, masks
            )
            if not prompt:  # nothing would predict the first completion token
                stats.dropped["empty prompt"] += 1
                continue
            if not all(completions):
                stats.dropped["empty completion after truncation"] += 1
                continue
            if not all(m is None or any(m) for m in masks):
                stats.dropped["no trained token left after truncation"] += 1
                continue
            out.append(build(example, prompt, completions, masks))
    stats.kept = len(out)
    return out, stats


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool = False,
    targets: str = "assistant",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    def item(ex):
        return ex.prompt, [ex.chosen, ex.rejected], ex.where, ("chosen", "rejected"), ex.tools

    def build(ex, prompt, completions, masks):
        return TokenizedPair(
            prompt,
            completions[0],
            completions[1],
            ex.weight,
            ex.where,
            masks[0],
            masks[1],
            ex.meta.get("margin", 0.0),
            score_gap(ex.meta),
        )

    return _tokenize_all(
        examples, item, build, tokenizer, max_length, max_prompt_length, skip_invalid, targets
    )


def tokenize_unpaired(
    examples: list[UnpairedExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool = False,
    targets: str = "assistant",
) -> tuple[list[TokenizedUnpaired], TokenizeStats]:
    def item(ex):
        return ex.prompt, [ex.completion], ex.where, ("completion",), ex.tools

    def build(ex, prompt, completions, masks):
        return TokenizedUnpaired(prompt, completions[0], ex.label, ex.weight, ex.where, masks[0])

    return _tokenize_all(
        examples, item, build, tokenizer, max_length, max_prompt_length, skip_invalid, targets
    )
