"""Collection overhead: curvedit's factor collection vs a plain forward+backward.

Both run in this process on the same model and the same token batches; the ratio is what
to read (this machine is shared and noisy, absolute times are not). The model is a small
random-initialised GPT-2; the MLPs of its last 3 blocks are tracked.

    python benchmarks/bench_collect.py [--layers 6] [--width 256] [--seq-len 128] [--batches 12]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.targets import TargetSpec, select_targets


def plain_forward_backward(model, batches) -> None:
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()


def add_workload_arguments(parser: argparse.ArgumentParser, *, layers: int, batches: int, repeats: int) -> None:
    """Options of the random GPT-2 workload shared by the collection benchmarks."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=batches)
    parser.add_argument("--repeats", type=int, default=repeats)


def gpt2_config(args: argparse.Namespace) -> dict:
    """The workload's GPT-2 config fields."""
    return dict(n_layer=args.layers, n_embd=args.width, n_head=4, vocab_size=args.vocab, n_positions=args.seq_len)


def random_workload(args: argparse.Namespace) -> tuple[transformers.GPT2LMHeadModel, list[dict]]:
    """A random-initialised GPT-2 (eval mode) and random token batches; the same on every call."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2_config(args))).eval()
    batches = [{"input_ids": torch.randint(0, args.vocab, (args.batch_size, args.seq_len)),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
               for _ in range(args.batches)]
    return model, batches


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_workload_arguments(parser, layers=6, batches=8, repeats=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    model, batches = random_workload(args)
    tracked = f"{args.layers - 3}-{args.layers - 1}"
    targets = select_targets(model, TargetSpec(preset="mlp", layers=tracked))
    options = CollectOptions(progress=False)
    tokens = args.batches * args.batch_size * args.seq_len

    plain_forward_backward(model, batches[:1])  # warm up both paths
    collect_factors(model, batches[:1], targets, options=options)
    t_plain = best_of(lambda: plain_forward_backward(model, batches), args.repeats)
    t_collect = best_of(lambda: collect_factors(model, batches, targets, options=options), args.repeats)
    print(f"GPT-2 {args.layers} blocks x d={args.width}, vocab {args.vocab}; {tokens} tokens; "
          f"tracked: {len(targets)} MLP matrices in blocks {tracked}; threads={torch.get_num_threads()}")
    print(f"plain forward+backward : {t_plain:7.3f} s  ({tokens / t_plain:9.0f} tok/s)")
    print(f"curvedit collect       : {t_collect:7.3f} s  ({tokens / t_collect:9.0f} tok/s)")
    print(f"ratio collect / plain  : {t_collect / t_plain:.2f}x  (target <= 1.3x)")


if __name__ == "__main__":
    main()
