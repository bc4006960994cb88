"""Throughput of batched find-memorized versus a one-window-at-a-time greedy loop.

A randomly initialised GPT-2 (4 layers, d=128) reads windows of 64 + 48 random tokens.
A share of the windows (`--memorized-share`, default 10%: in real corpora memorized
windows are rare) are planted as "memorized": their suffix is the model's own greedy
continuation of the prefix, so they pass the exact-recitation test and exercise the
confirmation decode. Three ways to find the memorized windows are timed on the same
model and windows:

- loop: each window alone, greedy decoding of 48 tokens with a KV cache (batch 1);
- batched decode: `find_memorized(keep_all=True)`, every window decoded, in batches;
- find-memorized: the default path, a batched teacher-forced pre-filter, then a
  batched decode of the windows that pass it.

All three must find the same windows. Run: `python benchmarks/bench_find_memorized.py`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from curvedit.data import Record
from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.memorization import FindOptions, find_memorized

PREFIX, SUFFIX, VOCAB = 64, 48, 512


def build(windows: int, planted: int, device: str) -> tuple[GPT2LMHeadModel, list[Record]]:
    """The model and one document per window; the first `planted` are memorized by construction."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device).eval()
    prefixes = torch.randint(1, VOCAB, (windows, PREFIX)).tolist()
    recited = greedy_generate(model, prefixes[:planted], SUFFIX, batch_size=64)
    random_suffixes = torch.randint(1, VOCAB, (windows - planted, SUFFIX)).tolist()
    documents = [p + s for p, s in zip(prefixes, recited + random_suffixes)]
    return model, [Record(text=None, input_ids=d, source="bench", index=i) for i, d in enumerate(documents)]


def loop(model: GPT2LMHeadModel, records: list[Record]) -> list[int]:
    """One window at a time: decode its suffix greedily, keep it when it matches exactly."""
    found = []
    for record in records:
        prefix, suffix = record.input_ids[:PREFIX], record.input_ids[PREFIX:]
        if greedy_generate(model, [prefix], SUFFIX, batch_size=1)[0] == suffix:
            found.append(record.index)
    return found


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--memorized-share", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    planted = round(args.windows * args.memorized_share)
    model, records = build(args.windows, planted, args.device)
    options = FindOptions(prefix_len=PREFIX, suffix_len=SUFFIX, batch_size=args.batch_size, progress=False)

    def batched(keep_all: bool) -> list[int]:
        result = find_memorized(model, None, records, FindOptions(**{**options.__dict__, "keep_all": keep_all}))
        return [f.window.document for f in result.found if f.memorized]

    find_memorized(model, None, records[:2], options)  # warm-up
    expected, loop_s = timed(loop, model, records)
    decoded, decode_s = timed(batched, True)
    found, find_s = timed(batched, False)
    assert expected == decoded == found == list(range(planted)), "the three methods disagree"
    n = args.windows
    print(f"{n} windows of {PREFIX}+{SUFFIX} tokens, {len(found)} memorized, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"loop (1 window at a time):   {loop_s:7.2f} s  {n / loop_s:8.1f} windows/s")
    print(f"batched decode (no filter):  {decode_s:7.2f} s  {n / decode_s:8.1f} windows/s  "
          f"{loop_s / decode_s:5.1f}x")
    print(f"find-memorized (pre-filter): {find_s:7.2f} s  {n / find_s:8.1f} windows/s  {loop_s / find_s:5.1f}x")


if __name__ == "__main__":
    main()
