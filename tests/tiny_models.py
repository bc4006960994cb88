"""The tiny random-initialised models every test builds on (one builder per architecture)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from curvedit.chartok import build_char_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
# Byte-level BPE merges on top of the 256 byte tokens: enough to spell "hello world" in three tokens.
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
EOS = "<|endoftext|>"

def tiny_gpt2(seed: int = 0, vocab: int = 11, n_layer: int = 2, dtype: torch.dtype = torch.float64, *,
              n_embd: int = 16, n_positions: int = 32, eos_id: int = 0, pad_id: int | None = None,
              attn: str | None = "eager") -> transformers.GPT2LMHeadModel:
    """GPT-2 (Conv1D weights) with a small vocabulary, in `dtype` (float64 by default), eval mode.

    Args:
        seed: the initialisation seed.
        vocab: vocabulary size.
        n_layer: blocks.
        dtype: the parameters' dtype.
        n_embd: hidden size.
        n_positions: context window.
        eos_id: the BOS and EOS id.
        pad_id: the pad id (None: none set).
        attn: the attention implementation (None: transformers' default).
    """
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab,
                                     n_positions=n_positions, bos_token_id=eos_id, eos_token_id=eos_id,
                                     pad_token_id=pad_id, **({"attn_implementation": attn} if attn else {}))
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


def gpt2_vocabulary() -> list[str]:
    """The byte alphabet, the tokens `MERGES` make, then the end-of-text token."""
    return list(bytes_to_unicode().values()) + [merge.replace(" ", "") for merge in MERGES] + [EOS]


def tiny_llama(seed: int = 0, context: int = 64) -> transformers.LlamaForCausalLM:
    """A random Llama (hidden 32, 2 layers, 2 query heads sharing 1 key/value head) over
    `gpt2_vocabulary`, in float32 and eval mode; row lengths are multiples of 32 so Q8_0 fits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(gpt2_vocabulary()), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=context, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


def char_model_dir(root: Path, letters: str = "abcdefgh") -> Path:
    """A tiny float32 GPT-2 with a character tokenizer, saved to `root/m` (for CLI tests)."""
    tokenizer = build_char_tokenizer(letters)
    model = tiny_gpt2(dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(root / "m")
    tokenizer.save_pretrained(root / "m")
    return root / "m"
