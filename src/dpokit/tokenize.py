"""Turn PreferenceExamples into token ids: chat template, EOS, truncation, prefix checks.

Text pairs: prompt tokenized with the tokenizer's special tokens (BOS where it adds one), each completion
without them plus EOS. Conversational pairs: the chat template renders prompt (with the generation prompt)
and prompt + completion; the prompt tokens must be a prefix of the prompt + completion tokens, and the
completion is what follows them (so it ends with the template's end-of-turn tokens).

Truncation: the prompt keeps its last `max_prompt_length` tokens; each completion keeps its first
`max_length - len(prompt)` tokens. A pair with an empty completion is dropped and counted, never trained.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpokit.data import DataError, PreferenceExample


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


def encode_example(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Untruncated (prompt_ids, chosen_ids, rejected_ids) of one pair."""
    if example.conversational:
        prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completions = []
        for side in ("chosen", "rejected"):
            full_text = tokenizer.apply_chat_template(
                example.prompt + getattr(example, side), tokenize=False, add_generation_prompt=False
            )
            full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
            if full_ids[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    example.where,
                    "the chat template's prompt tokens are not a prefix of prompt + completion tokens; "
                    "this template cannot separate prompt from answer (use a text format or another template)",
                    side,
                )
            completions.append(full_ids[len(prompt_ids) :])
        return prompt_ids, completions[0], completions[1]
    prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chosen = tokenizer(example.chosen, add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(example.rejected, add_special_tokens=False)["input_ids"] + eos
    return prompt_ids, chosen, rejected


def tokenize_pairs(
    examples: list[PreferenceExample],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats()
    pairs = []
    for example in examples:
        stats.pairs += 1
        try:
            prompt, chosen, rejected = encode_example(example, tokenizer)
        except DataError:
            if not skip_invalid:
                raise
            stats.dropped["chat template prefix mismatch"] += 1
            continue
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.prompts_truncated += 1
        budget = max_length - len(prompt)
        if len(chosen) > budget or len(rejected) > budget:
            stats.completions_truncated += 1
        chosen, rejected = chosen[: max(budget, 0)], rejected[: max(budget, 0)]
        if not chosen or not rejected:
            stats.dropped["empty completion after truncation"] += 1
            continue
        pairs.append(TokenizedPair(prompt, chosen, rejected, example.weight, example.where))
    stats.kept = len(pairs)
    return pairs, stats
