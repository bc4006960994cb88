"""Batched greedy decoding with a KV cache and left padding, and padded forward passes.

Every evaluation in this package decodes greedily: at each step the arg-max token is
appended (ties go to the lowest id, as `torch.argmax` breaks them). Prompts of a batch
are left padded so that they all end at the last column; position ids are derived from
the attention mask, so a padded prompt sees exactly the positions it would see alone.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from curvedit.data import pad_batch
from curvedit.distributed import map_batches

_CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_window(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, read from its config.

    Args:
        model: an HF causal LM (or any module with a `config`).

    Returns:
        The first of `n_positions`, `max_position_embeddings`, `n_ctx`,
        `max_sequence_length`, `seq_length` that the config sets; None if none is set.
    """
    config = getattr(model, "config", None)
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits_context(model: torch.nn.Module, length: int, what: str) -> None:
    """Raise when `length` tokens exceed the model's context window.

    Args:
        model: the model that will read the sequence.
        length: the number of tokens it will read.
        what: how to name the sequence in the error ("prefix + suffix", ...).

    Raises:
        ValueError: the sequence is longer than the context window.
    """
    limit = context_window(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what} is {length} tokens, longer than the model's context window of {limit} tokens")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _ForwardSpec:
    """Which keyword arguments a model's forward accepts (names changed across transformers versions)."""

    def __init__(self, model: torch.nn.Module) -> None:
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.position_ids = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    keep_last: int | None = None,
) -> torch.Tensor:
    """Logits of a padded batch, with position ids that ignore left padding.

    Args:
        model: an HF causal LM.
        input_ids: long (B, T), left or right padded.
        attention_mask: long (B, T), 1 at real tokens.
        keep_last: return only the logits of the last `keep_last` positions (computed
            only there when the model supports `logits_to_keep`).

    Returns:
        Logits (B, T or keep_last, V) in the model's dtype.

    Raises:
        ValueError: the batch is left padded and the model takes no `position_ids`.
    """
    spec = _ForwardSpec(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    left_padded = bool((attention_mask[:, 0] == 0).any())
    if spec.position_ids:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    elif left_padded:
        raise ValueError("this model's forward takes no position_ids, so left-padded batches would be mis-positioned")
    if keep_last is not None and spec.logits_to_keep:
        kwargs["logits_to_keep"] = keep_last
    logits = model(**kwargs).logits
    return logits[:, -keep_last:] if keep_last is not None else logits


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
    if not spec.position_ids and bool((mask == 0).any()):
        raise ValueError("this model's forward takes no position_ids, so left-padded batches would be mis-positioned")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
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
        ValueError: negative max_new_tokens, or a prompt plus its continuation longer
            than the model's context window.
        curvedit.data.DataError: an empty prompt or a batch_size below 1.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
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

