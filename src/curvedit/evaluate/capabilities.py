"""A capability suite in the paper's families, generated offline and seeded, for small LMs.

The paper measures what an edit keeps by families of downstream tasks (logic, open-book QA,
closed-book facts common and rare, arithmetic). This module generates such families for
models too small for the real benchmarks, each item in both formats `run_tasks` scores:

- generate: greedy exact match of the answer after a few-shot prefix of three solved items
  of the same family (the output is cut at the first newline);
- choice: the answer among distractors of the same kind, by summed log-likelihood.

Families and their bands (`BANDS`):

| family | band | items |
|---|---|---|
| boolean | logic | "not True and False is" -> False (the 32 two-operand expressions) |
| syllogism | logic | "Every wug is red. Ana is a wug. Is Ana red?" -> Yes / No |
| ordering | logic | "Ana is older than Ben. Ben is older than Cal. Who is the oldest?" |
| open_book | open-book QA | "Context: Ana's pet is a goat. Question: What is Ana's pet? Answer:" |
| cloze | cloze | "Tom put the keys in the drawer and the book on the shelf. ... the book on the" |
| facts_common | closed-book common | capitals of populous countries, official languages, element symbols |
| facts_rare | closed-book rare | capitals of small countries, currencies |
| add_1d, add_2d, sub_1d, sub_2d | arithmetic | "34 + 58 =" -> 92 |
| copying | copying/pattern | repeat four words |
| counting, alphabet | copying/pattern | continue "3, 5, 7, 9," or "c d e f g" |

A family enters a retention table only when the unedited model scores clearly above chance
(`usable`): the lower end of the accuracy's 95% Wilson interval must exceed chance by
`margin`. Chance is 1/choices for a choice item and, for a generate item, 1/size of the
answer space in families with a closed one (Yes/No, True/False, the names in an ordering
puzzle), else 0.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from curvedit.data import write_jsonl
from curvedit.errors import EvaluateError
from curvedit.evaluate.intervals import wilson
from curvedit.evaluate.tasks import ChoiceItem, GenerateItem, Task, TaskResult

Format = Literal["generate", "choice"]
FORMATS: tuple[str, ...] = ("generate", "choice")


@dataclass(frozen=True)
class Case:
    """One solved item, before it is put in a format.

    Attributes:
        prompt: the question, ending where the answer starts (no trailing space).
        answer: the answer (first of `accepted` in the generate format).
        distractors: wrong answers of the same kind (the choice format's other options).
        accepted: other spellings accepted in the generate format.
    """

    prompt: str
    answer: str
    distractors: tuple[str, ...]
    accepted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """A generator of one capability family.

    Attributes:
        name: the family (task) name.
        band: the paper's band it belongs to.
        make: (rng) -> one `Case`; called once per item and per few-shot example.
        answer_space: the number of possible answers in the generate format when it is closed
            (2 for Yes/No), else None (chance 0).
        max_new_tokens: generation length.
        limit: the most distinct items (a fact list's length), else None.
    """

    name: str
    band: str
    make: Callable[[random.Random], Case]
    answer_space: int | None = None
    max_new_tokens: int = 6
    limit: int | None = None


# ---- closed-book facts -----------------------------------------------------------------

CAPITALS_COMMON = {
    "China": "Beijing", "India": "New Delhi", "the United States": "Washington", "Indonesia": "Jakarta",
    "Pakistan": "Islamabad", "Nigeria": "Abuja", "Brazil": "Brasilia", "Bangladesh": "Dhaka", "Russia": "Moscow",
    "Mexico": "Mexico City", "Japan": "Tokyo", "Ethiopia": "Addis Ababa", "the Philippines": "Manila",
    "Egypt": "Cairo", "Vietnam": "Hanoi", "Iran": "Tehran", "Turkey": "Ankara", "Germany": "Berlin",
    "Thailand": "Bangkok", "the United Kingdom": "London", "France": "Paris", "Italy": "Rome", "Kenya": "Nairobi",
    "South Korea": "Seoul", "Colombia": "Bogota", "Spain": "Madrid", "Argentina": "Buenos Aires",
    "Algeria": "Algiers", "Sudan": "Khartoum", "Ukraine": "Kyiv", "Iraq": "Baghdad", "Afghanistan": "Kabul",
    "Poland": "Warsaw", "Canada": "Ottawa", "Morocco": "Rabat", "Saudi Arabia": "Riyadh", "Peru": "Lima",
    "Malaysia": "Kuala Lumpur", "Venezuela": "Caracas", "Australia": "Canberra", "Greece": "Athens",
    "Portugal": "Lisbon", "Sweden": "Stockholm", "Norway": "Oslo", "Cuba": "Havana", "Chile": "Santiago",
    "Austria": "Vienna", "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Ireland": "Dublin", "Denmark": "Copenhagen", "Finland": "Helsinki",
}
LANGUAGES_COMMON = {
    "France": "French", "Germany": "German", "Spain": "Spanish", "Italy": "Italian", "Japan": "Japanese",
    "Russia": "Russian", "Portugal": "Portuguese", "Brazil": "Portuguese", "Mexico": "Spanish", "Greece": "Greek",
    "Turkey": "Turkish", "Poland": "Polish", "Sweden": "Swedish", "Norway": "Norwegian", "Finland": "Finnish",
    "the Netherlands": "Dutch", "South Korea": "Korean", "Vietnam": "Vietnamese", "Thailand": "Thai",
    "Egypt": "Arabic", "Saudi Arabia": "Arabic", "Israel": "Hebrew", "Denmark": "Danish", "Hungary": "Hungarian",
    "Argentina": "Spanish", "England": "English", "Australia": "English", "Ukraine": "Ukrainian",
    "the Czech Republic": "Czech", "Romania": "Romanian", "Indonesia": "Indonesian", "Iran": "Persian",
}
SYMBOLS_COMMON = {
    "hydrogen": "H", "oxygen": "O", "carbon": "C", "nitrogen": "N", "helium": "He", "gold": "Au", "silver": "Ag",
    "iron": "Fe", "sodium": "Na", "calcium": "Ca", "sulfur": "S", "copper": "Cu", "neon": "Ne", "chlorine": "Cl",
    "potassium": "K", "lead": "Pb",
}
CAPITALS_RARE = {
    "Bhutan": "Thimphu", "Malawi": "Lilongwe", "Tuvalu": "Funafuti", "Eritrea": "Asmara",
    "Burkina Faso": "Ouagadougou", "Moldova": "Chisinau", "Kyrgyzstan": "Bishkek", "Tajikistan": "Dushanbe",
    "Turkmenistan": "Ashgabat", "Lesotho": "Maseru", "Botswana": "Gaborone", "Namibia": "Windhoek",
    "Zambia": "Lusaka", "Zimbabwe": "Harare", "Mozambique": "Maputo", "Madagascar": "Antananarivo",
    "Mauritius": "Port Louis", "Gabon": "Libreville", "Togo": "Lome", "Niger": "Niamey", "Mali": "Bamako",
    "Mauritania": "Nouakchott", "Chad": "N'Djamena", "Rwanda": "Kigali", "Sierra Leone": "Freetown",
    "Liberia": "Monrovia", "Guinea": "Conakry", "Gambia": "Banjul", "Cape Verde": "Praia", "Laos": "Vientiane",
    "Cambodia": "Phnom Penh", "Mongolia": "Ulaanbaatar", "Nepal": "Kathmandu", "Brunei": "Bandar Seri Begawan",
    "Fiji": "Suva", "Samoa": "Apia", "Vanuatu": "Port Vila", "Suriname": "Paramaribo", "Guyana": "Georgetown",
    "Belize": "Belmopan", "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Paraguay": "Asuncion",
    "Uruguay": "Montevideo", "Latvia": "Riga", "Lithuania": "Vilnius", "Estonia": "Tallinn",
    "Slovenia": "Ljubljana", "Slovakia": "Bratislava", "North Macedonia": "Skopje", "Albania": "Tirana",
    "Montenegro": "Podgorica", "Liechtenstein": "Vaduz", "Malta": "Valletta", "Iceland": "Reykjavik",
    "Armenia": "Yerevan", "Azerbaijan": "Baku", "Oman": "Muscat", "Qatar": "Doha",
    "Bahrain": "Manama", "Yemen": "Sanaa",
}
CURRENCIES_RARE = {
    "Poland": "zloty", "Hungary": "forint", "Thailand": "baht", "Vietnam": "dong", "Sweden": "krona",
    "South Africa": "rand", "Brazil": "real", "Israel": "shekel", "Malaysia": "ringgit", "Indonesia": "rupiah",
    "Nigeria": "naira", "Ukraine": "hryvnia", "Romania": "leu", "Cambodia": "riel",
    "Laos": "kip", "Bangladesh": "taka", "Ghana": "cedi", "Peru": "sol", "Armenia": "dram",
    "Azerbaijan": "manat", "Botswana": "pula", "Zambia": "kwacha", "Paraguay": "guarani", "Guatemala": "quetzal",
}
ACCEPTED = {"Washington": ("Washington, D.C.", "Washington D.C.", "Washington DC"), "Brasilia": ("Brasília",),
            "Bogota": ("Bogotá",), "Kyiv": ("Kiev",), "Chisinau": ("Chișinău", "Kishinev"), "Lome": ("Lomé",),
            "Asuncion": ("Asunción",), "Reykjavik": ("Reykjavík",), "Sanaa": ("Sana'a", "Sana"),
            "Ulaanbaatar": ("Ulan Bator",), "New Delhi": ("Delhi",)}

FactTable = tuple[str, dict[str, str]]  # (template with one {}, subject -> answer)
FACTS_COMMON: tuple[FactTable, ...] = (("The capital of {} is", CAPITALS_COMMON),
                                       ("The official language of {} is", LANGUAGES_COMMON),
                                       ("The chemical symbol for {} is", SYMBOLS_COMMON))
FACTS_RARE: tuple[FactTable, ...] = (("The capital of {} is", CAPITALS_RARE),
                                     ("The currency of {} is the", CURRENCIES_RARE))


def _fact_cases(tables: Sequence[FactTable]) -> list[Case]:
    """Every fact of the tables as a case; distractors are three other answers of the same table."""
    cases = []
    for template, table in tables:
        answers = sorted(set(table.values()))
        for subject, answer in sorted(table.items()):
            others = [a for a in answers if a != answer]
            picked = random.Random(f"{template}:{subject}").sample(others, 3)
            cases.append(Case(template.format(subject), answer, tuple(picked), ACCEPTED.get(answer, ())))
    return cases


def _fact_family(name: str, band: str, tables: Sequence[FactTable]) -> Family:
    cases = _fact_cases(tables)
    return Family(name, band, lambda rng: rng.choice(cases), max_new_tokens=8, limit=len(cases))


# ---- logic -----------------------------------------------------------------------------

NAMES = ("Ana", "Ben", "Cal", "Dora", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kim", "Leo", "Mia", "Ned",
         "Omar", "Pia", "Raj", "Sara", "Tom", "Uma")
NONSENSE = ("wug", "blicket", "dax", "fep", "zorp", "toma", "glorb", "kiki")
PROPERTIES = ("red", "heavy", "soft", "round", "loud", "cold", "tall", "shiny")


def _boolean(rng: random.Random) -> Case:
    def operand() -> tuple[str, bool]:
        value = rng.random() < 0.5
        return (f"not {value}", not value) if rng.random() < 0.5 else (str(value), value)

    (text_a, a), (text_b, b) = operand(), operand()
    op = rng.choice(("and", "or"))
    value = (a and b) if op == "and" else (a or b)
    return Case(f"{text_a} {op} {text_b} is", str(value), (str(not value),))


def _syllogism(rng: random.Random) -> Case:
    name, kind = rng.choice(NAMES), rng.choice(NONSENSE)
    prop, other = rng.sample(PROPERTIES, 2)
    form = rng.randrange(4)
    if form == 0:
        prompt, answer = f"Every {kind} is {prop}. {name} is a {kind}. Is {name} {prop}? Answer:", "Yes"
    elif form == 1:
        prompt, answer = f"No {kind} is {prop}. {name} is a {kind}. Is {name} {prop}? Answer:", "No"
    elif form == 2:
        prompt, answer = f"Every {kind} is {prop}. {name} is not {prop}. Is {name} a {kind}? Answer:", "No"
    else:
        prompt, answer = (f"If {name} is {prop}, then {name} is {other}. {name} is {prop}. Is {name} {other}? "
                          "Answer:", "Yes")
    return Case(prompt, answer, ("No" if answer == "Yes" else "Yes",))


def _ordering(rng: random.Random) -> Case:
    people = rng.sample(NAMES, 3)  # people[0] has the most of the quality
    comparative, most, least = rng.choice((("older", "oldest", "youngest"), ("taller", "tallest", "shortest"),
                                           ("faster", "fastest", "slowest")))
    facts = [f"{people[0]} is {comparative} than {people[1]}.", f"{people[1]} is {comparative} than {people[2]}."]
    rng.shuffle(facts)
    ask_most = rng.random() < 0.5
    answer = people[0] if ask_most else people[2]
    prompt = f"{' '.join(facts)} Who is the {most if ask_most else least}? Answer:"
    return Case(prompt, answer, tuple(p for p in people if p != answer))


# ---- reading ---------------------------------------------------------------------------

LIKES = ("pears", "apples", "plums", "grapes", "lemons", "cherries", "melons", "peaches")
PLACES = (("in the drawer", "drawer"), ("on the shelf", "shelf"), ("under the bed", "bed"), ("in the box", "box"),
          ("on the table", "table"), ("in the bag", "bag"), ("behind the door", "door"), ("in the car", "car"))
THINGS = ("keys", "book", "phone", "ball", "hat", "cup", "coins", "map")


ATTRIBUTES = (("favourite fruit", LIKES), ("favourite colour", ("green", "blue", "yellow", "purple", "orange",
                                                                   "black", "white", "brown")),
              ("pet", ("a cat", "a dog", "a parrot", "a rabbit", "a goat", "a turtle", "a horse", "a hamster")),
              ("home town", ("Leeds", "Lyon", "Porto", "Turin", "Ghent", "Bergen", "Krakow", "Graz")))


def _open_book(rng: random.Random) -> Case:
    person = rng.choice(NAMES)
    attribute, values = rng.choice(ATTRIBUTES)
    value, *others = rng.sample(values, 4)
    prompt = f"Context: {person}'s {attribute} is {value}. Question: What is {person}'s {attribute}? Answer:"
    return Case(prompt, value, tuple(others))


def _cloze(rng: random.Random) -> Case:
    name = rng.choice(NAMES)
    (place_a, word_a), (place_b, word_b) = rng.sample(PLACES, 2)
    thing_a, thing_b = rng.sample(THINGS, 2)
    asked_a = rng.random() < 0.5
    thing, place = (thing_a, place_a) if asked_a else (thing_b, place_b)
    lead = place.rsplit(" ", 1)[0]
    prompt = f"{name} put the {thing_a} {place_a} and the {thing_b} {place_b}. Later, {name} found the {thing} {lead}"
    return Case(prompt, word_a if asked_a else word_b, (word_b if asked_a else word_a,))


# ---- arithmetic and patterns -----------------------------------------------------------

def _arithmetic(op: str, low: int, high: int) -> Callable[[random.Random], Case]:
    def make(rng: random.Random) -> Case:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b
        near = [value + d for d in (1, -1, 10, -10, 2, -2) if value + d >= 0]
        return Case(f"{a} {op} {b} =", str(value), tuple(str(v) for v in near[:3]))
    return make


WORDS = ("apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "bread", "horse", "window", "candle",
         "mountain", "silver", "paper", "orange", "bottle", "forest", "pencil", "violin", "castle")


def _copying(rng: random.Random) -> Case:
    words = rng.sample(WORDS, 4)
    wrong = [" ".join(words[:2] + words[2:][::-1]), " ".join(words[1:] + words[:1]), " ".join(words[::-1])]
    return Case(f"Repeat: {' '.join(words)}. Output:", " ".join(words), tuple(wrong))


def _counting(rng: random.Random) -> Case:
    start, step = rng.randint(1, 20), rng.randint(1, 5)
    terms = [start + step * i for i in range(5)]
    nxt = terms[4]
    wrong = list(dict.fromkeys(v for v in (nxt + 1, nxt - 1, terms[3], nxt + 2) if v != nxt))[:3]
    return Case(", ".join(map(str, terms[:4])) + ",", str(nxt), tuple(map(str, wrong)))


def _alphabet(rng: random.Random) -> Case:
    letters = string.ascii_lowercase
    start = rng.randint(0, len(letters) - 6)
    nxt = letters[start + 5]
    return Case(" ".join(letters[start:start + 5]), nxt,
                tuple(c for c in (letters[start + 4], letters[(start + 7) % 26], letters[start]) if c != nxt))


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("boolean", "logic", _boolean, answer_space=2, max_new_tokens=3, limit=32),
    Family("syllogism", "logic", _syllogism, answer_space=2, max_new_tokens=3),
    Family("ordering", "logic", _ordering, answer_space=3, max_new_tokens=4),
    Family("open_book", "open-book QA", _open_book, max_new_tokens=5),
    Family("cloze", "cloze", _cloze, answer_space=2, max_new_tokens=3),
    _fact_family("facts_common", "closed-book common", FACTS_COMMON),
    _fact_family("facts_rare", "closed-book rare", FACTS_RARE),
    Family("add_1d", "arithmetic", _arithmetic("+", 1, 9), max_new_tokens=4),
    Family("add_2d", "arithmetic", _arithmetic("+", 10, 99), max_new_tokens=5),
    Family("sub_1d", "arithmetic", _arithmetic("-", 1, 9), max_new_tokens=4),
    Family("sub_2d", "arithmetic", _arithmetic("-", 10, 99), max_new_tokens=5),
    Family("copying", "copying/pattern", _copying, max_new_tokens=12),
    Family("counting", "copying/pattern", _counting, max_new_tokens=4),
    Family("alphabet", "copying/pattern", _alphabet, answer_space=None, max_new_tokens=3),
)}
BANDS: tuple[str, ...] = tuple(dict.fromkeys(f.band for f in FAMILIES.values()))
SHOTS = 3


def _distinct_cases(family: Family, n: int, rng: random.Random) -> list[Case]:
    """Up to `n` cases with distinct prompts (fewer when the family has fewer)."""
    wanted = min(n, family.limit) if family.limit is not None else n
    cases: dict[str, Case] = {}
    attempts = 0
    while len(cases) < wanted and attempts < 50 * wanted + 100:
        case = family.make(rng)
        cases.setdefault(case.prompt, case)
        attempts += 1
    return list(cases.values())


def family_items(family: Family, n: int, seed: int, fmt: Format) -> list[GenerateItem | ChoiceItem]:
    """`n` items of one family (fewer when a fact list is shorter), each after three solved
    examples of the same family with other prompts.

    Args:
        family: the family.
        n: items wanted.
        seed: the generator seed (the family name is mixed in, so families differ).
        fmt: "generate" or "choice".

    Returns:
        The items; the same seed gives the same prompts and few-shot prefixes in both formats.
    """
    rng = random.Random(f"{seed}:{family.name}")
    cases = _distinct_cases(family, n, rng)
    items: list[GenerateItem | ChoiceItem] = []
    for line, case in enumerate(cases, start=1):
        shots: dict[str, Case] = {}
        for _ in range(50 * SHOTS):  # a family of few distinct prompts gets fewer shots
            shot = family.make(rng)
            if shot.prompt != case.prompt:
                shots.setdefault(shot.prompt, shot)
            if len(shots) == SHOTS:
                break
        fewshot = "".join(f"{s.prompt} {s.answer}\n" for s in shots.values())
        if fmt == "generate":
            items.append(GenerateItem(case.prompt, (case.answer, *case.accepted), fewshot, family.max_new_tokens,
                                      line))
        else:
            options = [case.answer, *case.distractors]
            order = list(range(len(options)))
            random.Random(f"{seed}:{family.name}:{line}").shuffle(order)  # apart from `rng`: formats share shots
            items.append(ChoiceItem(case.prompt, tuple(" " + options[i] for i in order), order.index(0), fewshot,
                                    False, line))
    return items


def capability_tasks(families: Sequence[str] | None = None, n: int = 100, seed: int = 0,
                     fmt: Format = "generate") -> list[Task]:
    """The suite as `Task`s for `curvedit.evaluate.tasks.run_tasks`.

    Args:
        families: family names (default: all, in `FAMILIES` order).
        n: items per family (fact families have at most their list's length).
        seed: generator seed.
        fmt: "generate" or "choice".

    Returns:
        One task per family, named after it.

    Raises:
        EvaluateError: an unknown family or format, or n < 1.
    """
    names = list(FAMILIES) if families is None else list(families)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise EvaluateError(f"unknown capability famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                            f"choose from {list(FAMILIES)}")
    if fmt not in FORMATS:
        raise EvaluateError(f"unknown task format {fmt!r}; choose one of {FORMATS}")
    if n < 1:
        raise EvaluateError(f"items per family must be >= 1, got {n}")
    return [Task(name=name, path=Path(f"<capability:{name}:{fmt}>"),
                 items=tuple(family_items(FAMILIES[name], n, seed, fmt))) for name in names]


def _item_row(item: GenerateItem | ChoiceItem) -> dict:
    if isinstance(item, GenerateItem):
        return {"type": "generate", "prompt": item.prompt, "answer": list(item.answers), "fewshot": item.fewshot,
                "max_new_tokens": item.max_new_tokens}
    return {"type": "choice", "prompt": item.prompt, "choices": list(item.choices), "answer": item.answer,
            "fewshot": item.fewshot}


def write_tasks(tasks: Sequence[Task], out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write tasks as a tasks directory (`NAME.jsonl` each) that `evaluate --tasks` reads.

    Args:
        tasks: the tasks (from `capability_tasks`).
        out_dir: the folder (created).
        overwrite: replace existing task files.

    Returns:
        The files written.

    Raises:
        FileExistsError: a task file exists and `overwrite` is False.
    """
    return [write_jsonl([_item_row(item) for item in task.items], Path(out_dir) / f"{task.name}.jsonl",
                        overwrite=overwrite) for task in tasks]


def chance(result: TaskResult) -> float:
    """Accuracy of guessing on a scored task: per choice item 1/choices, per generate item
    1/answer space for a suite family with a closed one (Yes/No, ...), else 0; averaged."""
    if not result.details:
        return 0.0
    family = FAMILIES.get(result.name)
    space = family.answer_space if family is not None else None
    levels = [1 / len(d["scores"]) if d.get("type") == "choice" else (1 / space if space else 0.0)
              for d in result.details]
    return sum(levels) / len(levels)


@dataclass(frozen=True)
class FamilyScore:
    """A family's accuracy with its interval, its chance level and whether it is usable.

    Attributes:
        family: the family name.
        band: its band.
        correct: items answered correctly.
        n: items scored.
        chance: the accuracy of guessing.
        usable: the lower end of the 95% interval is above chance + margin.
    """

    family: str
    band: str
    correct: int
    n: int
    chance: float
    usable: bool

    @property
    def accuracy(self) -> float:
        """Correct / n."""
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        """JSON-ready, with the accuracy and its Wilson interval."""
        interval = wilson(self.correct, self.n)
        return {"family": self.family, "band": self.band, "accuracy": self.accuracy, "correct": self.correct,
                "n": self.n, "ci": [interval.low, interval.high], "chance": self.chance, "usable": self.usable}


def score_families(results: Sequence[TaskResult], margin: float = 0.1) -> list[FamilyScore]:
    """Turn `run_tasks` results into family scores with their chance level and usability.

    Args:
        results: results of `run_tasks` (the suite's families, or any task files: a task
            that is not a suite family gets band "custom").
        margin: how far above chance the lower end of the 95% interval must be for a family
            to be usable.

    Returns:
        One `FamilyScore` per result, in order.
    """
    scores = []
    for result in results:
        level = chance(result)
        correct = sum(bool(d["correct"]) for d in result.details)
        low = wilson(correct, result.n).low if result.n else 0.0
        band = FAMILIES[result.name].band if result.name in FAMILIES else "custom"
        scores.append(FamilyScore(result.name, band, correct, result.n, level, low > level + margin))
    return scores


def retention(edited: dict[str, float], reference: dict[str, float], families: Sequence[str]) -> dict[str, float]:
    """Per family, edited accuracy / reference accuracy (families the reference scores 0 are left out)."""
    return {f: edited[f] / reference[f] for f in families if reference.get(f) and f in edited}
