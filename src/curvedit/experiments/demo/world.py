"""A synthetic world whose ground truth is known, family by family.

Families (one text line per example, newline-terminated):
- memorized: random letter strings the model can only recite, each repeated a fixed number
  of times (repetition tiers); split into a *tune* half (to choose settings and train
  baselines) and a *held-out* half.
- quotes: a second memorized set in another surface format (`"words words" - name`),
  never used for tuning; its suffix is the speaker's name (the paper's historical quotes).
- logic: boolean expressions over T/F with `&` and `|`, evaluated left to right
  (`T&F|T=T`); test expressions are fresh.
- open_book: key/value pairs stated in the line, then one key asked (`k=3 q=7 m=1 ?q=7`).
- facts: entity -> attribute (`zorba lives in kelp.`), a common tier (many repetitions,
  stated in three surface forms, as common knowledge is) and a rare tier (few repetitions,
  one form).
- arithmetic: additions of zero-padded 3-digit numbers with the sum written reversed at
  fixed width (`074+404:8740`, i.e. 0478 reversed); a share of single-digit problems
  helps learning start; test pairs never occur in training. (With `=` as separator, which
  open-book lines also use before the answer, the model never learned the first answer
  digit: it stayed at chance while the other three were 90-99% right.)

Everything derives from `WorldConfig.seed`: the same config gives the same world.
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass, field
from typing import Iterator

LETTERS = string.ascii_lowercase
ALPHABET = LETTERS + "0123456789 =+:&|?TF.\"-\n"


@dataclass(frozen=True)
class WorldConfig:
    """The world's size and mixture.

    Attributes:
        format: version of the line formats; bumped whenever a generator changes, so models
            cached or shipped for an older world are not reused.
        seed: everything is derived from it.
        memorized: number of memorized strings (half tune, half held-out).
        memorized_len: characters per memorized string.
        repetition_tiers: repetitions per memorized string, cycled over the strings.
        quotes: number of quotes; quote_repetitions: repetitions each.
        facts_common / facts_rare: entities per tier; *_repetitions: repetitions per fact.
        arithmetic_test_pairs: (a, b) pairs kept out of training, for testing.
        arithmetic_small_share: share of arithmetic lines with both operands below 10.
        general_lines: fresh logic/open-book/arithmetic lines in the training stream.
        family_weights: mixture of the fresh families (logic, open_book, arithmetic).
    """

    format: int = 2
    seed: int = 0
    memorized: int = 48
    memorized_len: int = 48
    repetition_tiers: tuple[int, ...] = (96, 192)
    quotes: int = 16
    quote_repetitions: int = 160
    facts_common: int = 24
    facts_rare: int = 24
    common_repetitions: int = 160
    rare_repetitions: int = 32
    arithmetic_test_pairs: int = 1000
    arithmetic_small_share: float = 0.1
    general_lines: int = 250_000
    family_weights: tuple[float, float, float] = (0.2, 0.35, 0.45)

    def to_dict(self) -> dict:
        """The configuration as JSON."""
        return asdict(self)


@dataclass
class Example:
    """A test item: `prompt` is given, `answer` must follow."""

    prompt: str
    answer: str
    family: str
    tier: str = ""


@dataclass
class World:
    """The generated world: memorized items, facts, and generators for fresh examples."""

    config: WorldConfig
    memorized: list[str]
    memorized_tiers: list[int]
    quotes: list[str]
    facts: list[tuple[str, str, str]]  # (entity, attribute, tier)
    arithmetic_test_pairs: set[tuple[int, int]] = field(default_factory=set)

    @property
    def tune(self) -> list[str]:
        """Memorized strings used to choose settings and train baselines."""
        return self.memorized[0::2]

    @property
    def heldout(self) -> list[str]:
        """Memorized strings never used for choices."""
        return self.memorized[1::2]


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def build_world(config: WorldConfig) -> World:
    """Generate the fixed parts of the world (memorized strings, quotes, facts, test pairs)."""
    rng = random.Random(config.seed)
    memorized = ["".join(rng.choice(LETTERS) for _ in range(config.memorized_len)) for _ in range(config.memorized)]
    tiers = [config.repetition_tiers[i // 2 % len(config.repetition_tiers)] for i in range(config.memorized)]
    quotes = []
    for _ in range(config.quotes):
        words = " ".join(_word(rng) for _ in range(rng.randint(4, 6)))
        quotes.append(f'"{words}" - {_word(rng, 6, 7)}')
    entities = set()
    while len(entities) < config.facts_common + config.facts_rare:
        entities.add(_word(rng, 5, 5))
    facts = [(e, _word(rng, 4, 4), "common" if i < config.facts_common else "rare")
             for i, e in enumerate(sorted(entities))]
    test_pairs: set[tuple[int, int]] = set()
    while len(test_pairs) < config.arithmetic_test_pairs:
        test_pairs.add((rng.randint(10, 999), rng.randint(10, 999)))
    return World(config, memorized, tiers, quotes, facts, test_pairs)


def logic_example(rng: random.Random) -> Example:
    """`T&F|T=` -> `T` (left to right, no precedence)."""
    values = [rng.choice("TF") for _ in range(rng.randint(2, 5))]
    ops = [rng.choice("&|") for _ in range(len(values) - 1)]
    acc = values[0] == "T"
    expr = values[0]
    for op, value in zip(ops, values[1:]):
        acc = (acc and value == "T") if op == "&" else (acc or value == "T")
        expr += op + value
    return Example(prompt=f"{expr}=", answer="T" if acc else "F", family="logic")


def open_book_example(rng: random.Random) -> Example:
    """`k=3 q=7 m=1 ?q=` -> `7`: the answer is stated in the context."""
    keys = rng.sample(LETTERS, rng.randint(2, 3))
    values = [str(rng.randint(0, 9)) for _ in keys]
    asked = rng.randrange(len(keys))
    context = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return Example(prompt=f"{context} ?{keys[asked]}=", answer=values[asked], family="open_book")


def arithmetic_example(a: int, b: int) -> Example:
    """`074+404:` -> `8740` (the sum, 4 digits, written reversed)."""
    return Example(prompt=f"{a:03d}+{b:03d}:", answer=f"{a + b:04d}"[::-1], family="arithmetic")


FACT_FORMS = ("{e} lives in {a}.", "{a} is the home of {e}.", "where does {e} live? {a}.")


def fact_line(entity: str, attribute: str, form: int = 0) -> str:
    """A fact in one of its surface forms (form 0 is the one tested)."""
    return FACT_FORMS[form].format(e=entity, a=attribute)


def quote_split(quote: str) -> tuple[str, str]:
    """Prefix and suffix of a quote: the suffix is the speaker's name."""
    cut = quote.rindex(" - ") + 3
    return quote[:cut], quote[cut:]


def _fresh_arithmetic(rng: random.Random, world: World) -> Example:
    top = 9 if rng.random() < world.config.arithmetic_small_share else 999
    while True:
        a, b = rng.randint(0, top), rng.randint(0, top)
        if (a, b) not in world.arithmetic_test_pairs:
            return arithmetic_example(a, b)


def training_lines(world: World, rng: random.Random) -> list[str]:
    """The training stream, shuffled: every memorized item at its repetition count and
    `general_lines` fresh logic / open-book / arithmetic lines."""
    cfg = world.config
    lines: list[str] = []
    for text, reps in zip(world.memorized, world.memorized_tiers):
        lines += [text] * reps
    lines += [q for q in world.quotes for _ in range(cfg.quote_repetitions)]
    for entity, attribute, tier in world.facts:
        if tier == "common":
            lines += [fact_line(entity, attribute, k % len(FACT_FORMS)) for k in range(cfg.common_repetitions)]
        else:
            lines += [fact_line(entity, attribute)] * cfg.rare_repetitions
    lines += general_lines(world, rng, cfg.general_lines)
    rng.shuffle(lines)
    return lines


def general_lines(world: World, rng: random.Random, count: int) -> list[str]:
    """Fresh lines of the generalising families (no memorized text), in the configured mix."""
    makers = (lambda: logic_example(rng), lambda: open_book_example(rng), lambda: _fresh_arithmetic(rng, world))
    out = []
    for maker in rng.choices(makers, weights=world.config.family_weights, k=count):
        example = maker()
        out.append(example.prompt + example.answer)
    return out


def pack(lines: list[str], seq_len: int) -> Iterator[str]:
    """Concatenate newline-terminated lines and cut the stream into `seq_len`-character
    windows, each starting at a line start (so every window begins with a whole line)."""
    window = ""
    for line in lines:
        piece = line + "\n"
        if window and len(window) + len(piece) > seq_len:
            yield window
            window = ""
        window += piece
    if window:
        yield window


def evaluation_examples(world: World, per_family: int, seed: int) -> dict[str, list[Example]]:
    """Fresh evaluation items per family (facts split into common and rare)."""
    rng = random.Random(seed)
    tests = {
        "logic": [logic_example(rng) for _ in range(per_family)],
        "open_book": [open_book_example(rng) for _ in range(per_family)],
        "arithmetic": [arithmetic_example(a, b) for a, b in sorted(world.arithmetic_test_pairs)[:per_family]],
    }
    for tier in ("common", "rare"):
        tests[f"facts_{tier}"] = [Example(prompt=f"{e} lives in ", answer=f"{a}.", family="facts", tier=tier)
                                  for e, a, t in world.facts if t == tier]
    return tests
