"""Running a model and scoring it: memorization, general ability and probes (docs/method.md
sections 4-7).

Modules:
    windows: the memorized-windows file format (`Window`, `read_memorized`).
    generation: batched greedy decoding with a KV cache and left padding.
    sampling: text the model itself writes (seeded, temperature 1), for replay and factor data.
    memorization: finding memorized windows; strict/loose recitation metrics.
    perplexity: held-out perplexity and nDCG@k against a reference model.
    tasks: JSONL task probes and the lm-evaluation-harness bridge.
    capabilities: the capability probe families and their scores.
    privacy: membership inference and extraction metrics.
    stress: positional perturbations of memorized prompts.
    intervals: Wilson and bootstrap intervals.
    runner: one evaluation of a model (what `curvedit evaluate` runs).
    results, report: the results files and the comparison report.
"""

from curvedit.evaluate.capabilities import capability_tasks, score_families
from curvedit.evaluate.generation import greedy_generate
from curvedit.evaluate.intervals import Interval, bootstrap_mean, bootstrap_ratio, wilson
from curvedit.evaluate.memorization import FindOptions, evaluate_recitation, find_memorized
from curvedit.evaluate.perplexity import next_token_rankings
from curvedit.evaluate.privacy import membership_inference, sequence_stats
from curvedit.evaluate.runner import EvaluateOptions, evaluate_model
from curvedit.evaluate.sampling import SampleOptions, sample_sequences
from curvedit.evaluate.stress import reference_stress_test, stress_test
from curvedit.evaluate.tasks import load_tasks, run_tasks
from curvedit.evaluate.windows import Window, read_memorized

__all__ = [
    "EvaluateOptions", "FindOptions", "Interval", "SampleOptions", "Window", "bootstrap_mean", "bootstrap_ratio",
    "capability_tasks", "evaluate_model", "evaluate_recitation", "find_memorized", "greedy_generate", "load_tasks",
    "membership_inference", "next_token_rankings", "read_memorized", "reference_stress_test",
    "run_tasks", "sample_sequences", "score_families", "sequence_stats", "stress_test", "wilson",
]
