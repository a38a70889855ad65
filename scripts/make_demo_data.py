"""Write src/dpokit/assets/demo_prefs.jsonl: the preference set `make demo` trains on.

Each pair prefers a concise, correct answer over a verbose one (filler around the right answer), a wrong
one, or both. Deterministic (seeded); rerun after editing to regenerate the shipped file.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "dpokit" / "assets" / "demo_prefs.jsonl"

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "India": "New Delhi",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Hungary": "Budapest",
    "Netherlands": "Amsterdam",
    "South Korea": "Seoul",
    "Vietnam": "Hanoi",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "old": "young",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "strong": "weak",
    "rich": "poor",
    "wet": "dry",
    "near": "far",
    "loud": "quiet",
    "thick": "thin",
    "clean": "dirty",
    "cheap": "expensive",
    "first": "last",
    "inside": "outside",
    "true": "false",
    "win": "lose",
    "push": "pull",
    "buy": "sell",
    "day": "night",
    "begin": "end",
}
PLURALS = {
    "child": "children",
    "mouse": "mice",
    "tooth": "teeth",
    "foot": "feet",
    "man": "men",
    "woman": "women",
    "goose": "geese",
    "person": "people",
    "leaf": "leaves",
    "knife": "knives",
    "box": "boxes",
    "city": "cities",
    "baby": "babies",
    "wolf": "wolves",
    "cactus": "cacti",
    "ox": "oxen",
    "sheep": "sheep",
    "fish": "fish",
    "potato": "potatoes",
    "hero": "heroes",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OPENERS = [
    "Great question! Let me think about this carefully before I answer.",
    "Thank you so much for asking, I am always happy to help with questions like this one.",
    "Well, that is a really interesting thing to wonder about, and there is a lot one could say.",
    "Sure! Before answering, it is worth taking a moment to consider the question from every angle.",
    "Absolutely, I would be delighted to help you with that. Let me explain it step by step.",
    "Hmm, this is the kind of question that many people ask, so let me walk you through it.",
]
CLOSERS = [
    "I hope this helps, and please let me know if you have any other questions!",
    "Let me know if there is anything else at all that I can help you with today.",
    "Feel free to ask me more questions like this whenever you want.",
    "I hope that answers your question clearly and completely!",
    "Please do not hesitate to reach out again if anything is unclear.",
]


def verbose(answer: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} The answer is {answer}. {rng.choice(CLOSERS)}"


def items(rng: random.Random):
    for country, city in CAPITALS.items():
        wrong = rng.choice([c for c in CAPITALS.values() if c != city])
        yield f"What is the capital of {country}?", f"{city}.", f"{wrong}.", city, wrong
    for word, opp in OPPOSITES.items():
        wrong = rng.choice([o for o in OPPOSITES.values() if o != opp])
        yield (
            f"What is the opposite of '{word}'?",
            f"{opp.capitalize()}.",
            f"{wrong.capitalize()}.",
            opp,
            wrong,
        )
    for word, plural in PLURALS.items():
        wrong = word + "s" if plural != word + "s" else word + "es"
        yield (
            f"What is the plural of '{word}'?",
            f"{plural.capitalize()}.",
            f"{wrong.capitalize()}.",
            plural,
            wrong,
        )
    for i, day in enumerate(DAYS):
        nxt, wrong = DAYS[(i + 1) % 7], DAYS[(i + 3) % 7]
        yield f"Which day comes after {day}?", f"{nxt}.", f"{wrong}.", nxt, wrong
    for _ in range(250):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 10])
        phrasing = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?"])
        yield phrasing.format(a=a, op=op, b=b), f"{value}.", f"{wrong}.", str(value), str(wrong)


def main() -> None:
    rng = random.Random(1234)
    rows, seen = [], set()
    for question, good, wrong_short, answer, wrong in items(rng):
        if question in seen:
            continue
        seen.add(question)
        kind = rng.choices(["verbose", "wrong", "verbose_wrong"], weights=[2, 1, 1])[0]
        rejected = {
            "verbose": verbose(answer, rng),
            "wrong": wrong_short,
            "verbose_wrong": verbose(wrong, rng),
        }[kind]
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "kind": kind,
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} pairs to {OUT}")


if __name__ == "__main__":
    main()
