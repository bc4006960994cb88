"""Batched greedy decoding with a KV cache and left padding, and padded forward passes.

Every evaluation in this package decodes greedily: at each step the arg-max token is
appended (ties go to the lowest id, as `torch.argmax` breaks them). Prompts of a batch
are left padded so that they all end at the last column; position ids are derived from
the attention mask, so a padded prompt sees exactly the positions it would see alone.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Iterator, Sequence

import torch

from curvedit.data import pad_batch
from curvedit.distributed import map_batches
from curvedit.errors import EvaluateError
from curvedit.models import context_window, model_device


def check_fits_context(model: torch.nn.Module, length: int, what: str) -> None:
    """Raise when `length` tokens exceed the model's context window.

    Args:
        model: the model that will read the sequence.
        length: the number of tokens it will read.
        what: how to name the sequence in the error ("prefix + suffix", ...).

    Raises:
        EvaluateError: the sequence is longer than the context window.
    """
    limit = context_window(model)
    if limit is not None and length > limit:
        raise EvaluateError(f"{what} is {length} tokens, longer than the model's context window of {limit} tokens")


def check_vocabulary(model: torch.nn.Module, sequences: Sequence[Sequence[int]], what: str) -> None:
    """Refuse token ids the model has no embedding for (data made with another tokenizer).

    Args:
        model: the model that will read (or be scored against) the ids.
        sequences: token-id sequences.
        what: how to name them in the error ("memorized windows of mem.jsonl", ...).

    Raises:
        EvaluateError: an id below 0 or at least the vocabulary size.
    """
    vocab = _ForwardSpec(model).vocab
    if vocab is None or not sequences:
        return
    for seq in sequences:  # Python ints: an id too large for int64 is reported, not overflowed
        if seq and (min(seq) < 0 or max(seq) >= vocab):
            bad = next(t for t in seq if t < 0 or t >= vocab)
            raise EvaluateError(f"{what}: token id {bad} is outside the model's vocabulary of {vocab} ids "
                                "(made with another tokenizer?)")


def check_windows(model: torch.nn.Module, windows: Sequence[Any], what: str) -> None:
    """The one check of memorized windows before any command uses them: every id inside the
    vocabulary, every prefix + suffix inside the context window.

    Args:
        model: the model that will read them.
        windows: `curvedit.evaluate.windows.Window`s.
        what: how to name them in the error ("memorized windows of mem.jsonl").

    Raises:
        EvaluateError: an id outside the vocabulary, or a window longer than the context.
    """
    check_vocabulary(model, [list(w.prefix_ids) + list(w.suffix_ids) for w in windows], what)
    if windows:
        longest = max(len(w.prefix_ids) + len(w.suffix_ids) for w in windows)
        check_fits_context(model, longest, f"the longest of the {what} (prefix + suffix)")


class _ForwardSpec:
    """Which keyword arguments a model's forward accepts (names changed across transformers versions)."""

    def __init__(self, model: torch.nn.Module) -> None:
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.position_ids = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params
        try:
            self.vocab: int | None = getattr(model.get_input_embeddings(), "num_embeddings", None)
        except (AttributeError, NotImplementedError):
            self.vocab = None

    def check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Raises: EvaluateError: a real (unpadded) token id outside the model's vocabulary."""
        if self.vocab is None:
            return
        real = input_ids[attention_mask.bool()]
        outside = real[(real < 0) | (real >= self.vocab)]
        if outside.numel():
            raise EvaluateError(f"token id {int(outside[0])} is outside the model's vocabulary of {self.vocab} ids "
                                "(windows or text made for another tokenizer?)")


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: each real token's index among the real tokens of its row."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _forward_kwargs(spec: _ForwardSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments of a cache-free forward over a padded batch (its ids checked).

    Raises:
        EvaluateError: a token id outside the vocabulary, or a left-padded batch and a model
            that takes no `position_ids`.
    """
    spec.check_ids(input_ids, attention_mask)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if spec.position_ids:
        kwargs["position_ids"] = _position_ids(attention_mask)
    elif bool((attention_mask[:, 0] == 0).any()):
        raise EvaluateError("this model's forward takes no position_ids, so left-padded batches would be "
                            "mis-positioned")
    return kwargs


HEAD_CHUNK_ELEMENTS = 1 << 24
"""At most this many logits (positions x vocabulary) are computed at once by `kept_logits` (64 MiB in float32)."""

_FULL_LOGITS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
"""Models found not to compute their logits as their output embeddings applied to their decoder's output."""


def _decoder_hidden(model: torch.nn.Module, spec: _ForwardSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.nn.Linear] | None:
    """The decoder's final hidden states and the LM head, when the model's logits are `head(hidden)`.

    One forward pass that computes logits at the last position only (`logits_to_keep=1`)
    while a hook keeps the decoder's output. The model counts as separable when those
    logits equal its output embeddings applied to the kept hidden state at the last
    position, bit for bit (a model that rescales or soft-caps its logits does not);
    a model that is not is remembered and not tried again.

    Args:
        model: an HF causal LM.
        spec: its forward's keyword arguments.
        input_ids: long (B, T), left or right padded.
        attention_mask: long (B, T), 1 at real tokens.

    Returns:
        (hidden (B, T, H), head), or None: the model takes no `logits_to_keep`, has no
        linear output embeddings or decoder, or its logits are not `head(hidden)`.

    Raises:
        EvaluateError: the batch is left padded and the model takes no `position_ids`.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not spec.logits_to_keep or not isinstance(head, torch.nn.Linear) or not hasattr(model, "get_decoder") \
            or model in _FULL_LOGITS:
        return None
    captured: list[Any] = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        logits = model(**_forward_kwargs(spec, input_ids, attention_mask), logits_to_keep=1).logits
    finally:
        handle.remove()
    hidden = captured[0] if len(captured) == 1 else None
    if (not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != input_ids.shape
            or not torch.equal(logits[:, -1], head(hidden[:, -1:])[:, -1].to(logits.dtype))):
        _FULL_LOGITS.add(model)
        return None
    return hidden, head


@torch.inference_mode()
def kept_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Logits at the kept positions of a padded batch only, a bounded chunk at a time.

    The model runs once. Where its logits are its LM head applied to its decoder's
    final hidden states (`_decoder_hidden` checks), the head is applied only to the
    kept positions' hidden states, at most `HEAD_CHUNK_ELEMENTS` logits at a time, so
    neither the time nor the memory of 49k-way logits is spent where they are not
    needed. Otherwise the logits of every position are computed and the kept ones are
    handed out in the same chunks.

    Args:
        model: an HF causal LM.
        input_ids: long (B, T), left or right padded (position ids ignore the padding).
        attention_mask: long (B, T), 1 at real tokens.
        keep: bool (B, T), the positions whose logits are wanted.

    Returns:
        An iterator of (rows, logits): `rows` is the slice of the kept positions, in
        row-major order, that `logits` (len(rows), V) in the model's dtype covers.

    Raises:
        EvaluateError: the batch is left padded and the model takes no `position_ids`.
    """
    spec = _ForwardSpec(model)
    split = _decoder_hidden(model, spec, input_ids, attention_mask)
    if split is None:
        kept, head = model(**_forward_kwargs(spec, input_ids, attention_mask)).logits[keep], None
        vocab = kept.shape[-1]
    else:
        hidden, head = split
        kept, vocab = hidden[keep], head.out_features
    step = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    for start in range(0, kept.shape[0], step):
        chunk = kept[start : start + step]
        yield slice(start, start + chunk.shape[0]), chunk if head is None else head(chunk)


@torch.inference_mode()
def _generate_batch(
    model: torch.nn.Module,
    spec: _ForwardSpec,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    stop_ids: torch.Tensor | None,
) -> list[list[int]]:
    """Decode one left-padded batch; rows are cut after their first stop id."""
    device = model_device(model)
    batch = pad_batch(prompts, pad_id, padding_side="left")
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    spec.check_ids(input_ids, mask)
    if not spec.position_ids and bool((mask == 0).any()):
        raise EvaluateError("this model's forward takes no position_ids, so left-padded batches would be "
                            "mis-positioned")
    positions = _position_ids(mask)
    generated = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache = None
    for step in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": True}
        if cache is not None:
            kwargs[spec.cache_kw] = cache
        if spec.position_ids:
            kwargs["position_ids"] = positions
        if spec.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        cache = out[spec.cache_kw]
        next_token = out.logits[:, -1, :].argmax(dim=-1)
        if stop_ids is not None:
            next_token = torch.where(done, torch.full_like(next_token, pad_id), next_token)
            generated[:, step] = next_token
            done |= torch.isin(next_token, stop_ids)
            if bool(done.all()):
                generated = generated[:, : step + 1]
                break
        else:
            generated[:, step] = next_token
        input_ids = next_token[:, None]
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
    if stop_ids is None:
        return generated.tolist()
    hit = torch.isin(generated, stop_ids)
    lengths = torch.where(hit.any(dim=1), hit.int().argmax(dim=1) + 1, generated.shape[1]).tolist()
    return [row[:length] for row, length in zip(generated.tolist(), lengths)]


def greedy_generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    batch_size: int = 32,
    stop_ids: Sequence[int] = (),
    progress: Any | None = None,
) -> list[list[int]]:
    """Greedy-decode a continuation of each prompt, in left-padded batches with a KV cache.

    Prompts are sorted by length before batching (less padding) and the results are
    returned in the input order. The output equals decoding each prompt alone.

    Args:
        model: an HF causal LM in eval mode.
        prompts: token-id prompts (none empty).
        max_new_tokens: tokens to generate per prompt (0 gives empty lists).
        pad_id: the id written at padded positions (masked out).
        batch_size: prompts per forward pass.
        stop_ids: a row stops after emitting one of these ids (kept as its last token);
            decoding ends early once every row of a batch has stopped.
        progress: a tqdm bar to advance by the number of prompts of each batch.

    Returns:
        For each prompt, its generated ids: `max_new_tokens` of them, or fewer when
        a stop id came first (the stop id included).

    Raises:
        EvaluateError: negative max_new_tokens, or a prompt plus its continuation longer
            than the model's context window.
        curvedit.data.DataError: an empty prompt or a batch_size below 1.
    """
    if max_new_tokens < 0:
        raise EvaluateError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    check_fits_context(model, longest + max_new_tokens, f"the longest prompt ({longest}) + {max_new_tokens} new tokens")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    spec = _ForwardSpec(model)
    stop = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long, device=model_device(model)) if stop_ids else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def decode(chunk: list[int]) -> list[list[int]]:
        tokens = _generate_batch(model, spec, [prompts[i] for i in chunk], max_new_tokens, pad_id, stop)
        if progress is not None:
            progress.update(len(chunk))
        return tokens

    results: list[list[int]] = [[] for _ in prompts]
    for index, tokens in zip(order, map_batches(order, batch_size, decode)):
        results[index] = tokens
    return results

