"""Shared fixtures: the tiny models of `tests/tiny_models.py`, a saved LM folder and a corpus."""

from __future__ import annotations

import pytest
import torch
import transformers

from curvedit.chartok import build_char_tokenizer
from curvedit.data import lm_batches
from curvedit.evaluate.windows import Window
from curvedit.kfac.collect import CollectOptions, collect_factors
from curvedit.kfac.factors import save_factors
from curvedit.kfac.targets import TargetSpec, select_targets
from tests.tiny_models import ALPHABET, tiny_gpt2, tiny_olmo2, tiny_vit

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine two
    spinning OpenMP threads made small loops up to 70x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def olmo2():
    return tiny_olmo2()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def lm_dir(tmp_path):
    """A tiny GPT-2 with a character tokenizer, saved as an HF model directory."""
    tokenizer = build_char_tokenizer(ALPHABET)
    model = tiny_gpt2(vocab=len(tokenizer), dtype=torch.float32)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_jsonl(tmp_path):
    """A small JSONL corpus of text rows."""
    import json

    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "the quick brown fox jumps over the lazy dog. " * 3}, {"text": "hello world, again and again."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def world(tmp_path):
    """A tiny GPT-2 (float64), its factors on disk, windows to recite and held-out text."""
    model = tiny_gpt2()
    ids = torch.randint(1, 11, (10, 12), generator=torch.Generator().manual_seed(0)).tolist()
    factors = collect_factors(model, lm_batches(ids[:6], 3, 0), select_targets(model, TargetSpec(preset="mlp")),
                              options=CollectOptions(progress=False))
    save_factors(factors, tmp_path / "factors")
    windows = [Window(s[:6], s[6:]) for s in ids[6:8]]
    return model, tmp_path / "factors", windows, ids[8:]
