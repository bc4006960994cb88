"""Evaluation of memorization and general ability (docs/method.md sections 4-7).

Modules:
    generation: batched greedy decoding with a KV cache and left padding.
    memorization: finding memorized windows; strict/loose recitation metrics.
    perplexity: held-out perplexity and nDCG@k against a reference model.
    tasks: JSONL task probes and the lm-evaluation-harness bridge.
    stress: positional perturbations of memorized prompts.
    runner: one evaluation of a model (what `curvedit evaluate` runs).
    results, report: the results files and the comparison report.
"""
