"""Reasoning and knowledge probes for small pretrained LMs, generated offline and seeded.

Each family is a list of exact-match generation items (`curvedit.evaluate.tasks.GenerateItem`)
with a few-shot prefix, so `run_tasks` scores them. The study measures every family on the
unedited model first and keeps the ones it gets right often enough: a probe the model
already fails says nothing about what an edit removed.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from curvedit.evaluate.tasks import GenerateItem, Task

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
    "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok",
    "Turkey": "Ankara", "India": "New Delhi", "Argentina": "Buenos Aires", "Hungary": "Budapest",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels", "Chile": "Santiago",
    "Iran": "Tehran", "England": "London", "Mexico": "Mexico City", "South Korea": "Seoul",
}
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "bread", "horse", "window", "candle",
          "mountain", "silver", "paper", "orange", "bottle", "forest", "pencil", "violin", "castle")


def _fewshot(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"{q}{a}\n" for q, a in pairs)


def capitals(n: int, rng: random.Random) -> list[GenerateItem]:
    """"The capital of X is" -> city (three solved examples first)."""
    countries = list(CAPITALS)
    items = []
    for country in rng.sample(countries, min(n, len(countries))):
        shots = rng.sample([c for c in countries if c != country], 3)
        items.append(GenerateItem(prompt=f"The capital of {country} is", answers=(CAPITALS[country],),
                                  fewshot=_fewshot([(f"The capital of {c} is ", CAPITALS[c]) for c in shots]),
                                  max_new_tokens=6))
    return items


def addition(n: int, rng: random.Random) -> list[GenerateItem]:
    """Single-digit addition "a + b =" -> sum, three solved examples first."""
    items = []
    for _ in range(n):
        shots = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(3)]
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        items.append(GenerateItem(prompt=f"{a} + {b} =", answers=(str(a + b),),
                                  fewshot=_fewshot([(f"{x} + {y} = ", str(x + y)) for x, y in shots]),
                                  max_new_tokens=3))
    return items


def copying(n: int, rng: random.Random) -> list[GenerateItem]:
    """Repeat a list of four words after "Repeat:"."""
    def case() -> tuple[str, str]:
        words = " ".join(rng.sample(_WORDS, 4))
        return f"Repeat: {words}\nOutput: ", words

    items = []
    for _ in range(n):
        shots, (prompt, answer) = [case() for _ in range(2)], case()
        items.append(GenerateItem(prompt=prompt.rstrip(), answers=(answer,), fewshot=_fewshot(shots),
                                  max_new_tokens=12))
    return items


def counting(n: int, rng: random.Random) -> list[GenerateItem]:
    """Continue an arithmetic sequence "3, 5, 7, 9," -> next term."""
    items = []
    for _ in range(n):
        start, step = rng.randint(1, 20), rng.randint(1, 5)
        terms = [start + step * i for i in range(5)]
        items.append(GenerateItem(prompt=", ".join(map(str, terms[:4])) + ",", answers=(str(terms[4]),),
                                  max_new_tokens=3))
    return items


def alphabet(n: int, rng: random.Random) -> list[GenerateItem]:
    """Continue letters of the alphabet "c d e f" -> next letter."""
    letters = string.ascii_lowercase
    items = []
    for _ in range(n):
        start = rng.randint(0, len(letters) - 6)
        items.append(GenerateItem(prompt=" ".join(letters[start:start + 5]), answers=(letters[start + 5],),
                                  max_new_tokens=2))
    return items


FAMILIES = {"capitals": capitals, "addition": addition, "copying": copying, "counting": counting,
            "alphabet": alphabet}


def probe_tasks(n: int, seed: int) -> list[Task]:
    """One `Task` per family, `n` items each (capitals: at most one per known country)."""
    rng = random.Random(seed)
    return [Task(name=name, path=Path(f"<probe:{name}>"), items=tuple(make(n, rng))) for name, make in FAMILIES.items()]
