"""Collection and evaluation on a SmolLM2-135M-shaped model, each read against its floor.

The model has SmolLM2-135M's exact config (30 Llama blocks, hidden 576, MLP 1536, 9
query / 3 key-value heads, a tied 49152-token LM head), random-initialised unless
`--model PATH` loads a real checkpoint. On this vocabulary the LM head is a large part
of a forward pass, and 49152-way logits at every position are large tensors, so each
step is timed against the plain pass over the same tokens, in this process:

- collection (`collect_factors`, sampled labels, the MLPs of the last 3 blocks) vs a
  plain forward+backward of the summed loss;
- find-memorized (windows of 64 + 48 tokens; `--planted` of them, spread evenly, are the
  model's own greedy continuation, so they pass the teacher-forced screen and are
  decoded; as in real corpora, most batches hold none or one) vs a plain forward over
  the windows' tokens;
- recitation (`evaluate_recitation`: greedy decoding of the 48 suffix tokens of every
  window) vs the same plain forward;
- perplexity and nDCG@10 (`perplexity`, `ndcg_at_k` against rankings computed before)
  on held-out sequences vs a plain forward over those sequences;
- task probes (`choice_scores`: the log-likelihood of short continuations after long
  contexts) vs a plain forward over the same pairs.

A plain forward is `model(input_ids, attention_mask)` with logits at every position;
the decoder alone (no LM head) is timed too, to show what the head costs. The machine
is shared and noisy: every measurement runs once per round and the best of the rounds
is kept, so a floor and what is read against it see the same load; read the ratios,
not the absolute times.

    python benchmarks/bench_real.py [--model PATH] [--windows 32] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from bench_collect import plain_forward_backward

from curvedit.data import Record, pad_batch
from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.memorization import FindOptions, evaluate_recitation, find_memorized
from curvedit.evaluate.perplexity import ndcg_at_k, next_token_rankings, perplexity
from curvedit.evaluate.tasks import choice_scores
from curvedit.evaluate.windows import Window
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.targets import TargetSpec, select_targets

PREFIX, SUFFIX = 64, 48

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)


@dataclass
class Case:
    """One timed step.

    Attributes:
        name: its row in the table.
        run: the step.
        floor: the name of the case it is read against; None for a floor.
    """

    name: str
    run: Callable[[], object]
    floor: str | None = None


def load_model(path: str | None) -> transformers.PreTrainedModel:
    """SmolLM2-135M from `path` (float32), or a random-initialised model of its config (seed 0); eval mode."""
    if path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).eval()


def batches_of(rows: list[list[int]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of token rows."""
    return [pad_batch(rows[i : i + batch_size], 0, padding_side="right") for i in range(0, len(rows), batch_size)]


@torch.inference_mode()
def plain_forward(module: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    """One forward pass of `module` (the LM, or its decoder) per batch."""
    for batch in batches:
        module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def make_windows(model: torch.nn.Module, count: int, planted: int) -> list[Window]:
    """Random windows; `planted` of them, spread evenly, have the model's greedy continuation as suffix."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prefixes = torch.randint(0, vocab, (count, PREFIX), generator=generator).tolist()
    suffixes = torch.randint(0, vocab, (count, SUFFIX), generator=generator).tolist()
    recited = [i * count // planted for i in range(planted)]
    for i, suffix in zip(recited, greedy_generate(model, [prefixes[i] for i in recited], SUFFIX)):
        suffixes[i] = suffix
    return [Window(p, s, "bench", i, 0) for i, (p, s) in enumerate(zip(prefixes, suffixes))]


def run_rounds(cases: list[Case], rounds: int) -> dict[str, float]:
    """Run every case once per round, in order; the best time of each."""
    best = {case.name: math.inf for case in cases}
    for _ in range(rounds):
        for case in cases:
            start = time.perf_counter()
            case.run()
            best[case.name] = min(best[case.name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a SmolLM2-135M checkpoint [default: random init]")
    parser.add_argument("--windows", type=int, default=32, help="find-memorized / recitation windows")
    parser.add_argument("--planted", type=int, default=2, help="windows the model recites by construction")
    parser.add_argument("--find-batch", type=int, default=8, help="windows per find-memorized batch")
    parser.add_argument("--recite-batch", type=int, default=32, help="windows per recitation batch")
    parser.add_argument("--heldout", type=int, default=4, help="held-out sequences for perplexity and nDCG")
    parser.add_argument("--heldout-len", type=int, default=256)
    parser.add_argument("--heldout-batch", type=int, default=4)
    parser.add_argument("--choices", type=int, default=8, help="(context, continuation) pairs of the task probes")
    parser.add_argument("--context-len", type=int, default=120)
    parser.add_argument("--continuation-len", type=int, default=4)
    parser.add_argument("--collect-batches", type=int, default=2)
    parser.add_argument("--collect-batch", type=int, default=2)
    parser.add_argument("--collect-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = load_model(args.model)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    decoder = model.get_decoder()
    generator = torch.Generator().manual_seed(2)

    def random_rows(count: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (count, length), generator=generator).tolist()

    collect_batches = batches_of(random_rows(args.collect_batches * args.collect_batch, args.collect_len),
                                 args.collect_batch)
    tracked = f"{layers - 3}-{layers - 1}"
    targets = select_targets(model, TargetSpec(preset="mlp", layers=tracked))
    collect_options = CollectOptions(progress=False)

    windows = make_windows(model, args.windows, args.planted)
    window_batches = batches_of([w.prefix_ids + w.suffix_ids for w in windows], args.find_batch)
    records = [Record(text=None, input_ids=w.prefix_ids + w.suffix_ids, source="bench", index=i)
               for i, w in enumerate(windows)]
    find_options = FindOptions(prefix_len=PREFIX, suffix_len=SUFFIX, batch_size=args.find_batch, progress=False)
    found: list[int] = []

    heldout = random_rows(args.heldout, args.heldout_len)
    heldout_batches = batches_of(heldout, args.heldout_batch)
    reference = next_token_rankings(model, heldout, k=10, batch_size=args.heldout_batch)

    pairs = list(zip(random_rows(args.choices, args.context_len), random_rows(args.choices, args.continuation_len)))
    pair_batches = batches_of([ctx + cont for ctx, cont in pairs], args.heldout_batch)

    cases = [
        Case("plain forward+backward", lambda: plain_forward_backward(model, collect_batches)),
        Case(f"collect ({len(targets)} MLP matrices, blocks {tracked})",
             lambda: collect_factors(model, collect_batches, targets, options=collect_options),
             "plain forward+backward"),
        Case("plain forward, windows", lambda: plain_forward(model, window_batches)),
        Case("decoder only (no LM head), windows", lambda: plain_forward(decoder, window_batches),
             "plain forward, windows"),
        Case("find-memorized", lambda: found.append(find_memorized(model, None, records, find_options).memorized),
             "plain forward, windows"),
        Case(f"recitation ({SUFFIX} greedy tokens per window)",
             lambda: evaluate_recitation(model, windows, batch_size=args.recite_batch), "plain forward, windows"),
        Case("plain forward, held-out", lambda: plain_forward(model, heldout_batches)),
        Case("decoder only (no LM head), held-out", lambda: plain_forward(decoder, heldout_batches),
             "plain forward, held-out"),
        Case("perplexity", lambda: perplexity(model, heldout, batch_size=args.heldout_batch),
             "plain forward, held-out"),
        Case("nDCG@10", lambda: ndcg_at_k(model, heldout, reference, batch_size=args.heldout_batch),
             "plain forward, held-out"),
        Case("plain forward, task pairs", lambda: plain_forward(model, pair_batches)),
        Case("task probes (choice scoring)", lambda: choice_scores(model, pairs, batch_size=args.heldout_batch),
             "plain forward, task pairs"),
    ]
    plain_forward_backward(model, collect_batches[:1])  # warm up
    collect_factors(model, collect_batches[:1], targets, options=collect_options)
    best = run_rounds(cases, args.rounds)

    name = args.model or "random-initialised SmolLM2-135M config"
    print(f"{name}: {layers} blocks, hidden {model.config.hidden_size}, vocab {vocab}; "
          f"threads {torch.get_num_threads()}, best of {args.rounds} rounds")
    print(f"collect: {args.collect_batches} x {args.collect_batch} x {args.collect_len} tokens; "
          f"windows: {args.windows} x ({PREFIX} + {SUFFIX}), batch {args.find_batch} (find), "
          f"{args.recite_batch} (recitation), "
          f"{args.planted} planted, {found[-1]} found memorized; "
          f"held-out: {args.heldout} x {args.heldout_len}, batch {args.heldout_batch}; "
          f"task pairs: {args.choices} x ({args.context_len} + {args.continuation_len})")
    width = max(len(case.name) for case in cases)
    for case in cases:
        seconds = best[case.name]
        ratio = "floor" if case.floor is None else f"{seconds / best[case.floor]:5.2f}x {case.floor}"
        print(f"{case.name:<{width}}  {seconds:7.3f} s  {ratio}")


if __name__ == "__main__":
    main()
