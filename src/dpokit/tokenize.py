"""Turn PreferenceExamples into token ids: chat template, EOS, truncation, prefix checks.

Text pairs: prompt tokenized with the tokenizer's special tokens (BOS where it adds one), each completion
without them plus EOS. Conversational pairs: the chat template renders prompt (with the generation prompt)
and prompt + completion; the prompt tokens must be a prefix of the prompt + completion tokens, and the
completion is what follows them (so it ends with the template's end-of-turn tokens).

Truncation: the prompt keeps its last `max_prompt_length` tokens; each completion keeps its first
`max_length - len(prompt)` tokens. A pair with an empty completion is dropped and counted, never trained.

`encode_example` states the encoding of one pair; `tokenize_pairs` / `tokenize_unpaired` compute the same
ids with batched tokenizer calls (`encode_many`), which use every core.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpokit.data import DataError, PreferenceExample, UnpairedExample


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    where: str = ""


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


PREFIX_MISMATCH = (
    "the chat template's prompt tokens are not a prefix of prompt + completion tokens; "
    "this template cannot separate prompt from answer (use a text format or another template)"
)


def encode_prompt(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(
    prompt, prompt_ids: list[int], completion, tokenizer, where: str, side: str
) -> list[int]:
    """Token ids of one completion after `prompt` (whose ids are `prompt_ids`)."""
    if isinstance(prompt, list):
        full_text = tokenizer.apply_chat_template(
            prompt + completion, tokenize=False, add_generation_prompt=False
        )
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(where, PREFIX_MISMATCH, side)
        return full_ids[len(prompt_ids) :]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + eos


def encode_example(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Untruncated (prompt_ids, chosen_ids, rejected_ids) of one pair."""
    prompt_ids = encode_prompt(example.prompt, tokenizer)
    chosen = encode_completion(example.prompt, prompt_ids, example.chosen, tokenizer, example.where, "chosen")
    rejected = encode_completion(
        example.prompt, prompt_ids, example.rejected, tokenizer, example.where, "rejected"
    )
    return prompt_ids, chosen, rejected


def truncate(prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int, stats):
    """Prompt keeps its last max_prompt_length tokens; completions their first max_length - len(prompt)."""
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats.prompts_truncated += 1
    budget = max(max_length - len(prompt), 0)
    if any(len(c) > budget for c in completions):
        stats.completions_truncated += 1
    return prompt, [c[:budget] for c in completions]


ENCODE_BATCH = 1024
"""Examples per call of the fast tokenizer: a list of texts is encoded on every core at once (HH on 2 cores:
2.6x one text at a time), to the same ids."""


def encode_many(items: list[tuple], tokenizer) -> list:
    """encode_prompt + encode_completion of each item (prompt, completions, where, sides), in order, with
    one batched tokenizer call per kind of text: per item (prompt_ids, [completion_ids, ...]) or the DataError
    that encode_completion would raise for it. The same ids as one text at a time."""
    texts: dict[bool, list[str]] = {True: [], False: []}  # add_special_tokens -> texts

    def slot(special: bool, text: str) -> tuple[bool, int]:
        texts[special].append(text)
        return special, len(texts[special]) - 1

    plan = []
    for prompt, completions, _, _ in items:
        if isinstance(prompt, list):  # conversational: the template renders prompt, and prompt + completion
            render = tokenizer.apply_chat_template
            p = slot(False, render(prompt, tokenize=False, add_generation_prompt=True))
            cs = [
                slot(False, render(prompt + c, tokenize=False, add_generation_prompt=False))
                for c in completions
            ]
        else:
            p = slot(True, prompt)
            cs = [slot(False, c) for c in completions]
        plan.append((p, cs))
    ids = {k: tokenizer(v, add_special_tokens=k)["input_ids"] if v else [] for k, v in texts.items()}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ((pk, pi), cs), (prompt, _, where, sides) in zip(plan, items, strict=True):
        prompt_ids = ids[pk][pi]
        if not isinstance(prompt, list):
            out.append((prompt_ids, [ids[k][i] + eos for k, i in cs]))
            continue
        completions = []
        for (k, i), side in zip(cs, sides, strict=True):
            full = ids[k][i]
            if full[: len(prompt_ids)] != prompt_ids:
                completions = DataError(where, PREFIX_MISMATCH, side)
                break
            completions.append(full[len(prompt_ids) :])
        out.append(completions if isinstance(completions, DataError) else (prompt_ids, completions))
    return out


def _tokenize_all(
    examples, item, build, tokenizer, max_length: int, max_prompt_length: int, skip_invalid: bool
):
    """Shared loop: encode (batched) -> truncate -> drop (and count) empty completions -> build. `item(example)`:
    (prompt, completions, where, sides) for encode_many."""
    stats = TokenizeStats()
    out = []
    for start in range(0, len(examples), ENCODE_BATCH):
        chunk = examples[start : start + ENCODE_BATCH]
        for example, encoded in zip(chunk, encode_many([item(e) for e in chunk], tokenizer), strict=True):
            stats.pairs += 1
            if isinstance(encoded, DataError):
                if not skip_invalid:
                    raise encoded
                stats.dropped["chat template prefix mismatch"] += 1
                continue
            prompt, completions = truncate(*encoded, max_length, max_prompt_length, stats)
            if not prompt:  # nothing would predict the first completion token
                stats.dropped["empty prompt"] += 1
                continue
            if not all(completions):
                stats.dropped["empty completion after truncation"] += 1
                continue
            out.append(build(example, prompt, completions))
    stats.kept = len(out)
    return out, stats


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    def item(ex):
        return ex.prompt, [ex.chosen, ex.rejected], ex.where, ("chosen", "rejected")

    def build(ex, prompt, completions):
        return TokenizedPair(prompt, completions[0], completions[1], ex.weight, ex.where)

    return _tokenize_all(examples, item, build, tokenizer, max_length, max_prompt_length, skip_invalid)


def tokenize_unpaired(
    examples: list[UnpairedExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedUnpaired], TokenizeStats]:
    def item(ex):
        return ex.prompt, [ex.completion], ex.where, ("completion",)

    def build(ex, prompt, completions):
        return TokenizedUnpaired(prompt, completions[0], ex.label, ex.weight, ex.where)

    return _tokenize_all(examples, item, build, tokenizer, max_length, max_prompt_length, skip_invalid)
