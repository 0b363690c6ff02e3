"""Generate the data shipped in minilora/data/, deterministically (python scripts/make_data.py).

Everything is made here from word lists and templates with a seeded `random.Random`, so the files
are reproducible bit for bit, carry no licence question, and need no network:

- corpus_train.txt / corpus_eval.txt: "general text", short English-like stories about a small
  world (people, trades, places, weather, animals, dialogue). A byte-level model learns its
  spelling and syntax in minutes on a CPU; it is the pretraining corpus and the forgetting probe.
- instruct_train.jsonl / instruct_eval.jsonl: Alpaca records from five tasks, each record tagged
  with `task`: upper (capitalise a sentence), reverse (spell a word backwards), add (sum two
  numbers), count (count the words), next (the number after n, an instruction with no input).
  Distinct tasks let one experiment train two adapters on different data.

`python scripts/make_data.py --check` verifies the shipped files match what this script makes.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "minilora" / "data"
SEED = 1234

NAMES = ["Ada", "Bram", "Cora", "Dov", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jory", "Kaia", "Lev",
         "Mira", "Nils", "Odile", "Piet", "Quinn", "Rosa", "Sten", "Tilde", "Ulla", "Vik", "Wren", "Yara"]
TRADES = ["miller", "baker", "smith", "weaver", "fisher", "potter", "shepherd", "carpenter", "healer",
          "farmer", "tailor", "brewer", "mason", "cooper", "scribe", "herbalist"]
PLACES = ["river", "mill", "market", "forest", "harbour", "bridge", "hill", "orchard", "tavern", "chapel",
          "meadow", "well", "lighthouse", "quarry", "village square", "old road"]
ANIMALS = ["fox", "heron", "goat", "crow", "dog", "cat", "owl", "horse", "hare", "badger", "sparrow", "ox"]
ADJ = ["old", "quiet", "bright", "cold", "small", "green", "tall", "grey", "warm", "narrow", "busy",
       "wet", "golden", "dark", "young", "patient", "clever", "tired", "proud", "gentle"]
WEATHER = ["rain", "fog", "snow", "wind", "sunlight", "mist", "frost", "thunder"]
TIMES = ["at dawn", "before noon", "in the evening", "at night", "after the storm", "on market day",
         "in early spring", "late in autumn", "during the harvest", "on the longest day"]
GOODS = ["bread", "wool", "fish", "apples", "nails", "rope", "cheese", "salt", "honey", "candles",
         "barley", "pots", "cloth", "lamp oil"]
VERBS_PAST = ["walked to", "ran to", "looked at", "returned to", "waited by", "sang near", "rested at",
              "worked at", "hurried past", "slept beside"]
VERBS_INTR = ["slept", "watched", "listened", "waited", "wandered", "called", "hid", "played"]
ADVERBS = ["quietly", "slowly", "all day", "for a while", "without a sound", "again", "happily", "alone"]
SAYINGS = ["The river gives and the river takes", "Bread tastes better after work",
           "Every road leads back to the square", "A quiet fox catches the most hens",
           "Mend the roof before the rain", "Good wool needs a patient hand"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentence(rng: random.Random) -> str:
    n, t, p = rng.choice(NAMES), rng.choice(TRADES), rng.choice(PLACES)
    a, g, w = rng.choice(ADJ), rng.choice(GOODS), rng.choice(WEATHER)
    kind = rng.randrange(10)
    if kind == 0:
        return f"{n} the {t} {rng.choice(VERBS_PAST)} the {p} {rng.choice(TIMES)}."
    if kind == 1:
        return f"The {a} {rng.choice(ANIMALS)} {rng.choice(VERBS_INTR)} {rng.choice(ADVERBS)} by the {p}."
    if kind == 2:
        return f"{n} sold {rng.randrange(2, 40)} baskets of {g} at the market for {rng.randrange(2, 90)} coins."
    if kind == 3:
        return f"The {w} came {rng.choice(TIMES)}, and the {p} was {a} and {rng.choice(ADJ)}."
    if kind == 4:
        return f"\"{rng.choice(SAYINGS)},\" said {n} to {rng.choice(NAMES)}."
    if kind == 5:
        return f"{n} was {_article(a)} {a} {t} who lived near the {p}."
    if kind == 6:
        return f"Nobody in the village could make {g} like {n} could."
    if kind == 7:
        return f"When the {w} stopped, {n} took the {g} to the {p}."
    if kind == 8:
        return f"The {p} is {rng.randrange(2, 12)} miles from the {rng.choice(PLACES)}, past the {rng.choice(PLACES)}."
    return f"{n} asked the {t} for {g}, but the {t} had none left."


def corpus(rng: random.Random, n_bytes: int) -> str:
    paragraphs, size = [], 0
    while size < n_bytes:
        para = " ".join(sentence(rng) for _ in range(rng.randrange(3, 8)))
        paragraphs.append(para)
        size += len(para) + 2
    return "\n\n".join(paragraphs) + "\n"


def short_sentence(rng: random.Random) -> str:
    while True:
        s = sentence(rng)
        if len(s) <= 48 and '"' not in s:
            return s


def instruction(rng: random.Random, task: str) -> dict:
    if task == "upper":
        s = short_sentence(rng)
        return {"instruction": "Rewrite the sentence in capital letters.", "input": s, "output": s.upper()}
    if task == "reverse":
        word = rng.choice(NAMES + TRADES + ANIMALS + ADJ + GOODS + WEATHER).lower()
        return {"instruction": "Spell the word backwards.", "input": word, "output": word[::-1]}
    if task == "add":
        a, b = rng.randrange(0, 100), rng.randrange(0, 100)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if task == "count":
        s = short_sentence(rng)
        return {"instruction": "How many words are in the sentence?", "input": s, "output": str(len(s.split()))}
    if task == "next":
        n = rng.randrange(0, 1000)
        return {"instruction": f"What number comes after {n}?", "input": "", "output": str(n + 1)}
    raise ValueError(task)


TASKS = ("upper", "reverse", "add", "count", "next")


def instructions(rng: random.Random, per_task: int) -> str:
    records = [dict(instruction(rng, task), task=task) for task in TASKS for _ in range(per_task)]
    rng.shuffle(records)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def generate() -> dict[str, bytes]:
    """File name -> content. Separate generators per file, so editing one file leaves the others."""
    return {
        "corpus_train.txt": corpus(random.Random(SEED), 700_000).encode(),
        "corpus_eval.txt": corpus(random.Random(SEED + 1), 40_000).encode(),
        "instruct_train.jsonl": instructions(random.Random(SEED + 2), 800).encode(),
        "instruct_eval.jsonl": instructions(random.Random(SEED + 3), 40).encode(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the shipped files instead of writing them")
    args = ap.parse_args(argv)
    files = generate()
    if args.check:
        bad = [n for n, data in files.items() if not (DATA / n).is_file() or (DATA / n).read_bytes() != data]
        if bad:
            print(f"make_data: out of date: {', '.join(bad)}", file=sys.stderr)
            return 1
        print("make_data: shipped data matches")
        return 0
    sys.path.insert(0, str(DATA.parent.parent))
    from reference_models.files import write_bytes_atomic

    for name, data in files.items():
        write_bytes_atomic(DATA / name, data)
        print(f"wrote {DATA / name} ({len(data):,} bytes)")
    print(f"total {sum(map(len, files.values())):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
