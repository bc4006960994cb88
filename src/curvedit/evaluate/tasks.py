"""Task probes from small JSONL files, and a bridge to lm-evaluation-harness.

A tasks directory holds one `.jsonl` file per task family; the family's name is the
file stem. Each non-empty line is one JSON object:

- `{"type": "generate", "prompt": "...", "answer": "..." | ["...", ...]}`: the model
  greedily continues `fewshot + prompt` (at most `max_new_tokens` tokens); the output is
  cut at the first newline (decoding also stops at EOS) and is correct when, stripped
  of surrounding whitespace, it equals one of the answers (also stripped; one line each).
- `{"type": "choice", "prompt": "...", "choices": ["...", ...], "answer": 0}`: each
  choice is scored by the summed log-likelihood of its tokens after `fewshot + prompt`
  (with `"normalize": true`, the mean per choice token); the best-scoring choice is
  the prediction.

Optional item fields: `fewshot` (text put before the prompt), `max_new_tokens`
(generate), `normalize` (choice). The first line may be a header,
`{"type": "header", "fewshot": "...", "max_new_tokens": 16, "normalize": false}`, whose
values are the defaults of every item of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from curvedit.data import DataError, iter_jsonl, pad_batch
from curvedit.distributed import map_batches
from curvedit.errors import EvaluateError
from curvedit.evaluate.generation import check_fits_context, greedy_generate, kept_logits
from curvedit.models import model_device

DEFAULT_MAX_NEW_TOKENS = 32


class TaskFormatError(DataError):
    """A task file that does not follow the documented format (message names file and line)."""


@dataclass(frozen=True)
class GenerateItem:
    """An exact-match generation probe.

    Attributes:
        prompt: the question text.
        answers: accepted answers (compared after stripping whitespace).
        fewshot: text put before the prompt.
        max_new_tokens: the most tokens to generate.
        line: the line number in the task file.
    """

    prompt: str
    answers: tuple[str, ...]
    fewshot: str = ""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    line: int = 0


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice probe scored by log-likelihood.

    Attributes:
        prompt: the question text.
        choices: the candidate continuations (at least 2).
        answer: index of the correct choice.
        fewshot: text put before the prompt.
        normalize: rank by mean log-likelihood per choice token instead of the sum.
        line: the line number in the task file.
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int
    fewshot: str = ""
    normalize: bool = False
    line: int = 0


@dataclass(frozen=True)
class Task:
    """One task family (one file).

    Attributes:
        name: the file stem.
        path: the file.
        items: its probes, in file order.
    """

    name: str
    path: Path
    items: tuple[GenerateItem | ChoiceItem, ...]


_HEADER_KEYS = {"type", "fewshot", "max_new_tokens", "normalize"}
_GENERATE_KEYS = {"type", "prompt", "answer", "fewshot", "max_new_tokens"}
_CHOICE_KEYS = {"type", "prompt", "choices", "answer", "fewshot", "normalize"}


def _check(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise TaskFormatError(f"{where}: {message}")


def _parse_item(row: dict[str, Any], defaults: dict[str, Any], where: str, line: int) -> GenerateItem | ChoiceItem:
    kind = row.get("type")
    allowed = {"generate": _GENERATE_KEYS, "choice": _CHOICE_KEYS}.get(kind)
    _check(allowed is not None, where,
           f"'type' must be 'generate' or 'choice' (or 'header' on the first line), got {kind!r}")
    unknown = sorted(set(row) - allowed)
    _check(not unknown, where, f"unknown field(s) {unknown} for a {kind!r} item (allowed: {sorted(allowed)})")
    _check(isinstance(row.get("prompt"), str), where, "'prompt' must be a string")
    fewshot = row.get("fewshot", defaults.get("fewshot", ""))
    _check(isinstance(fewshot, str), where, "'fewshot' must be a string")
    _check(bool(fewshot + row["prompt"]), where, "the prompt (with its few-shot prefix) is empty")
    if kind == "generate":
        answer = row.get("answer")
        answers = [answer] if isinstance(answer, str) else answer
        _check(isinstance(answers, list) and bool(answers) and all(isinstance(a, str) for a in answers), where,
               "'answer' must be a string or a non-empty list of strings")
        _check(not any("\n" in a.strip() for a in answers), where,
               "an answer must be one line (the output is cut at the first newline)")
        max_new = row.get("max_new_tokens", defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        _check(isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1, where,
               "'max_new_tokens' must be a positive integer")
        return GenerateItem(row["prompt"], tuple(answers), fewshot, max_new, line)
    choices = row.get("choices")
    _check(isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices), where,
           "'choices' must be a list of at least 2 non-empty strings")
    answer = row.get("answer")
    _check(isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices), where,
           f"'answer' must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}")
    normalize = row.get("normalize", defaults.get("normalize", False))
    _check(isinstance(normalize, bool), where, "'normalize' must be true or false")
    return ChoiceItem(row["prompt"], tuple(choices), answer, fewshot, normalize, line)


def parse_task_file(path: str | Path) -> Task:
    """Read one task file (format in the module docstring).

    Args:
        path: a `.jsonl` task file; the task is named after its stem.

    Returns:
        The `Task`.

    Raises:
        TaskFormatError: a malformed line (the message gives file and line number), a
            header that is not the first line, or a file without items.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    defaults: dict[str, Any] = {}
    items: list[GenerateItem | ChoiceItem] = []
    first = True
    for line_no, where, row in iter_jsonl(path, TaskFormatError):
        if row.get("type") == "header":
            _check(first, where, "a header must be the first line of the file")
            unknown = sorted(set(row) - _HEADER_KEYS)
            _check(not unknown, where, f"unknown header field(s) {unknown} (allowed: {sorted(_HEADER_KEYS)})")
            defaults = row
        else:
            items.append(_parse_item(row, defaults, where, line_no))
        first = False
    _check(bool(items), str(path), "the task file has no items")
    return Task(name=path.stem, path=path, items=tuple(items))


def load_tasks(path: str | Path) -> list[Task]:
    """Read a tasks directory (every `*.jsonl` file, sorted by name) or a single task file.

    Args:
        path: a directory or a `.jsonl` file.

    Returns:
        The tasks.

    Raises:
        TaskFormatError: a malformed file, or a directory without `.jsonl` files.
        FileNotFoundError: the path does not exist.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise TaskFormatError(f"{path}: no .jsonl task file in the directory")
        return [parse_task_file(file) for file in files]
    return [parse_task_file(path)]


@dataclass(frozen=True)
class TaskOptions:
    """How task probes are run.

    Attributes:
        batch_size: sequences per forward pass / decoding batch.
        limit: score at most this many items per task (None: all).
    """

    batch_size: int = 16
    limit: int | None = None

    def validate(self) -> None:
        """Raise EvaluateError for a batch size below 1 or a limit below 1."""
        if self.batch_size < 1:
            raise EvaluateError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise EvaluateError(f"the item limit must be at least 1 (or None for all), got {self.limit}")


@dataclass
class TaskResult:
    """The score of one task family.

    Attributes:
        name: the task name.
        n: items scored.
        accuracy: share of correct items.
        details: per item: line, type, correct, and the prediction.
    """

    name: str
    n: int
    accuracy: float
    details: list[dict[str, Any]] = field(default_factory=list)


class _Encoder:
    """Text -> ids without special tokens, with a BOS prefix when the tokenizer adds one by default."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        self.bos: list[int] = [bos] if adds_bos else []

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context ids (with BOS) and continuation ids, tokenized together where possible.

        Trailing spaces of the context move to the continuation; the continuation ids are
        those that the whole text adds after the context ids (its own encoding if the
        whole text does not start with the context's ids).
        """
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self(context)
        whole = self(context + continuation)
        if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
            continuation_ids = whole[len(context_ids):]
        else:
            continuation_ids = self(continuation)
        return self.bos + context_ids, continuation_ids


def _stop_ids(tokenizer: Any) -> list[int]:
    """Ids of EOS and of every token whose text contains a newline."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stops = [i for i, text in enumerate(texts) if "\n" in text]
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    return stops


@torch.inference_mode()
def choice_scores(
    model: torch.nn.Module, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int = 0, batch_size: int = 16
) -> list[tuple[float, int]]:
    """Summed log-likelihood of each continuation given its context.

    Args:
        model: an HF causal LM.
        pairs: (context ids, continuation ids); both non-empty.
        pad_id: padding id.
        batch_size: sequences per forward pass.

    Returns:
        Per pair, (sum of log p(continuation token | everything before), number of
        continuation tokens).

    Raises:
        EvaluateError: an empty context or continuation, or a pair longer than the context window.
    """
    if any(not ctx or not cont for ctx, cont in pairs):
        raise EvaluateError("choice scoring needs a non-empty context and continuation")
    if pairs:
        check_fits_context(model, max(len(ctx) + len(cont) for ctx, cont in pairs), "a prompt with its choice")
    device = model_device(model)

    def batch_scores(chunk: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        batch = pad_batch([ctx + cont for ctx, cont in chunk], pad_id, padding_side="right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        starts = torch.tensor([len(ctx) - 1 for ctx, _ in chunk], device=device)[:, None]
        lengths = torch.tensor([len(cont) for _, cont in chunk], device=device)[:, None]
        position = torch.arange(ids.shape[1], device=device)[None, :]
        predicting = (position >= starts) & (position < starts + lengths)  # position t predicts token t + 1
        targets = ids.roll(-1, dims=1)[predicting]
        row_of = torch.arange(len(chunk), device=device)[:, None].expand_as(ids)[predicting]
        sums = torch.zeros(len(chunk), device=device)
        for rows, logits in kept_logits(model, ids, mask, predicting):
            sums.index_add_(0, row_of[rows], -F.cross_entropy(logits.float(), targets[rows], reduction="none"))
        return list(zip(sums.tolist(), lengths[:, 0].tolist()))

    return map_batches(pairs, batch_size, batch_scores)


def _run_choice(model, encoder: _Encoder, items: list[ChoiceItem], pad_id: int, batch_size: int) -> list[dict]:
    pairs = [encoder.split(item.fewshot + item.prompt, choice) for item in items for choice in item.choices]
    scores = iter(choice_scores(model, pairs, pad_id=pad_id, batch_size=batch_size))
    details = []
    for item in items:
        item_scores = [next(scores) for _ in item.choices]
        ranked = [total / count if item.normalize else total for total, count in item_scores]
        predicted = max(range(len(ranked)), key=ranked.__getitem__)
        details.append({"line": item.line, "type": "choice", "correct": predicted == item.answer,
                        "predicted": predicted, "answer": item.answer, "scores": ranked})
    return details


def _run_generate(model, encoder: _Encoder, items: list[GenerateItem], pad_id: int, batch_size: int,
                  stop_ids: list[int]) -> list[dict]:
    outputs: dict[int, str] = {}
    for max_new in sorted({item.max_new_tokens for item in items}):
        group = [i for i, item in enumerate(items) if item.max_new_tokens == max_new]
        prompts = [encoder.bos + encoder(items[i].fewshot + items[i].prompt) for i in group]
        generated = greedy_generate(model, prompts, max_new, pad_id=pad_id, batch_size=batch_size, stop_ids=stop_ids)
        for i, ids in zip(group, generated):
            outputs[i] = encoder.tokenizer.decode(ids, skip_special_tokens=True).split("\n", 1)[0].strip()
    return [{"line": item.line, "type": "generate", "correct": outputs[i] in {a.strip() for a in item.answers},
             "output": outputs[i], "answers": list(item.answers)} for i, item in enumerate(items)]


def run_tasks(
    model: torch.nn.Module, tokenizer: Any, tasks: Sequence[Task], options: TaskOptions | None = None,
    *, pad_id: int = 0,
) -> list[TaskResult]:
    """Score the model on task probes.

    Args:
        model: an HF causal LM in eval mode.
        tokenizer: its tokenizer (the probes are text).
        tasks: from `load_tasks`.
        options: batch size and item limit.
        pad_id: padding id.

    Returns:
        One `TaskResult` per task, in input order.

    Raises:
        EvaluateError: no tokenizer, or a prompt too long for the context window.
    """
    if tokenizer is None:
        raise EvaluateError("task probes are text: the model needs a tokenizer")
    options = options or TaskOptions()
    options.validate()
    encoder = _Encoder(tokenizer)
    stop_ids: list[int] | None = None
    results = []
    for task in tasks:
        items = list(task.items[: options.limit] if options.limit is not None else task.items)
        generate = [item for item in items if isinstance(item, GenerateItem)]
        choice = [item for item in items if isinstance(item, ChoiceItem)]
        details = _run_choice(model, encoder, choice, pad_id, options.batch_size) if choice else []
        if generate:
            stop_ids = _stop_ids(tokenizer) if stop_ids is None else stop_ids
            details += _run_generate(model, encoder, generate, pad_id, options.batch_size, stop_ids)
        details.sort(key=lambda d: d["line"])
        results.append(TaskResult(task.name, len(details), sum(d["correct"] for d in details) / len(details), details))
    return results


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness tasks on an in-memory model (its `HFLM` wrapper).

    Args:
        model: an HF causal LM (already loaded, possibly edited).
        tokenizer: its tokenizer.
        tasks: lm-eval task names ("boolq", "winogrande", ...). Built-in tasks fetch
            their data sets from the hub on first use.
        batch_size: lm-eval batch size.
        limit: at most this many documents per task (a float < 1: a share of them).
        num_fewshot: few-shot examples (None: each task's default).
        include_path: a folder of custom task YAML files.
        include_defaults: also index lm-eval's built-in tasks (slower to start).

    Returns:
        Per task, its numeric metrics as lm-eval names them ("acc,none", ...), without
        standard errors.

    Raises:
        ImportError: lm-eval (with its `hf` extra) is not installed.
        EvaluateError: no task name, or a name lm-eval does not know.
    """
    if not tasks:
        raise EvaluateError("give at least one lm-eval task name")
    try:
        import lm_eval  # noqa: PLC0415 - optional dependency
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(f"--lm-eval-tasks needs lm-evaluation-harness: pip install 'lm-eval[hf]' ({err})") from err
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise EvaluateError(f"lm-eval does not know the task(s) {unknown}")
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a share of the documents
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
    output = lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                     task_manager=manager, log_samples=False, bootstrap_iters=0)
    return {task: {metric: float(value) for metric, value in metrics.items()
                   if "," in metric and "stderr" not in metric and isinstance(value, (int, float))
                   and not isinstance(value, bool)}
            for task, metrics in output["results"].items()}

