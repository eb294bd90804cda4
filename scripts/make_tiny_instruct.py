"""Generate plugin/data/tiny_instruct.jsonl, the instruction dataset shipped with the package.

Short templated tasks (arithmetic, word games, a capitals table, opposites) in Alpaca rows
(`instruction`, `input`, `output`). Answers are short and follow learnable rules, so a tiny
byte-level model visibly lowers its validation loss within minutes on a CPU.

Usage: python scripts/make_tiny_instruct.py [--rows 1600] [--out plugin/data/tiny_instruct.jsonl]
"""

import argparse
import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud green table water light house dream tiger mouse horse bread "
    "chair music paper plant smile train earth flame grape honey lemon magic night ocean "
    "piano queen robot snake tower voice whale zebra angel beach candy dance eagle fruit "
    "ghost heart igloo jelly kite lucky melon north olive pearl quiet radio sugar tulip "
    "unity vivid windy yacht cat dog sun moon star tree book fish bird rain snow wind road "
    "ship gold king frog duck lamp ring door milk rice corn salt wolf bear lion goat seed "
    "leaf rose sand hill lake farm city code data byte loop"
).split()

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Russia": "Moscow",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Australia": "Canberra",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Cuba": "Havana",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Nepal": "Kathmandu",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Colombia": "Bogota",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "happy": "sad",
    "up": "down",
    "left": "right",
    "day": "night",
    "open": "closed",
    "light": "dark",
    "old": "new",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "high": "low",
    "long": "short",
    "rich": "poor",
    "strong": "weak",
    "wet": "dry",
    "loud": "quiet",
    "true": "false",
    "win": "lose",
    "in": "out",
    "first": "last",
    "thick": "thin",
    "heavy": "light",
    "begin": "end",
    "buy": "sell",
    "push": "pull",
    "clean": "dirty",
    "near": "far",
}


def make_row(rng: random.Random) -> dict:
    """One random row from a randomly chosen task."""

    def add():
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} + {b}?", "", str(a + b)

    def sub():
        a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
        return f"What is {a} - {b}?", "", str(a - b)

    def larger():
        a, b = rng.sample(range(100), 2)
        return f"Which is larger, {a} or {b}?", "", str(max(a, b))

    def after():
        n = rng.randint(0, 998)
        return f"What number comes after {n}?", "", str(n + 1)

    def reverse():
        w = rng.choice(WORDS)
        return "Reverse the word.", w, w[::-1]

    def upper():
        w = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        return "Convert to uppercase.", w, w.upper()

    def count():
        w = rng.choice(WORDS)
        return f'How many letters are in "{w}"?', "", str(len(w))

    def first():
        w = rng.choice(WORDS)
        return f'What is the first letter of "{w}"?', "", w[0]

    def spell():
        w = rng.choice(WORDS)
        return "Spell the word with dashes.", w, "-".join(w)

    def capital():
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", "", CAPITALS[country]

    def opposite():
        w = rng.choice(sorted(OPPOSITES))
        return f'What is the opposite of "{w}"?', "", OPPOSITES[w]

    tasks = [add, sub, larger, after, reverse, upper, count, first, spell, capital, opposite]
    return dict(zip(("instruction", "input", "output"), rng.choice(tasks)(), strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "plugin/data/tiny_instruct.jsonl")
    )
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows, seen = [], set()
    # Unique rows only, so a held-out validation row is never a copy of a training row.
    while len(rows) < args.rows:
        row = make_row(rng)
        key = (row["instruction"], row["input"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
