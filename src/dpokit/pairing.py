"""From sampled completions to preference pairs, as the rounds make them: scores (a reward, or a pairwise judge
in a round robin), the missing-EOS penalty, the pairing rules, and the counts a round reports. Pure
functions of the samples and their scores."""

from __future__ import annotations


def pair_indices(scores: list[float], rule: str, min_gap: float) -> tuple[list[tuple[int, int]], int]:
    """(chosen index, rejected index) pairs of one prompt's samples, and how many were ties (score gap <=
    min_gap) and dropped. best_worst: the first highest against the first lowest score; all_pairs: every
    pair of samples, better one first."""
    if rule == "best_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] - scores[worst] <= min_gap:
            return [], 1
        return [(best, worst)], 0
    pairs, ties = [], 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if abs(scores[i] - scores[j]) <= min_gap:
                ties += 1
            else:
                pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs, ties


def penalized(
    scores: list[float],
    finished: list[bool],
    penalty: float,
    lengths: list[int] | None = None,
    per_token: float = 0.0,
) -> list[float]:
    """TRL's missing_eos_penalty (a completion cut at max_new_tokens loses `penalty`), and a length penalty
    of `per_token` per completion token (reward models buy reward with length: this prices it)."""
    lengths = lengths or [0] * len(scores)
    return [
        (s if done else s - penalty) - per_token * n
        for s, done, n in zip(scores, finished, lengths, strict=True)
    ]


def judge_scores(judge, prompt: str, completions: list[str]) -> list[float]:
    """Each completion's mean probability of beating the prompt's other completions (a round robin, both
    orders, so a judge's position bias cancels)."""
    k = len(completions)
    wins = [0.0] * k
    for i in range(k):
        for j in range(k):
            if i != j:
                p = judge(prompt, completions[i], completions[j])
                wins[i] += p
                wins[j] += 1.0 - p
    return [w / (2 * (k - 1)) for w in wins]


def make_pairs(samples: list[dict], scores: list[dict], rule: str, min_gap: float):
    """(pairs as preference records, ties dropped, identical texts dropped, score margins) of a round's
    samples (one record per prompt: `prompt`, `completions`) and their penalized `scores`."""
    pairs, ties, identical, margins = [], 0, 0, []
    for s, sc in zip(samples, scores, strict=True):
        found, t = pair_indices(sc["scores"], rule, min_gap)
        ties += t
        for i, j in found:
            chosen, rejected = s["completions"][i], s["completions"][j]
            if chosen.strip() == rejected.strip():  # a reward of the text cannot tell them apart
                identical += 1
                continue
            margins.append(sc["scores"][i] - sc["scores"][j])
            pairs.append(
                {
                    "prompt": s["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "score_chosen": sc["scores"][i],
                    "score_rejected": sc["scores"][j],
                }
            )
    return pairs, ties, identical, margins


def pair_stats(samples, scores, pairs, ties: int, identical: int, margins: list[float]) -> dict:
    """A round's pairing counts: prompts, samples, pairs, ties and identical texts dropped, mean score and
    margin, EOS share and mean length of the samples."""
    all_scores = [x for sc in scores for x in sc["scores"]]
    finished = [f for s in samples for f in s["finished"]]
    lengths = [n for s in samples for n in s["lengths"]]
    return {
        "prompts": len(samples),
        "samples": len(all_scores),
        "pairs": len(pairs),
        "ties_dropped": ties,
        "identical_dropped": identical,
        "score/mean": sum(all_scores) / len(all_scores),
        "score_margin/mean": sum(margins) / len(margins),
        "eos_share": sum(finished) / len(finished),
        "length/mean": sum(lengths) / len(lengths),
    }
