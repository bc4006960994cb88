"""Shared fixtures: tiny random-initialised models of the architectures curvedit supports."""

from __future__ import annotations

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine two
    spinning OpenMP threads made small loops up to 70x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_gpt2(seed: int = 0, vocab: int = 11, n_layer: int = 2, dtype=torch.float64):
    """GPT-2 (Conv1D weights) with a small vocabulary, in float64, eval mode."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config).to(dtype).eval()


def tiny_olmo2(seed: int = 0, vocab: int = 13, dtype=torch.float64):
    """OLMo-2 (nn.Linear gate/up/down, no biases) in float64, eval mode.

    SDPA attention: transformers' eager OLMo-2 attention yields NaN on left-padded float64
    batches (fully masked padding rows), which then leak into real positions.
    """
    torch.manual_seed(seed)
    config = transformers.Olmo2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.Olmo2ForCausalLM(config).to(dtype).eval()


def tiny_vit(seed: int = 0, labels: int = 5, dtype=torch.float64):
    """ViT for 8x8 images with 4x4 patches (5 tokens: CLS + 4 patches), in float64."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=24, num_labels=labels,
                                    attn_implementation="eager")
    return transformers.ViTForImageClassification(config).to(dtype).eval()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def olmo2():
    return tiny_olmo2()


@pytest.fixture
def vit():
    return tiny_vit()


ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


@pytest.fixture
def lm_dir(tmp_path):
    """A tiny GPT-2 with a character tokenizer, saved as an HF model directory."""
    from curvedit.chartok import build_char_tokenizer

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


class Interrupt(Exception):
    """Stands for a crash in the middle of a collection run."""


def interrupted(batches, after):
    """The batches, then a crash (`Interrupt`) when batch `after` would come."""
    for index, batch in enumerate(batches):
        if index == after:
            raise Interrupt
        yield batch


def target_io(model, targets, ids, loss_of_logits):
    """One unbatched forward/backward: per target, its input x and the gradient of
    `loss_of_logits(logits)` with respect to its output, both `(T, d)` (the brute-force side
    of the factor tests)."""
    store = {}
    hooks = [t.module.register_forward_hook(lambda m, i, o, n=t.name: store.__setitem__(n, (i[0], o)))
             for t in targets]
    for t in targets:
        t.module.weight.requires_grad_(True)
    try:
        logits = model(input_ids=ids).logits[0]
        for _, out in store.values():
            out.retain_grad()
        loss_of_logits(logits).backward()
    finally:
        for h in hooks:
            h.remove()
    return {name: (x[0], out.grad[0]) for name, (x, out) in store.items()}


def char_model_dir(root, letters: str = "abcdefgh"):
    """A tiny float32 GPT-2 with a character tokenizer, saved to `root/m` (for CLI tests)."""
    from curvedit.chartok import build_char_tokenizer

    tokenizer = build_char_tokenizer(letters)
    model = tiny_gpt2(dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "m")
    tokenizer.save_pretrained(root / "m")
    return root / "m"
