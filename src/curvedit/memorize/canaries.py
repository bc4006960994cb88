"""Canaries: texts implanted into a model so that it memorizes them under control.

A canary is a text with a style and a repeat count (how many times it appears in each
pass over the implant data). Generated canaries come in three styles, each seeded and
free of real facts:

- "words": a random sequence of common English words (pure verbatim memorization);
- "record": a fictitious biography or record with invented names, places, dates and
  numbers (memorized facts inside fluent text);
- "code": code-like text with random identifiers, hex constants and keys;
- "prose": natural English paragraphs, taken from the docstrings of Python standard-library
  modules (text that ships offline and is not in the study's general text, Python's language
  reference); consecutive prose paragraphs of one docstring are joined into passages of at
  least `PROSE_MIN_WORDS` words, and each canary gets its own passage (no two share text).
  The passages depend on the Python version's docstrings.

Repeat counts are drawn from a spread (by default 4, 8 and 16 repeats per pass), so some
canaries are memorized more deeply than others, as texts are in pretraining data.
"""

from __future__ import annotations

import functools
import importlib
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from curvedit.data import DataError, iter_jsonl

STYLES = ("words", "record", "code")
ALL_STYLES = (*STYLES, "prose")
PROSE_MIN_WORDS = 110
PROSE_MODULES = ("socketserver", "shelve", "sched", "csv", "tempfile", "calendar", "tokenize", "configparser", "timeit",
                 "threading", "queue", "selectors", "mailbox", "imaplib", "smtplib", "zipfile", "tarfile", "logging",
                 "pickle", "gettext", "decimal", "fractions", "statistics", "uuid", "weakref", "warnings",
                 "contextlib", "functools", "abc", "codecs", "locale", "json", "http.client", "http.server",
                 "urllib.request", "ftplib", "poplib", "wave", "colorsys", "hashlib", "hmac", "secrets", "ssl",
                 "signal", "mmap", "unittest", "doctest", "pdb", "dis", "ast", "site", "sysconfig", "venv", "runpy",
                 "importlib", "pkgutil", "base64", "binascii", "html", "ipaddress", "socket")
_CODE_LIKE = re.compile(r"[=#\[\]{}<>*`]|--|\w\(|\)\w|::|>>>|(^|\s)- ")

_WORDS = """
able about above across act add after again against age ago agree air all almost alone along already also always
among amount angle animal answer any appear apple area arm army around arrive art ask atom baby back bad ball band
bank bar base basic bear beat bed bell belt bench best better between big bird bit black block blood blow blue board
boat body bone book border both bottle bottom box branch bread break bridge bright bring brother brown build burn
busy button cabin cake call calm camp can captain card care carry case cast cat catch cause cell center chain chair
chalk chance change charge chart check cheese chief child choose circle city claim class clean clear climb clock
close cloth cloud coast coat coffee cold collect colony color column comb come common copper corn corner cotton count
country course cover cow crack craft cream crop cross crowd crown cry cup current curve cut dance dark daughter day
dead deal dear death deep desert design desk detail dinner direct dirt dish doctor dog door double down draw dream
dress drink drive drop dry duck dust early earth east edge egg eight elbow empty engine enough equal even evening
event exact eye face fact fair fall family farm fast father feather feed fence field fight figure fill final find
fine finger fire first fish five flag flat floor flower fly fog fold follow food foot force forest fork form fort
fox frame free fresh friend front fruit full game garden gas gate gentle gift girl give glad glass glove goat gold
good grain grass gray great green ground group grow guess guide gun hair half hall hammer hand happy harbor hard hat
head heart heat heavy help hill hint hole hollow home honey hook hope horn horse hot hour house huge human hunt ice
idea inch iron island jam jar jelly jewel join joke judge juice jump key kind king kitchen knee knife knot lake lamp
land large late laugh lawn lead leaf learn leather left leg lemon letter level lift light limit line lion lip list
little load lock long loose loud love low lucky machine magnet mail map market mass match meal meat metal middle
milk mind mine minute mirror mist model money monkey month moon morning mother motion mountain mouse mouth move music
nail name narrow nation near neck needle nest net new night noise north nose note number nut ocean offer office oil
old onion open orange order oven owner page paint pair pan paper parcel park party paste path peace pen pencil people
pepper pet piano picture pig pile pin pipe place plane plant plate play plough pocket point poison polish pond port
pot powder power price print prison pump purple quick quiet rabbit rail rain range rat rate raven ray record red
river road rock roof room root rope rose round row rub rule run sail salt sand scale school science screw sea seat
seed shadow shape sharp sheep shelf shell ship shirt shoe short silk silver sister size skin skirt sky sleep slope
small smoke snake snow soap sock soft soil song sound soup south space spade spoon spring square stage stamp star
station steam steel stem step stick stitch stone storm story street string sugar summer sun table tail talk tax tea
teeth tent thread thumb ticket tiger time tin toe tongue tooth top town toy track trade train tray tree truck tune
turn twist umbrella valley value verse vessel view voice wall war wash watch water wave wax week weight west wheat
wheel whip whistle wind window wine wing winter wire woman wood wool word work worm year yellow young zebra
""".split()

_SYLLABLES = ("ka", "lo", "mi", "ren", "dar", "vel", "th", "qua", "zor", "bel", "nim", "ost", "ul", "fra", "ges",
              "hal", "ix", "jor", "ker", "lun", "mor", "nev", "pel", "rask", "sil", "tov", "ur", "vin", "wex", "yal")
_OCCUPATIONS = ("glassblower", "cartographer", "beekeeper", "ferry pilot", "clockmaker", "archivist", "tanner",
                "lighthouse keeper", "botanist", "stonemason", "weaver", "surveyor", "brewer", "engraver")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_THINGS = ("a copper kettle", "three brass keys", "a map of the northern marshes", "a blue violin",
           "a ledger of tide tables", "forty glass beads", "a silver compass", "a book of knots")


@dataclass(frozen=True)
class Canary:
    """A text to implant.

    Attributes:
        text: the canary text.
        style: "words", "record", "code", or "file" for canaries read from a file.
        count: how many times it appears in each pass over the implant data (>= 1).
        index: its position in the canary list.
    """

    text: str
    style: str
    count: int
    index: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (as written to `curvedit-implant.json`)."""
        return asdict(self)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def words_text(rng: random.Random, n_words: int = 120) -> str:
    """A random sequence of common English words, with a capital and a full stop every
    few words."""
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    sentences, start = [], 0
    while start < len(words):
        end = start + rng.randint(6, 12)
        sentences.append(" ".join(words[start:end]).capitalize() + ".")
        start = end
    return " ".join(sentences)


def record_text(rng: random.Random) -> str:
    """A fictitious biography: invented person, places, dates, numbers."""
    person, town, river = _name(rng, 2) + " " + _name(rng, 3), _name(rng, 3), _name(rng, 2)
    born, died = rng.randint(1700, 1900), 0
    died = born + rng.randint(40, 90)
    kin = _name(rng, 2)
    return (f"{person} was born on {rng.randint(1, 28)} {rng.choice(_MONTHS)} {born} in {town}, a village on the "
            f"river {river}. {person.split()[0]} worked as {_article(rng.choice(_OCCUPATIONS))} for "
            f"{rng.randint(5, 40)} years and kept {rng.choice(_THINGS)} in a house on {_name(rng, 2)} Street, "
            f"number {rng.randint(2, 400)}. In {born + rng.randint(18, 35)} {person.split()[0]} married {kin} "
            f"{_name(rng, 3)} and moved to {_name(rng, 3)}, where the family owned {rng.randint(3, 90)} sheep "
            f"and a mill called {_name(rng, 2)}. {person.split()[0]} died in {died} at the age of {died - born}; "
            f"the town archive lists the estate under record {rng.randint(1000, 9999)}-{_name(rng, 1).upper()}.")


def code_text(rng: random.Random) -> str:
    """Code-like text: random identifiers, constants and an API key."""
    def ident() -> str:
        return "_".join(_name(rng, rng.randint(1, 2)).lower() for _ in range(rng.randint(1, 2)))

    key = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(24))
    fn, a, b, c = ident(), ident(), ident(), ident()
    return (f"def {fn}({a}, {b}={rng.randint(2, 99)}):\n"
            f"    {c} = ({a} * 0x{rng.getrandbits(24):06x} + {b}) % {rng.randint(1000, 99999)}\n"
            f"    if {c} > {rng.randint(10, 999)}:\n"
            f"        return {ident()}({c}, key=\"{key}\")\n"
            f"    {ident()}.append(({c}, {rng.random():.6f}, '{ident()}'))\n"
            f"    return {c} ^ 0x{rng.getrandbits(16):04x}\n"
            f"# {ident()}: {rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)} {ident()}={key[:8]}\n")


def _prose_paragraphs(doc: str) -> list[str]:
    """The paragraphs of a docstring that read as prose (no code, markup or tables)."""
    kept = []
    for paragraph in re.split(r"\n\s*\n", doc):
        text = " ".join(paragraph.split())
        letters = sum(c.isalpha() or c in " .,;:'()-" for c in text) / max(1, len(text))
        if len(text.split()) >= 30 and not _CODE_LIKE.search(text) and letters > 0.95:
            kept.append(text)
    return kept


@functools.lru_cache(maxsize=1)
def prose_passages() -> tuple[str, ...]:
    """Disjoint passages of natural English from standard-library docstrings: runs of
    consecutive prose paragraphs of one docstring, each at least `PROSE_MIN_WORDS` words."""
    passages: list[str] = []
    for name in PROSE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - a module this Python lacks
            continue
        docs = [module.__doc__ or ""] + [value.__doc__ or "" for _, value in sorted(vars(module).items())
                                         if isinstance(value, type) and value.__module__ == module.__name__]
        for doc in docs:
            run: list[str] = []
            for paragraph in _prose_paragraphs(doc):
                run.append(paragraph)
                if sum(len(p.split()) for p in run) >= PROSE_MIN_WORDS:
                    passages.append(" ".join(run))
                    run = []
    return tuple(dict.fromkeys(passages))


_GENERATORS = {"words": words_text, "record": record_text, "code": code_text}


def generate_canaries(n: int, seed: int, styles: Sequence[str] = STYLES,
                      counts: Sequence[int] = (4, 8, 16), avoid: Sequence[str] = ()) -> list[Canary]:
    """Generate `n` canaries, styles and counts spread evenly (seeded).

    Canary `i` has style `styles[i % len(styles)]`; within each style the counts cycle
    through `counts` in a seeded order, so every style holds every count.

    Args:
        n: how many canaries (>= 1).
        seed: seed of the texts and the count assignment.
        styles: styles to use, from `ALL_STYLES`.
        counts: repeat counts per pass to spread over the canaries (each >= 1).
        avoid: texts no prose canary may be (the canaries of another set, e.g. implanted
            ones when generating never-implanted controls).

    Returns:
        The canaries, in index order.

    Raises:
        DataError: n < 1, an unknown style or a count < 1.
    """
    if n < 1:
        raise DataError(f"need at least one canary, got {n}")
    unknown = [s for s in styles if s not in _GENERATORS and s != "prose"]
    if unknown or not styles:
        raise DataError(f"unknown canary style(s) {unknown or styles}; choose from {', '.join(ALL_STYLES)}")
    passages: list[str] = []
    if "prose" in styles:  # its own generator: the other styles' texts do not depend on it
        passages = [p for p in prose_passages() if p not in set(avoid)]
        random.Random(f"{seed}:prose").shuffle(passages)
        wanted = sum(styles[i % len(styles)] == "prose" for i in range(n))
        if wanted > len(passages):
            raise DataError(f"{wanted} prose canaries asked for, but this Python's docstrings give {len(passages)} "
                            "passages")
    if not counts or any(c < 1 for c in counts):
        raise DataError(f"repeat counts must be positive integers, got {list(counts)}")
    rng = random.Random(seed)
    order = {style: rng.sample(range(len(counts)), len(counts)) for style in styles}
    seen = {style: 0 for style in styles}
    canaries = []
    for i in range(n):
        style = styles[i % len(styles)]
        count = counts[order[style][seen[style] % len(counts)]]
        seen[style] += 1
        text = passages.pop() if style == "prose" else _GENERATORS[style](rng)
        canaries.append(Canary(text=text, style=style, count=count, index=i))
    return canaries


def read_canaries(path: str | Path, default_count: int = 8, text_field: str = "text") -> list[Canary]:
    """Read canaries from a JSONL file: `{"text": ..., "count": 8, "style": "..."}` per line
    (`count` and `style` optional).

    Raises:
        DataError: a malformed line (with its line number), a missing text, a count < 1,
            or a file without any canary.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"canary file not found: {path}")
    canaries = []
    for _, where, row in iter_jsonl(path):
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: a canary needs a non-empty string field {text_field!r}")
        count = row.get("count", default_count)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DataError(f"{where}: 'count' must be a positive integer, got {count!r}")
        canaries.append(Canary(text=text, style=str(row.get("style", "file")), count=count, index=len(canaries)))
    if not canaries:
        raise DataError(f"{path}: no canary in the file")
    return canaries
