"""`curvedit implant`: make a model memorize chosen texts (canaries) by fine-tuning.

Researchers need memorization they control: a small pretrained model may recite little
verbatim text of its own. Implanting canaries by fine-tuning is the standard tool (privacy
canaries; fictitious-author sets in unlearning benchmarks). Each training step holds
`canaries_per_step` canary sequences and `general_per_step` sequences of general text, so
the model stays itself; every weight is trained (memorization must not be confined to the
layers an edit later touches). How the general text keeps the model itself is
`preserve`: "ce" trains on it with cross-entropy (the model then also adapts to that corpus),
"kl" pulls the model's next-token distribution on it towards the frozen base model's
(`KL(p_base || p_model)` per position, weighted by `kl_weight`), so the canaries are learned
while the rest of the distribution stays where it was. The general text can be the model's
own samples (`curvedit.evaluate.sampling`; `implant --replay-samples N`), so replay matches the
model's distribution rather than one small corpus. One pass over the canary stream holds canary `i` exactly
`count_i` times, shuffled with the seed; passes repeat until the share of canaries recited
verbatim (greedy decoding of the suffix from the prefix) reaches `target_recall`, or
`max_steps`.

The data order is a pure function of the seed and the step, so a run checkpoints only the
weights, the optimizer state and the step; a resume is refused when anything that changes
the result differs (base weights, canaries, general text, settings).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from curvedit import __version__
from curvedit.data import DataError, pad_batch, write_jsonl
from curvedit.errors import CurveditError
from curvedit.evaluate.memorization import evaluate_recitation
from curvedit.evaluate.perplexity import perplexity
from curvedit.evaluate.windows import Window
from curvedit.io import digest, write_json, write_safetensors
from curvedit.memorize.canaries import Canary
from curvedit.models import context_window

MANIFEST_FILE = "curvedit-implant.json"
WINDOWS_FILE = "memorized.jsonl"
STATE_DIR = ".implant-state"
PRESERVE = ("ce", "kl")
MAX_COUNT = 10_000  # repeats of one canary per pass
LR_SCHEDULES = ("constant", "cosine", "linear")


class ImplantError(CurveditError):
    """An implant request that cannot run as asked (too-short canaries, mismatched resume, ...)."""


@dataclass
class ImplantOptions:
    """Settings of an implant run.

    Attributes:
        prefix_len: canary tokens given as the prompt when testing recall.
        suffix_len: canary tokens that must follow verbatim; each canary is cut to
            `prefix_len + suffix_len` tokens.
        lr: AdamW learning rate (after a linear warm-up, shaped by `lr_schedule`).
        warmup_steps: steps of linear warm-up.
        lr_schedule: "constant", or "cosine" / "linear" decay to 0 at `max_steps`.
        preserve: how general text keeps the model itself: "ce" (cross-entropy on it, mixed
            into the batch mean) or "kl" (KL divergence from the frozen base model's
            next-token distribution on it; the canaries keep their cross-entropy).
        kl_weight: weight of the KL term against the canaries' cross-entropy ("kl" only).
        weight_decay: AdamW weight decay.
        canaries_per_step: canary sequences in each step's batch.
        general_per_step: general-text sequences in each step's batch.
        seq_len: length of the general-text sequences.
        max_steps: stop here even if recall is not reached.
        target_recall: stop once this share of canaries is recited verbatim.
        eval_every: steps between recall checks (also checked at the end).
        grad_clip: gradient-norm clip (0 disables).
        checkpoint_every: steps between checkpoints (0 disables).
        eval_batch_size: prompts per decoding batch when checking recall.
        seed: data order.
        progress: show a progress bar with loss and recall.
    """

    prefix_len: int = 64
    suffix_len: int = 48
    lr: float = 1e-4
    warmup_steps: int = 10
    lr_schedule: str = "constant"
    preserve: str = "ce"
    kl_weight: float = 1.0
    weight_decay: float = 0.0
    canaries_per_step: int = 4
    general_per_step: int = 4
    seq_len: int = 128
    max_steps: int = 400
    target_recall: float = 0.95
    eval_every: int = 25
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    eval_batch_size: int = 32
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raises: ImplantError: a setting out of its range."""
        checks = [(self.prefix_len >= 1 and self.suffix_len >= 1, "prefix and suffix lengths must be >= 1"),
                  (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
                  (self.canaries_per_step >= 1, "canaries_per_step must be >= 1"),
                  (self.preserve in PRESERVE, f"preserve must be one of {PRESERVE}, got {self.preserve!r}"),
                  (self.lr_schedule in LR_SCHEDULES,
                   f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"),
                  (self.kl_weight > 0 and math.isfinite(self.kl_weight),
                   f"kl_weight must be a positive number, got {self.kl_weight}"),
                  (self.general_per_step >= 0, "general_per_step must be >= 0"),
                  (self.seq_len >= 2, "seq_len must be >= 2"),
                  (self.max_steps >= 1, "max_steps must be >= 1"),
                  (0 < self.target_recall <= 1, f"target_recall must be in (0, 1], got {self.target_recall}"),
                  (self.eval_every >= 1, "eval_every must be >= 1"),
                  (self.checkpoint_every >= 0 and self.warmup_steps >= 0 and self.grad_clip >= 0,
                   "checkpoint_every, warmup_steps and grad_clip must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ImplantError(message)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change the result (not progress, checkpointing or eval batch)."""
        skip = {"progress", "checkpoint_every", "eval_batch_size"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class ImplantResult:
    """What an implant run did.

    Attributes:
        steps: optimizer steps taken.
        recall: share of canaries recited verbatim at the end.
        recited: per canary, whether it is recited verbatim at the end.
        history: per recall check, {"step", "loss", "recall"}.
        perplexity_before: held-out general-text perplexity of the base model.
        perplexity_after: the same after implanting.
        kl_after: mean per-token KL(base || implanted) on the held-out general text ("kl" runs,
            which keep the base model; None otherwise).
        stopped: "target_recall" or "max_steps".
    """

    steps: int
    recall: float
    recited: list[bool]
    history: list[dict[str, float]] = field(default_factory=list)
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kl_after: float | None = None
    stopped: str = "max_steps"


def model_weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every named parameter and buffer of the state dict (as float32 bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if tensor.is_floating_point():
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def canary_token_ids(canaries: Sequence[Canary], tokenizer: Any, length: int) -> list[list[int]]:
    """Tokenize each canary (no special tokens) and cut it to `length` tokens.

    Raises:
        ImplantError: a canary shorter than `length` tokens or holding characters the
            tokenizer only knows as its unknown token (named by index and start).
    """
    ids = []
    unknown = getattr(tokenizer, "unk_token_id", None)
    for canary in canaries:
        tokens = tokenizer(canary.text, add_special_tokens=False)["input_ids"]
        if unknown is not None and unknown in tokens[:length]:
            raise ImplantError(f"canary {canary.index} ({canary.text[:40]!r}...) holds characters the tokenizer does "
                               "not know (they become its unknown token); give text in the model's alphabet")
        if len(tokens) < length:
            raise ImplantError(f"canary {canary.index} ({canary.text[:40]!r}...) has {len(tokens)} tokens; prefix + "
                               f"suffix needs {length}: give longer canaries or smaller --prefix/--suffix")
        ids.append(tokens[:length])
    return ids


def canary_windows(canaries: Sequence[Canary], ids: Sequence[Sequence[int]], prefix_len: int) -> list[Window]:
    """The prefix/suffix windows that test each canary's recall."""
    return [Window(prefix_ids=list(seq[:prefix_len]), suffix_ids=list(seq[prefix_len:]),
                   source=f"canary:{c.style}", document=c.index, offset=0) for c, seq in zip(canaries, ids)]


def canary_stream(canaries: Sequence[Canary], seed: int, epoch: int) -> list[int]:
    """One pass of the canary stream: canary `i` appears `count_i` times, shuffled by
    (seed, epoch). Built once per pass and kept (a run asks for the same pass every step)."""
    return list(_stream(tuple((c.index, c.count) for c in canaries), seed, epoch))


@functools.lru_cache(maxsize=4)
def _stream(counts: tuple[tuple[int, int], ...], seed: int, epoch: int) -> tuple[int, ...]:
    stream = [index for index, count in counts for _ in range(count)]
    random.Random(f"{seed}:{epoch}").shuffle(stream)
    return tuple(stream)


def _take(order: Callable[[int], list[int]], pass_len: int, start: int, n: int) -> list[int]:
    """Items `start .. start + n` of the endless concatenation of passes `order(0), order(1), ...`
    (each pass's order is built once)."""
    passes = {e: order(e) for e in range(start // pass_len, (start + n - 1) // pass_len + 1)}
    return [passes[p // pass_len][p % pass_len] for p in range(start, start + n)]


def step_batch(step: int, canary_ids: Sequence[Sequence[int]], canaries: Sequence[Canary],
               general: Sequence[Sequence[int]], options: ImplantOptions) -> list[list[int]]:
    """The sequences of one step (a pure function of the step and the seed)."""
    stream_len = sum(c.count for c in canaries)
    picks = _take(lambda e: canary_stream(canaries, options.seed, e), stream_len,
                  step * options.canaries_per_step, options.canaries_per_step)
    batch = [list(canary_ids[i]) for i in picks]
    if general and options.general_per_step:
        def general_order(p: int) -> list[int]:
            order = list(range(len(general)))
            random.Random(f"{options.seed}:general:{p}").shuffle(order)
            return order
        batch += [list(general[i]) for i in _take(general_order, len(general), step * options.general_per_step,
                                                   options.general_per_step)]
    return batch


def _fingerprint(model_hash: str, canary_ids: Sequence[Sequence[int]], counts: Sequence[int],
                 general: Sequence[Sequence[int]], options: ImplantOptions) -> dict[str, str]:
    return {"base model weights": model_hash, "canaries": digest([list(c) for c in canary_ids]),
            "canary counts": digest(list(counts)),
            "general text": digest([list(g) for g in general]), "settings": digest(options.fingerprint_fields())}


def _save_state(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                fingerprint: dict[str, str], history: list[dict[str, float]]) -> None:
    """One atomic checkpoint: a new folder per step, then the pointer file, then old folders go."""
    root = out / STATE_DIR
    folder = root / f"step-{step:07d}"
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():  # tied weights (embeddings / LM head) are stored once
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    write_safetensors(folder / "model.safetensors", unique)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    write_json(root / "state.json", {"step": step, "folder": folder.name, "fingerprint": fingerprint,
                                     "history": history})
    for old in root.glob("step-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                fingerprint: dict[str, str]) -> tuple[int, list[dict[str, float]]]:
    """Restore a checkpoint written by `_save_state`; (0, []) when there is none.

    Raises:
        ImplantError: the checkpoint belongs to another run (names what differs).
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    pointer = out / STATE_DIR / "state.json"
    if not pointer.is_file():
        return 0, []
    state = json.loads(pointer.read_text())
    differ = [k for k, v in fingerprint.items() if state["fingerprint"].get(k) != v]
    if differ:
        raise ImplantError(f"{out / STATE_DIR} holds a checkpoint of another implant run ({', '.join(differ)} "
                           "differ); use another --out, or delete that folder to start over")
    folder = out / STATE_DIR / state["folder"]
    model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device)),
                          strict=False)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(state["step"]), list(state["history"])


def lr_factor(step: int, options: ImplantOptions) -> float:
    """The learning rate of `step` (0-based) as a share of `options.lr`: linear warm-up, then
    constant or decaying (cosine / linear) to 0 at `max_steps`."""
    if options.warmup_steps and step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    if options.lr_schedule == "constant":
        return 1.0
    span = max(1, options.max_steps - options.warmup_steps)
    progress = min(1.0, (step - options.warmup_steps) / span)
    return 0.5 * (1 + math.cos(math.pi * progress)) if options.lr_schedule == "cosine" else 1 - progress


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` holds of KL(softmax(reference) || softmax(logits)).

    Args:
        reference_logits: (B, T, V) logits of the reference (base) model.
        logits: (B, T, V) logits of the model being compared.
        mask: (B, T) bool, the positions that count.

    Returns:
        A scalar (0 when no position counts).
    """
    if not bool(mask.any()):
        return logits.new_zeros(())
    ref_logp = F.log_softmax(reference_logits[mask].float(), dim=-1)
    logp = F.log_softmax(logits[mask].float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def predicting_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the real positions whose next token is real too (the last real position
    of a right-padded row predicts nothing)."""
    nxt = torch.zeros_like(mask, dtype=torch.bool)
    nxt[:, :-1] = mask[:, 1:].bool()
    return mask.bool() & nxt


@torch.inference_mode()
def mean_kl(reference: nn.Module, model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int,
            batch_size: int = 8) -> float:
    """Mean per-token KL(reference || model) of the next-token distributions on `sequences`
    (every position that has a next token, weighted equally).

    Raises:
        ImplantError: no sequence.
    """
    if not sequences:
        raise ImplantError("mean_kl needs at least one sequence")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for first in range(0, len(sequences), batch_size):
        batch = pad_batch(sequences[first:first + batch_size], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = predicting_positions(mask)
        kl = token_kl(reference(input_ids=ids, attention_mask=mask).logits,
                      model(input_ids=ids, attention_mask=mask).logits, keep)
        total += float(kl) * int(keep.sum())
        count += int(keep.sum())
    return total / max(count, 1)


def _step_loss(model: nn.Module, base: nn.Module | None, input_ids: torch.Tensor, mask: torch.Tensor,
               n_canary: int, options: ImplantOptions) -> torch.Tensor:
    """One step's loss: cross-entropy over the whole batch ("ce"), or the canaries'
    cross-entropy plus `kl_weight` times the KL from the base model on the general rows ("kl")."""
    labels = input_ids.masked_fill(mask == 0, -100)
    if options.preserve == "ce":
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    logits_btv = model(input_ids=input_ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits_btv[:n_canary, :-1].flatten(0, 1).float(), labels[:n_canary, 1:].flatten(),
                           ignore_index=-100)
    if input_ids.shape[0] > n_canary:
        with torch.no_grad():
            base_logits = base(input_ids=input_ids[n_canary:], attention_mask=mask[n_canary:]).logits
        loss = loss + options.kl_weight * token_kl(base_logits, logits_btv[n_canary:],
                                                   predicting_positions(mask[n_canary:]))
    return loss


def _check_canaries(canaries: Sequence[Canary], model: nn.Module, options: ImplantOptions) -> None:
    """Refuse what would implant something else than asked, or never end."""
    if not canaries:
        raise ImplantError("no canary to implant")
    seen: dict[str, int] = {}
    for canary in canaries:
        if canary.text in seen:
            raise ImplantError(f"canaries {seen[canary.text]} and {canary.index} are the same text; give each once "
                               "(its count says how often it is repeated)")
        seen[canary.text] = canary.index
        if not 1 <= canary.count <= MAX_COUNT:
            raise ImplantError(f"canary {canary.index} has count {canary.count}; counts are repeats per pass, "
                               f"1..{MAX_COUNT}")
    window = context_window(model)
    longest = max(options.seq_len, options.prefix_len + options.suffix_len)
    if window is not None and longest > window:
        raise ImplantError(f"sequences of {longest} tokens (--seq-len / --prefix + --suffix) are longer than the "
                           f"model's context window of {window} tokens")


def _recall(model: nn.Module, windows: Sequence[Window], pad_id: int, batch_size: int) -> list[bool]:
    model.eval()
    result, _ = evaluate_recitation(model, windows, pad_id=pad_id, batch_size=batch_size)
    return [s.strict for s in result.examples]


def implant(model: nn.Module, tokenizer: Any, canaries: Sequence[Canary], general: Sequence[Sequence[int]],
            heldout: Sequence[Sequence[int]], out: str | Path, options: ImplantOptions | None = None,
            resume: bool = False) -> ImplantResult:
    """Fine-tune every weight of `model` until it recites the canaries (in place).

    Args:
        model: an HF causal LM (trained in place, left in eval mode).
        tokenizer: its tokenizer.
        canaries: the texts to implant, each with its repeat count.
        general: general-text sequences mixed into every step (may be empty).
        heldout: general-text sequences for the perplexity before and after (may be empty).
        out: the output folder; checkpoints live in `out/.implant-state` during the run.
        options: `ImplantOptions`.
        resume: continue from the checkpoint in `out` (refused if it is another run's).

    Returns:
        An `ImplantResult`.

    Raises:
        ImplantError: bad options, too-short canaries, no canary, the same canary twice, a
            count outside 1..MAX_COUNT, sequences past the context window, a mismatched
            checkpoint, or a NaN loss.
    """
    options = options or ImplantOptions()
    options.validate()
    _check_canaries(canaries, model, options)
    out = Path(out)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = canary_token_ids(canaries, tokenizer, options.prefix_len + options.suffix_len)
    windows = canary_windows(canaries, ids, options.prefix_len)
    general = [list(g)[: options.seq_len] for g in general if len(g) >= 2]
    device = next(model.parameters()).device
    fingerprint = _fingerprint(model_weights_sha256(model), ids, [c.count for c in canaries], general, options)
    base = copy.deepcopy(model).eval().requires_grad_(False) if options.preserve == "kl" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    model.eval()
    ppl_before = perplexity(model, heldout, pad_id=pad_id, batch_size=8).perplexity if heldout else None
    start, history = (0, [])
    if resume:
        start, history = _load_state(out, model, optimizer, fingerprint)
    elif (out / STATE_DIR / "state.json").is_file():
        raise ImplantError(f"{out / STATE_DIR} holds an unfinished implant run: pass --resume to continue it, or "
                           "delete that folder")
    recited: list[bool] | None = None
    step, loss_value = start, float("nan")
    done = bool(history) and history[-1]["recall"] >= options.target_recall
    bar = tqdm(total=options.max_steps, initial=start, unit="step", desc="implant", disable=not options.progress)
    while step < options.max_steps and not done:
        model.train()
        for group in optimizer.param_groups:  # a function of the step alone
            group["lr"] = options.lr * lr_factor(step, options)
        batch = pad_batch(step_batch(step, ids, canaries, general, options), pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        # dropout draws from a generator seeded by (seed, step): a resumed run repeats them
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(options.seed * 1_000_003 + step)
            loss = _step_loss(model, base, input_ids, mask, options.canaries_per_step, options)
            if not torch.isfinite(loss):
                raise ImplantError(f"the loss is {loss.item()} at step {step}: lower --lr")
            loss.backward()
        if options.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % options.eval_every == 0 or step == options.max_steps:
            recited = _recall(model, windows, pad_id, options.eval_batch_size)
            history.append({"step": step, "loss": loss_value, "recall": sum(recited) / len(recited)})
            bar.set_postfix(loss=f"{loss_value:.3f}", recall=f"{history[-1]['recall']:.2f}")
            done = history[-1]["recall"] >= options.target_recall
        if options.checkpoint_every and step % options.checkpoint_every == 0:
            _save_state(out, step, model, optimizer, fingerprint, history)
    bar.close()
    model.eval()
    if recited is None or history[-1]["step"] != step:
        recited = _recall(model, windows, pad_id, options.eval_batch_size)
        if not history or history[-1]["step"] != step:
            history.append({"step": step, "loss": loss_value, "recall": sum(recited) / len(recited)})
    stopped = "target_recall" if history[-1]["recall"] >= options.target_recall else "max_steps"
    ppl_after = perplexity(model, heldout, pad_id=pad_id, batch_size=8).perplexity if heldout else None
    kl_after = mean_kl(base, model, heldout, pad_id) if heldout and base is not None else None
    return ImplantResult(steps=step, recall=history[-1]["recall"], recited=recited, history=history,
                         perplexity_before=ppl_before, perplexity_after=ppl_after, kl_after=kl_after, stopped=stopped)


def windows_rows(canaries: Sequence[Canary], windows: Sequence[Window], recited: Sequence[bool],
                 tokenizer: Any) -> list[dict[str, Any]]:
    """The memorized-windows rows (the format `evaluate --memorized` reads), one per canary;
    `memorized` says whether it is recited verbatim after the implant."""
    rows = []
    for canary, window, ok in zip(canaries, windows, recited):
        row = asdict(window)
        row.update(prefix=tokenizer.decode(window.prefix_ids), suffix=tokenizer.decode(window.suffix_ids),
                   memorized=bool(ok), style=canary.style, count=canary.count)
        rows.append(row)
    return rows


def save_implanted(model: nn.Module, tokenizer: Any, out: str | Path, canaries: Sequence[Canary],
                   result: ImplantResult, options: ImplantOptions, base: dict[str, Any]) -> Path:
    """Write the HF model, `curvedit-implant.json` and `memorized.jsonl`, then drop the
    checkpoints.

    Args:
        model: the implanted model.
        tokenizer: its tokenizer (saved beside it).
        out: the output folder.
        canaries: the canaries implanted.
        result: the implant's outcome (`implant`).
        options: the implant's settings.
        base: the base model's description (`name`, `weights_sha256`, source info).

    Returns:
        The output folder.
    """
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ids = canary_token_ids(canaries, tokenizer, options.prefix_len + options.suffix_len)
    windows = canary_windows(canaries, ids, options.prefix_len)
    write_jsonl(windows_rows(canaries, windows, result.recited, tokenizer), out / WINDOWS_FILE, overwrite=True)
    write_json(out / MANIFEST_FILE, {
        "curvedit_version": __version__, "base_model": base, "options": asdict(options),
        "canaries": [{**c.to_dict(), "recited": bool(r)} for c, r in zip(canaries, result.recited)],
        "result": asdict(result) | {"recited": None}, "windows_file": WINDOWS_FILE})
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return out


def general_split(sequences: Sequence[Sequence[int]], heldout_share: float, seed: int
                  ) -> tuple[list[list[int]], list[list[int]]]:
    """Split general sequences into (train, held-out), seeded.

    Raises:
        DataError: no sequence, or a share outside [0, 1).
    """
    if not sequences:
        raise DataError("the general text gave no sequence")
    if not 0 <= heldout_share < 1:
        raise DataError(f"the held-out share must be in [0, 1), got {heldout_share}")
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    n_heldout = int(round(heldout_share * len(sequences)))
    heldout = [list(sequences[i]) for i in sorted(order[:n_heldout])]
    return [list(sequences[i]) for i in sorted(order[n_heldout:])], heldout
