"""Study stages 1-3: implant the seed's canaries, find the ones the model recites and split
them into tune and held-out halves, and choose the factors' text.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from curvedit.data import Record
from curvedit.evaluate.memorization import FindOptions, find_memorized
from curvedit.evaluate.sampling import SampleOptions, sample_sequences
from curvedit.evaluate.windows import Window
from curvedit.experiments.stages import cached, content_key
from curvedit.experiments.studies.base import StudyData
from curvedit.experiments.studies.options import StudyOptions
from curvedit.io import write_json
from curvedit.memorize.canaries import Canary, generate_canaries, prose_passages
from curvedit.memorize.implant import canary_token_ids, implant, save_implanted


def split_halves(windows: Sequence[Window], styles: Sequence[str], seed: int) -> tuple[list[Window], list[Window]]:
    """Split windows into tune and held-out halves, each style split evenly (seeded)."""
    rng = random.Random(seed)
    tune, heldout = [], []
    for style in sorted(set(styles)):
        group = [w for w, s in zip(windows, styles) if s == style]
        rng.shuffle(group)
        tune += group[: len(group) // 2]
        heldout += group[len(group) // 2:]
    return tune, heldout


def style_of(window: Window) -> str:
    """The canary style recorded in a canary window's source ("canary:words" -> "words")."""
    return window.source.split(":", 1)[1] if window.source.startswith("canary:") else window.source


NONMEMBER_SEED = 10_000  # non-member canaries of seed s are generated with seed s + 10000


def nonmember_canaries(options: StudyOptions, seed: int, implanted: Sequence[str]) -> list[Canary]:
    """Never-implanted canaries of the same styles and counts: as many as were implanted, or
    fewer when the prose passages left once the implanted ones are excluded do not go round
    (the stdlib gives 14; 8 implanted leave 6)."""
    styles, n = options.styles, options.canaries
    if "prose" in styles:
        left = len(set(prose_passages()) - set(implanted))
        while n > 1 and sum(styles[i % len(styles)] == "prose" for i in range(n)) > left:
            n -= 1
    return generate_canaries(n, seed + NONMEMBER_SEED, styles, options.counts, avoid=implanted)


def implant_key(seed: int, data: StudyData, options: StudyOptions, base: dict[str, Any]) -> str:
    """The content key of a seed's implant: the base model, the canaries and every implant setting."""
    implant_options = replace(options.implant, seed=seed, progress=options.progress)
    canaries = generate_canaries(options.canaries, seed, options.styles, options.counts)
    return content_key({"base": base["sha256"], "canaries": options.canaries, "counts": options.counts,
                        "implant": implant_options.fingerprint_fields(), "data": content_key(data.train),
                        **({"replay": options.replay_samples} if options.replay_samples else {}),
                        "texts": content_key([c.to_dict() for c in canaries])})


def implant_seed(base_dir: Path, seed: int, data: StudyData, options: StudyOptions, base: dict[str, Any]) -> Path:
    """Implant the seed's canaries into the base model, or reuse the implanted model in the
    cache when it was made with the same settings (`implant_key`); an interrupted implant
    resumes from its checkpoint.

    Returns:
        The implanted model's folder (its `study-key.json` holds the key).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    out = options.cache / f"seed-{seed}" / "implanted"
    implant_options = replace(options.implant, seed=seed, progress=options.progress)
    canaries = generate_canaries(options.canaries, seed, options.styles, options.counts)
    key = implant_key(seed, data, options, base)
    stamp = out / "study-key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return out
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    general = data.train
    if options.replay_samples:

        general = sample_sequences(model, tokenizer, SampleOptions(
            n=options.replay_samples, seq_len=implant_options.seq_len, seed=seed, batch_size=64,
            progress=options.progress)) + data.train
    result = implant(model, tokenizer, canaries, general, data.ppl_subset(options.ppl_sequences), out,
                     implant_options, resume=(out / ".implant-state" / "state.json").is_file())
    save_implanted(model, tokenizer, out, canaries, result, implant_options, base)
    write_json(stamp, {"key": key, "seconds": round(time.perf_counter() - start, 1)})
    return out


SELF_SAMPLES = "self-samples-{count}.json"  # a seed's record of its own samples, per count ("self" and "mix" differ)
FACTOR_SAMPLE_SEED = 7919  # offset of the factor samples' seed from the implant seed (replay uses the seed itself)


def factor_sequences(model: torch.nn.Module, tokenizer: Any, data: StudyData, options: StudyOptions, seed: int,
                     model_key: str) -> list[list[int]]:
    """The factors' text, `options.factor_tokens` tokens of it: pydoc text, the implanted model's
    own samples (drawn once per seed and cached), or half of each."""
    if options.factor_data == "pydoc":
        return data.factor_sequences(options.factor_tokens)
    wanted = options.factor_tokens if options.factor_data == "self" else options.factor_tokens // 2
    seq_len = options.implant.seq_len
    count = math.ceil(1.25 * wanted / seq_len)  # samples that end at EOS are shorter

    def draw() -> list[list[int]]:
        # another seed stream than the implant's replay samples, so these are fresh draws
        return sample_sequences(model, tokenizer, SampleOptions(
            n=count, seq_len=seq_len, seed=seed + FACTOR_SAMPLE_SEED, batch_size=64, progress=options.progress))

    key = content_key({"model": model_key, "n": count, "seq_len": seq_len, "seed": seed + FACTOR_SAMPLE_SEED})
    samples = cached(options.records / f"seed-{seed}" / SELF_SAMPLES.format(count=count), key, draw)
    own, total = [], 0
    for seq in samples:
        if wanted - total < 2:
            break
        own.append(seq[: wanted - total])
        total += len(own[-1])
    if options.factor_data == "self":
        return own
    return data.factor_sequences(options.factor_tokens - total) + own


def find_canaries(model, tokenizer, manifest: dict[str, Any], options: StudyOptions) -> tuple[list[Window], list[str]]:
    """Run `find_memorized` over the implanted canaries; the recited windows and their styles."""
    canaries = [Canary(text=c["text"], style=c["style"], count=c["count"], index=c["index"])
                for c in manifest["canaries"]]
    length = options.implant.prefix_len + options.implant.suffix_len
    ids = canary_token_ids(canaries, tokenizer, length)
    records = [Record(text=None, input_ids=seq, source=f"canary:{c.style}", index=c.index)
               for c, seq in zip(canaries, ids)]
    found = find_memorized(model, tokenizer, records, FindOptions(
        prefix_len=options.implant.prefix_len, suffix_len=options.implant.suffix_len, progress=False,
        batch_size=options.batch_size)).found
    windows = [f.window for f in found]
    return windows, [style_of(w) for w in windows]
