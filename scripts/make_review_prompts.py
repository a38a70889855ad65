"""Write src/dpokit/assets/reviews_prompts.jsonl: openings of movie reviews for the sentiment demo.

The DPO paper's first experiment (Rafailov et al. 2023, sec. 6.1) continues prefixes of IMDb reviews. No
data set can be downloaded here, so the prefixes are composed from review openers and film kinds. The
eval split uses openers that never occur in the train split, so held-out prompts are new sentences, not
new combinations of seen ones. Deterministic: rerunning gives the same file.
"""

import json
import random
from pathlib import Path

FILMS = [
    "horror movie",
    "romantic comedy",
    "war film",
    "documentary",
    "sequel",
    "animated feature",
    "thriller",
    "family film",
    "western",
    "science fiction film",
    "musical",
    "crime drama",
    "superhero movie",
    "remake",
    "indie film",
    "period drama",
]
TRAIN_OPENERS = [
    "I watched this {film} last night and",
    "This {film} is",
    "I went to see this {film} with my friends, and",
    "After all the hype, this {film}",
    "My wife and I rented this {film} and",
    "The director of this {film}",
    "I had high hopes for this {film}, but",
    "Honestly, this {film}",
    "The first twenty minutes of this {film}",
    "I caught this {film} on television and",
    "The lead actor in this {film}",
    "Watching this {film} was",
    "I don't usually write reviews, but this {film}",
    "The soundtrack of this {film}",
    "If you are thinking about seeing this {film},",
    "I saw this {film} at a festival and",
    "The ending of this {film}",
    "Everyone told me this {film}",
    "As a fan of the genre, I found this {film}",
    "The script of this {film}",
    "My kids begged me to take them to this {film}, and",
    "It is hard to describe this {film}, but",
    "The cinematography in this {film}",
    "I bought this {film} on DVD and",
    "Ten minutes into this {film}, I",
    "The cast of this {film}",
    "Compared to the book, this {film}",
    "I have mixed feelings about this {film}:",
    "From the opening scene, this {film}",
    "The special effects in this {film}",
    "Last weekend I finally saw this {film}, and",
    "The dialogue in this {film}",
    "I expected very little from this {film}, and",
    "This is the kind of {film} that",
    "The villain in this {film}",
    "On paper, this {film}",
    "I streamed this {film} on a rainy afternoon and",
    "The pacing of this {film}",
    "My brother recommended this {film}, and",
    "What struck me most about this {film}",
]
EVAL_OPENERS = [
    "I just got back from seeing this {film}, and",
    "The story of this {film}",
    "Years from now, people will say this {film}",
    "I rented this {film} without knowing anything about it, and",
    "The performances in this {film}",
    "Let me be clear about this {film}:",
    "My friends dragged me to this {film} and",
    "The trailer for this {film}",
    "Having read the reviews, I went into this {film}",
    "The second half of this {film}",
    "I watched this {film} twice, and",
    "There is something about this {film} that",
]


def main() -> None:
    rng = random.Random(0)
    rows = []
    for split, openers in (("train", TRAIN_OPENERS), ("eval", EVAL_OPENERS)):
        prompts = [o.format(film=f) for o in openers for f in FILMS]
        rng.shuffle(prompts)  # any prefix of the file's split is a mix of openers and films
        rows += [{"prompt": p, "split": split} for p in prompts]
    out = Path(__file__).resolve().parent.parent / "src" / "dpokit" / "assets" / "reviews_prompts.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
