"""A character-level tokenizer that saves and loads like any HF tokenizer.

Used by the demo models and the tests: one token per character, plus `<pad>`,
`<eos>` and `<unk>`; `AutoTokenizer.from_pretrained` loads what `save_pretrained` wrote.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over `alphabet`.

    Args:
        alphabet: the characters to give ids; duplicates are ignored, order is kept.
            Ids 0, 1, 2 are `<pad>`, `<eos>`, `<unk>`; characters follow in order.

    Returns:
        A fast tokenizer; characters outside the alphabet map to `<unk>`.

    Raises:
        ValueError: if the alphabet is empty.
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("the alphabet of a character tokenizer must not be empty")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
