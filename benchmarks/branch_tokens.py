"""Tokens the forward pass computes per pair when pairs come from K samples of a prompt (a round of
`dpokit iterate`): padded (prompt + completion per row, twice per pair), prefix-shared pairs (1 prompt + 2
branches per pair) and shared branches (1 prompt + N branches: the pairs of a prompt in one micro-batch,
train.group_by_prompt, each distinct completion once), for best-vs-worst and every-pair pairing.

K samples per prompt come from SmolLM2-135M-Instruct (dpokit's sampler, temperature 1), scored by VADER
sentiment (review openings) or by length (HH dialogues); micro-batches of --batch-size pairs in the order
training would visit them (one epoch).

    python benchmarks/branch_tokens.py            # 16 prompts of each set, K=8, 48 new tokens
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from bench_sampling import hh_prompts, sampling_parser  # noqa: E402


def tokens_per_pair(pairs, batch_size: int) -> dict:
    from dpokit.batching import Layout
    from dpokit.config import TrainConfig
    from dpokit.schedule import prompt_groups, step_schedule

    tc = TrainConfig(batch_size=batch_size, epochs=1)
    layouts = {
        "padded": (Layout(), None),
        "prefix-shared pairs": (Layout(prefix_share=True, share_completions=False), None),
        "shared branches": (Layout(prefix_share=True), prompt_groups(pairs)),
    }
    out = {}
    for name, (layout, groups) in layouts.items():
        total = 0
        for step in step_schedule(len(pairs), tc, 1, groups):
            for micro in step:
                total += layout.pairs([pairs[i] for i in micro], pad_id=0).num_tokens
        out[name] = round(total / len(pairs), 1)
    return out


def main() -> None:
    ap = sampling_parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from dpokit import models
    from dpokit.data.prompts import load_prompts
    from dpokit.generate import SamplingSettings, sample
    from dpokit.pairing import pair_indices
    from dpokit.rewards import get_reward
    from dpokit.tokenize import TokenizedPair, encode_completion

    path = models.resolve_model_path(models.SMOLLM2_ALIAS)
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path).eval().requires_grad_(False)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, bf16=True, seed=2)
    sets = {
        "reviews": (load_prompts("builtin:reviews", "train", args.prompts), "vader"),
        "hh": (hh_prompts(args.prompts, tokenizer, 192), "length"),
    }
    results = {}
    with torch.no_grad():
        for name, (prompts, reward_spec) in sets.items():
            drawn = sample(model, tokenizer, prompts, args.k, settings, progress=False)
            reward = get_reward(reward_spec)
            for rule in ("best_worst", "all_pairs"):
                pairs = []
                for prompt, row in zip(prompts, drawn, strict=True):
                    scores = reward([prompt] * len(row), [s.completion for s in row])
                    found, _ = pair_indices(scores, rule, 0.0)
                    ids = {
                        k: encode_completion(prompt, row[k].prompt_ids, row[k].completion, tokenizer, "", "")
                        for pair in found
                        for k in pair
                    }
                    pairs += [TokenizedPair(row[0].prompt_ids, ids[i], ids[j]) for i, j in found]
                figures = tokens_per_pair(pairs, args.batch_size)
                results[f"{name} {rule}"] = {"pairs": len(pairs), "tokens_per_pair": figures}
                pad = figures["padded"]
                print(
                    f"{name:8}{rule:11} {len(pairs):4} pairs  tokens/pair: "
                    + ", ".join(f"{k} {v} ({v / pad:.2f}x)" for k, v in figures.items())
                )
    print(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
