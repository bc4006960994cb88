"""Text sampled from the model itself: `curvedit sample`.

With no pretraining corpus at hand, a model's own samples are the closest offline stand-in
for its training distribution. They serve as factor data (`collect --data samples.jsonl`:
inputs and sampled labels then both come from the model) and as replay text for
`implant --replay-samples`.

Every sequence starts from one start token (BOS by default) and is drawn by ancestral
sampling at a temperature, in batches with a KV cache. Randomness is drawn per sequence:
sequence `i` uses uniforms from its own generator seeded by `(seed, i)` and picks the token
whose cumulative probability first exceeds its uniform (inverse-CDF sampling), so a
sequence does not depend on the batch size or on the other sequences, up to float round-off
in batched matrix products. A sequence ends at EOS (kept) or at `seq_len` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from curvedit.errors import CurveditError
from curvedit.evaluate.generation import _ForwardSpec
from curvedit.models import context_window


class SampleError(CurveditError):
    """A sampling request that cannot run (bad settings, no start token)."""


@dataclass(frozen=True)
class SampleOptions:
    """How sequences are sampled.

    Attributes:
        n: sequences to draw.
        seq_len: the most tokens per sequence, the start token included.
        temperature: softmax temperature (1 samples the model's own distribution).
        seed: the seed; sequence `i` draws from a generator seeded by (seed, i).
        batch_size: sequences decoded together.
        start_id: the first token of every sequence (None: the tokenizer's BOS, else its EOS).
        progress: show a progress bar.
    """

    n: int = 256
    seq_len: int = 128
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    start_id: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raises: SampleError: a setting out of its range."""
        if self.n < 1:
            raise SampleError(f"the number of sequences must be >= 1, got {self.n}")
        if self.seq_len < 2:
            raise SampleError(f"seq_len must be >= 2 (a start token and one sampled token), got {self.seq_len}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise SampleError(f"the temperature must be a positive number, got {self.temperature}")
        if self.batch_size < 1:
            raise SampleError(f"the batch size must be >= 1, got {self.batch_size}")


def start_token(tokenizer: Any | None, options: SampleOptions) -> int:
    """The start id: `options.start_id`, else BOS, else EOS.

    Raises:
        SampleError: none of them exists.
    """
    if options.start_id is not None:
        return options.start_id
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            return int(value)
    raise SampleError("the tokenizer has neither a BOS nor an EOS token: give a start token id (--start-id)")


def sequence_uniforms(seed: int, index: int, length: int) -> torch.Tensor:
    """The uniforms sequence `index` consumes, one per sampled position (float64)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.rand(length, generator=generator, dtype=torch.float64)


def pick_tokens(probs_bv: torch.Tensor, uniforms_b: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: per row, the first token whose cumulative probability exceeds the uniform."""
    cdf_bv = probs_bv.double().cumsum(dim=-1)
    cdf_bv = cdf_bv / cdf_bv[:, -1:]
    picked = torch.searchsorted(cdf_bv, uniforms_b[:, None].to(cdf_bv.device).contiguous(), right=True)[:, 0]
    return picked.clamp_(max=probs_bv.shape[-1] - 1)


@torch.inference_mode()
def _sample_batch(model: torch.nn.Module, start: int, indices: range, options: SampleOptions,
                  eos: int | None) -> list[list[int]]:

    cache_kw = _ForwardSpec(model).cache_kw
    device = next(model.parameters()).device
    rows = len(indices)
    steps = options.seq_len - 1
    uniforms_bt = torch.stack([sequence_uniforms(options.seed, i, steps) for i in indices])
    tokens_bt = torch.full((rows, options.seq_len), start, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), options.seq_len, dtype=torch.long, device=device)
    cache, step_ids = None, tokens_bt[:, :1]
    for t in range(steps):
        out = model(input_ids=step_ids, use_cache=True, **({cache_kw: cache} if cache is not None else {}))
        cache = out[cache_kw]
        probs_bv = torch.softmax(out.logits[:, -1, :].float() / options.temperature, dim=-1)
        if not bool(torch.isfinite(probs_bv).all()):
            raise SampleError(f"the model's next-token distribution holds NaN or inf at step {t + 1}")
        picked = pick_tokens(probs_bv, uniforms_bt[:, t])
        tokens_bt[:, t + 1] = picked
        if eos is not None:
            ended = ~done & (picked == eos)
            lengths = torch.where(ended, torch.full_like(lengths, t + 2), lengths)
            done |= ended
            if bool(done.all()):
                break
        step_ids = picked[:, None]
    return [row[:length] for row, length in zip(tokens_bt.tolist(), lengths.tolist())]


def sample_sequences(model: torch.nn.Module, tokenizer: Any | None, options: SampleOptions | None = None
                     ) -> list[list[int]]:
    """Draw sequences from the model's own distribution.

    Args:
        model: an HF causal LM (put in eval mode).
        tokenizer: its tokenizer (for the start and end tokens); may be None with `start_id` set.
        options: `SampleOptions`.

    Returns:
        `options.n` token-id lists, each starting with the start token and ending at EOS
        (kept) or at `seq_len` tokens.

    Raises:
        SampleError: bad options, no start token, a `seq_len` past the model's context window, or
            a next-token distribution that is not finite.
    """
    options = options or SampleOptions()
    options.validate()
    window = context_window(model)
    if window is not None and options.seq_len > window:
        raise SampleError(f"seq_len {options.seq_len} is longer than the model's context window ({window})")
    start = start_token(tokenizer, options)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if start < 0 or (vocab is not None and start >= vocab):
        raise SampleError(f"start token id {start} is outside the vocabulary (0..{vocab - 1 if vocab else '?'})")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    model.eval()
    sequences: list[list[int]] = []
    with tqdm(total=options.n, unit="seq", desc="sample", disable=not options.progress) as bar:
        for first in range(0, options.n, options.batch_size):
            batch = range(first, min(options.n, first + options.batch_size))
            sequences += _sample_batch(model, start, batch, options, eos)
            bar.update(len(batch))
    return sequences
