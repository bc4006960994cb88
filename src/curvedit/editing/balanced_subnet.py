"""BalancedSubnet (Sakarvadia et al. 2025, arXiv 2410.02159): learn which few MLP weights to
zero so that the model forgets a *forget* set while keeping its loss on a *retain* set.

Method (edge-popup scores with a straight-through gradient):

- every target weight `W` (seen as `(d_out, d_in)`) gets a real-valued score matrix `s` of
  the same shape, drawn independently of `W` from kaiming-uniform with `a = sqrt(5)`, i.e.
  `U(-1/sqrt(d_in), 1/sqrt(d_in))` (the fan-in is the true input width, also for GPT-2's
  transposed `Conv1D` storage);
- in the forward pass the `k` weights of lowest score magnitude `|s|` in each matrix are
  zeroed, `W_eff = W * mask(|s|)`; `k = floor(ratio * d_out * d_in + 1/2)` (the nearest
  integer, halves rounded up), and exactly `k` weights are zeroed even when scores tie;
- the backward pass treats the mask as the identity in `|s|` (straight-through), so
  `dL/ds = sign(s) * W * dL/dW_eff`;
- loss per step `-(1 - w) * CE(forget batch) + w * CE(retain batch)`, each CE the mean
  next-token cross-entropy over the batch's real positions; every step draws one batch of
  each set (the smaller set is cycled, each pass reshuffled), so no step lacks either term;
- SGD with momentum (and weight decay) on the scores only; the model's weights are frozen;
- at the end the mask is baked into the weights (`W <- W * mask`) and the model is a normal
  HF model again.

The scores are attached with `torch.nn.utils.parametrize`, so the model's own forward runs
unchanged for `nn.Linear` and transformers' `Conv1D` alike. One epoch is one pass over the
larger of the two sets. The model runs in eval mode (no dropout) while the scores learn.
Defaults are the paper's OLMo-2 setting (w = 0.7, ratio = 0.0015, lr = 0.3, 5 epochs,
momentum 0.9); weight decay 5e-4 and batch size 64 follow the authors' code.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from curvedit import __version__
from curvedit.data import DataError, pad_batch, read_records, token_sequences
from curvedit.errors import CurveditError
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.windows import read_memorized
from curvedit.kfac.targets import Target

METHOD_NAME = "balanced-subnet"


class BSNError(CurveditError):
    """A BalancedSubnet run that cannot be made as asked (empty sets, bad options, NaN loss)."""


@dataclass
class BSNOptions:
    """The knobs of BalancedSubnet.

    Attributes:
        ratio: fraction of each target matrix to zero, in (0, 1); per matrix
            `floor(ratio * numel + 1/2)` weights.
        retain_weight: w in `-(1 - w) * CE(forget) + w * CE(retain)`, in [0, 1].
        lr: SGD learning rate on the scores.
        epochs: passes over the larger of the forget and retain sets.
        momentum: SGD momentum.
        weight_decay: SGD weight decay on the scores.
        batch_size: sequences per forget batch and per retain batch (a set smaller than
            this is used whole in every step).
        seed: seed of the score initialisation and of the batch shuffling.
        progress: show a progress bar.
    """

    ratio: float = 0.0015
    retain_weight: float = 0.7
    lr: float = 0.3
    epochs: int = 5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Check every option's range.

        Raises:
            BSNError: an option outside its range (the message names it).
        """
        if not 0 < self.ratio < 1:
            raise BSNError(f"ratio must be in (0, 1), got {self.ratio}")
        if not 0 <= self.retain_weight <= 1:
            raise BSNError(f"retain_weight must be in [0, 1], got {self.retain_weight}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BSNError(f"lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise BSNError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.momentum < 1:
            raise BSNError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise BSNError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            raise BSNError(f"batch_size must be at least 1, got {self.batch_size}")


def masked_count(numel: int, ratio: float) -> int:
    """How many weights of a matrix the mask zeroes: `floor(ratio * numel + 1/2)`.

    Args:
        numel: the matrix's number of weights.
        ratio: the fraction to zero.

    Returns:
        The nearest integer to `ratio * numel` (halves rounded up), at most `numel`.
    """
    return min(numel, math.floor(ratio * numel + 0.5))


class _StraightThroughMask(torch.autograd.Function):
    """0/1 mask zeroing the `k` smallest entries; backward passes the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, magnitude: torch.Tensor, k: int) -> torch.Tensor:  # noqa: D102
        mask = torch.ones_like(magnitude)
        if k:
            lowest = torch.topk(magnitude.flatten(), k, largest=False, sorted=False).indices
            mask.view(-1)[lowest] = 0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def keep_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The edge-popup mask of a score matrix: 0 at the `k` entries of lowest `|score|`, 1
    elsewhere, with a straight-through gradient to the scores.

    Args:
        scores: a score matrix (any shape).
        k: how many entries to zero (exactly `k`, ties broken by `torch.topk`).

    Returns:
        A 0/1 tensor shaped like `scores`, in the scores' dtype.
    """
    return _StraightThroughMask.apply(scores.abs(), k)


class _ScoreMask(nn.Module):
    """Parametrization `W -> W * mask(scores)`; the scores are kept in `(d_out, d_in)` layout."""

    def __init__(self, scores_oi: torch.Tensor, k: int, transposed: bool) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores_oi)
        self.k = k
        self.transposed = transposed

    def mask_stored(self) -> torch.Tensor:
        """The mask in the module's storage layout (transposed for Conv1D)."""
        mask = keep_mask(self.scores, self.k)
        return mask.T if self.transposed else mask

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return weight * self.mask_stored().to(weight.dtype)


@dataclass
class MaskStats:
    """What the baked mask did to one target.

    Attributes:
        name: target name.
        masked: weights zeroed by the mask.
        total: weights in the matrix.
        rel_change: `||W' - W||_F / ||W||_F`.
    """

    name: str
    masked: int
    total: int
    rel_change: float


class SubnetMasks:
    """Learnable edge-popup masks on target weights, attached as parametrizations.

    While attached, every forward pass of the model uses `W * mask(scores)`; the stored
    weights themselves are never written until `bake()`. Use `remove()` to detach the
    masks and get the untouched model back.
    """

    def __init__(self, targets: Sequence[Target], ratio: float, seed: int = 0) -> None:
        """Attach one score matrix per target.

        Args:
            targets: the weights to mask (from `select_targets`).
            ratio: fraction of each matrix to zero (see `masked_count`).
            seed: seed of the kaiming-uniform score initialisation (CPU generator, drawn
                in target order).

        Raises:
            BSNError: no targets, a target already parametrized, or a ratio so small
                that no matrix loses a single weight.
        """
        if not targets:
            raise BSNError("BalancedSubnet needs at least one target weight")
        counts = {t.name: masked_count(t.shape_oi[0] * t.shape_oi[1], ratio) for t in targets}
        if not any(counts.values()):
            sizes = ", ".join(f"{t.name} ({t.shape_oi[0] * t.shape_oi[1]})" for t in targets[:4])
            raise BSNError(f"ratio {ratio} zeroes no weight in any target (sizes: {sizes}); use a larger ratio")
        generator = torch.Generator().manual_seed(seed)
        self.targets = list(targets)
        self._masks: dict[str, _ScoreMask] = {}
        for target in self.targets:
            if parametrize.is_parametrized(target.module, "weight"):
                self.remove()
                raise BSNError(f"{target.name}: the weight already carries a parametrization")
            weight = target.module.weight
            d_out, d_in = target.shape_oi
            bound = 1.0 / math.sqrt(d_in)
            scores = (torch.rand(d_out, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            scores = scores.to(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
            mask = _ScoreMask(scores, counts[target.name], target.transposed)
            parametrize.register_parametrization(target.module, "weight", mask)
            self._masks[target.name] = mask

    @property
    def scores(self) -> dict[str, nn.Parameter]:
        """Target name -> its `(d_out, d_in)` score matrix (the only trainable tensors)."""
        return {name: mask.scores for name, mask in self._masks.items()}

    @torch.no_grad()
    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Target name -> the current bool `(d_out, d_in)` mask (True = weight kept)."""
        return {name: keep_mask(mask.scores, mask.k).bool() for name, mask in self._masks.items()}

    def remove(self) -> None:
        """Detach every mask without touching the weights (the original model is back)."""
        for target in self.targets:
            if target.name in self._masks and parametrize.is_parametrized(target.module, "weight"):
                parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=False)
        self._masks.clear()

    @torch.no_grad()
    def bake(self) -> list[MaskStats]:
        """Write `W * mask` into each weight in place and detach the masks.

        The baked weight is computed with the same product the masked forward uses, so the
        model's outputs after baking equal those with the masks attached, bit for bit.

        Returns:
            Per-target statistics, in target order.
        """
        stats = []
        for target in self.targets:
            mask = self._masks[target.name]
            factor = mask.mask_stored()
            parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=False)
            weight = target.module.weight
            before = weight.detach().clone()
            weight.mul_(factor.to(weight.dtype))
            norm = torch.linalg.norm(before.double()).clamp(min=1e-30)
            stats.append(MaskStats(name=target.name, masked=mask.k, total=weight.numel(),
                                   rel_change=float(torch.linalg.norm((weight - before).double()) / norm)))
        self._masks.clear()
        return stats


@dataclass
class EpochStats:
    """Mean losses over the steps of one epoch.

    Attributes:
        epoch: 0-based epoch index.
        steps: optimizer steps in the epoch.
        forget_ce: mean cross-entropy on the forget batches.
        retain_ce: mean cross-entropy on the retain batches.
        loss: mean of `-(1 - w) * forget_ce + w * retain_ce`.
    """

    epoch: int
    steps: int
    forget_ce: float
    retain_ce: float
    loss: float


@dataclass
class BSNResult:
    """A finished BalancedSubnet run (the mask is baked into the model).

    Attributes:
        options: the options used.
        targets: per-target mask statistics.
        history: per-epoch losses.
        forget_sequences: forget sequences trained on.
        retain_sequences: retain sequences trained on.
    """

    options: BSNOptions
    targets: list[MaskStats]
    history: list[EpochStats] = field(default_factory=list)
    forget_sequences: int = 0
    retain_sequences: int = 0


def _usable(sequences: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    """Sequences that predict at least one token; an empty result is an error."""
    if not sequences:
        raise BSNError(f"the {what} set is empty: BalancedSubnet needs both a forget and a retain set")
    usable = [list(s) for s in sequences if len(s) >= 2]
    if not usable:
        raise BSNError(f"every sequence of the {what} set is shorter than 2 tokens (nothing to predict)")
    return usable


def _batch_stream(sequences: list[list[int]], batch_size: int, generator: torch.Generator) -> Iterator[list[list[int]]]:
    """Endless batches of `min(batch_size, len(sequences))` sequences: consecutive chunks of
    passes in shuffled order (reshuffled each pass), wrapping across pass boundaries."""
    size = min(batch_size, len(sequences))
    order: list[int] = []
    while True:
        while len(order) < size:
            order.extend(torch.randperm(len(sequences), generator=generator).tolist())
        yield [sequences[i] for i in order[:size]]
        order = order[size:]


def mean_cross_entropy(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of a right-padded batch over its real positions.

    Args:
        model: an HF causal LM.
        sequences: token-id sequences (each at least 2 tokens).
        pad_id: padding id (padded positions are neither inputs that count nor targets).

    Returns:
        A scalar (float32 or better) carrying the autograd graph.
    """
    device = next(model.parameters()).device
    batch = pad_batch(sequences, pad_id)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    counted = mask[:, 1:].bool()
    logits = logits[counted]
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ids[:, 1:][counted])


@contextlib.contextmanager
def _train_only(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block: eval mode and only `trainable` require grad; flags restored after."""
    keep = {id(p) for p in trainable}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def train_subnet(model: nn.Module, masks: SubnetMasks, forget: Sequence[Sequence[int]],
                 retain: Sequence[Sequence[int]], options: BSNOptions | None = None, *,
                 pad_id: int = 0) -> list[EpochStats]:
    """Learn the scores of attached masks; the model's weights stay untouched.

    Args:
        model: the model the masks are attached to.
        masks: from `SubnetMasks(targets, options.ratio, options.seed)`.
        forget: token sequences to unlearn (e.g. memorized prefix + suffix windows).
        retain: token sequences whose loss must stay low.
        options: `BSNOptions` (lr, momentum, epochs, w, batch size, seed).
        pad_id: padding id.

    Returns:
        Per-epoch mean losses.

    Raises:
        BSNError: an empty forget or retain set (or one whose sequences are all shorter
            than 2 tokens), invalid options, or a non-finite loss (naming the step).
    """
    options = options or BSNOptions()
    options.validate()
    forget_set, retain_set = _usable(forget, "forget"), _usable(retain, "retain")
    generator = torch.Generator().manual_seed(options.seed)
    forget_batches = _batch_stream(forget_set, options.batch_size, generator)
    retain_batches = _batch_stream(retain_set, options.batch_size, generator)
    steps = math.ceil(max(len(forget_set), len(retain_set)) / options.batch_size)
    scores = list(masks.scores.values())
    optimizer = torch.optim.SGD(scores, lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)
    w = options.retain_weight
    history = []
    bar = tqdm(total=options.epochs * steps, unit="step", desc="balanced-subnet", disable=not options.progress)
    try:
        with _train_only(model, scores):
            for epoch in range(options.epochs):
                sums = torch.zeros(3, dtype=torch.float64)
                for step in range(steps):
                    forget_ce = mean_cross_entropy(model, next(forget_batches), pad_id)
                    retain_ce = mean_cross_entropy(model, next(retain_batches), pad_id)
                    loss = -(1 - w) * forget_ce + w * retain_ce
                    if not torch.isfinite(loss):
                        raise BSNError(f"epoch {epoch} step {step}: the loss is {loss.item()} (forget CE "
                                       f"{forget_ce.item()}, retain CE {retain_ce.item()}); lower the lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    sums += torch.tensor([forget_ce.item(), retain_ce.item(), loss.item()], dtype=torch.float64)
                    bar.update(1)
                    bar.set_postfix(forget_ce=f"{forget_ce.item():.3f}", retain_ce=f"{retain_ce.item():.3f}")
                means = (sums / steps).tolist()
                history.append(EpochStats(epoch=epoch, steps=steps, forget_ce=means[0], retain_ce=means[1],
                                          loss=means[2]))
    finally:
        bar.close()
    return history


def balanced_subnet(model: nn.Module, targets: Sequence[Target], forget: Sequence[Sequence[int]],
                    retain: Sequence[Sequence[int]], options: BSNOptions | None = None, *,
                    pad_id: int = 0) -> BSNResult:
    """Run BalancedSubnet end to end: attach masks, learn the scores, bake the mask.

    On success the model's target weights hold `W * mask` (a normal model, ready for
    `save_pretrained`); on failure the masks are removed and the weights are untouched.

    Args:
        model: an HF causal LM (any device/dtype).
        targets: the weights to mask (typically `TargetSpec(preset="mlp")`).
        forget: token sequences to unlearn.
        retain: token sequences to keep.
        options: `BSNOptions` (defaults: the paper's setting).
        pad_id: padding id.

    Returns:
        A `BSNResult` with per-target statistics and the loss history.

    Raises:
        BSNError: empty sets, invalid options, a ratio that masks nothing, a NaN loss.
    """
    options = options or BSNOptions()
    options.validate()
    forget_set, retain_set = _usable(forget, "forget"), _usable(retain, "retain")
    masks = SubnetMasks(targets, options.ratio, options.seed)
    try:
        history = train_subnet(model, masks, forget_set, retain_set, options, pad_id=pad_id)
    except BaseException:
        masks.remove()
        raise
    return BSNResult(options=options, targets=masks.bake(), history=history,
                     forget_sequences=len(forget_set), retain_sequences=len(retain_set))


_WINDOW_KEYS = ("prefix_ids", "suffix_ids", "prefix", "suffix")


def read_forget_sequences(path: str | Path, tokenizer: Any | None, *, seq_len: int = 512,
                          max_tokens: int | None = None, text_field: str = "text") -> list[list[int]]:
    """Read a forget set: a memorized-windows JSONL (as `curvedit find-memorized` writes it;
    each window becomes prefix + suffix) or a plain corpus (text or `input_ids` rows, packed
    to `seq_len` as for perplexity).

    Args:
        path: the JSONL file (the first non-empty row decides the format).
        tokenizer: the model's tokenizer (needed for text rows).
        seq_len: sequence length for plain text.
        max_tokens: token budget for plain text (None: all of it).
        text_field: JSON field with the text.

    Returns:
        Token sequences.

    Raises:
        BSNError: a file without any sequence.
        DataError: a malformed line.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"forget set not found: {path}")
    first = None
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
                break
    if first is None:
        raise BSNError(f"{path}: the forget set is empty")
    if isinstance(first, dict) and any(key in first for key in _WINDOW_KEYS):
        sequences = [w.prefix_ids + w.suffix_ids for w in read_memorized(path, tokenizer)]
    else:
        sequences = list(token_sequences(read_records(path, text_field=text_field), tokenizer, seq_len, max_tokens))
    if not sequences:
        raise BSNError(f"{path}: the forget set is empty")
    return sequences


def bsn_manifest(result: BSNResult, model_name: str, *, forget: str = "", retain: str = "") -> dict[str, Any]:
    """The JSON description written beside a BalancedSubnet model (`curvedit-edit.json`).

    Args:
        result: the finished run.
        model_name: the model it started from.
        forget: a description of the forget data (e.g. its path).
        retain: a description of the retain data.

    Returns:
        A dict with the version, model, plan (method + options), data, per-target
        statistics and the loss history.
    """
    return {
        "curvedit_version": __version__,
        "model": model_name,
        "plan": {"method": METHOD_NAME, **{k: v for k, v in asdict(result.options).items() if k != "progress"}},
        "data": {"forget": forget, "forget_sequences": result.forget_sequences,
                 "retain": retain, "retain_sequences": result.retain_sequences},
        "targets": {s.name: {k: v for k, v in asdict(s).items() if k != "name"} for s in result.targets},
        "history": [asdict(h) for h in result.history],
    }


@dataclass
class BSNChoice:
    """The BalancedSubnet ratio chosen within a perplexity budget (`bsn_within_budget`).

    Attributes:
        ratio: the mask ratio kept.
        tried: per ratio tried, {"ratio", "tune_loose", "perplexity"}.
        within_budget: whether the kept ratio stays within the budget (else it is the
            ratio of lowest perplexity).
    """

    ratio: float
    tried: list[dict[str, float]]
    within_budget: bool


def bsn_within_budget(model: nn.Module, targets: Sequence[Target], forget: Sequence[Sequence[int]],
                      retain: Sequence[Sequence[int]], tune_windows: Sequence[Any],
                      heldout: Sequence[Sequence[int]], ratios: Sequence[float], budget_ppl: float,
                      options: BSNOptions, *, pad_id: int = 0, batch_size: int = 16) -> BSNChoice:
    """Train BalancedSubnet at each ratio; keep the one with the lowest loose recall on
    `tune_windows` whose held-out perplexity is at most `budget_ppl` (the rule the K-FAC
    sweep uses), or, if none fits, the one of lowest perplexity.

    On return the model's target weights hold the kept ratio's masked weights (copy the
    originals first to restore them); on failure they are restored.

    Args:
        model: the unedited HF causal LM.
        targets: the weights to mask.
        forget: token sequences to unlearn.
        retain: token sequences to keep.
        tune_windows: memorized windows (`curvedit.evaluate.windows.Window`) scored
            for the choice.
        heldout: held-out sequences for perplexity.
        ratios: mask ratios to try.
        budget_ppl: the perplexity a kept ratio may reach.
        options: the other BalancedSubnet settings (its `ratio` is replaced by each of `ratios`).
        pad_id: padding id.
        batch_size: sequences per evaluation batch.

    Returns:
        A `BSNChoice`.

    Raises:
        BSNError: no ratio, or as `balanced_subnet`.
    """
    if not ratios:
        raise BSNError("give at least one mask ratio to try")
    originals = [t.module.weight.detach().clone() for t in targets]

    def load(weights: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for target, weight in zip(targets, weights):
                target.module.weight.copy_(weight)

    tried, masked = [], []
    try:
        for ratio in ratios:
            load(originals)
            balanced_subnet(model, targets, forget, retain, replace(options, ratio=ratio), pad_id=pad_id)
            masked.append([t.module.weight.detach().clone() for t in targets] if len(ratios) > 1 else None)
            tune_loose = evaluate_recitation(model, tune_windows, pad_id=pad_id, batch_size=batch_size)[0].loose
            ppl = perplexity(model, heldout, pad_id=pad_id, batch_size=batch_size).perplexity
            tried.append({"ratio": ratio, "tune_loose": tune_loose, "perplexity": ppl})
    except BaseException:
        load(originals)
        raise
    within = [i for i, t in enumerate(tried) if t["perplexity"] <= budget_ppl]
    best = (min(within, key=lambda i: (tried[i]["tune_loose"], tried[i]["perplexity"])) if within
            else min(range(len(tried)), key=lambda i: tried[i]["perplexity"]))
    if masked[best] is not None:
        load(masked[best])
    return BSNChoice(ratio=tried[best]["ratio"], tried=tried, within_budget=bool(within))
