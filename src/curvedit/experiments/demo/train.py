"""Train the demo's tiny Llama-style LM on the synthetic world, on CPU, deterministically.

The result is a normal HF model directory (config, safetensors weights, character
tokenizer) that `from_pretrained` loads. Trained models are cached by the hash of their
`TrainConfig`, so a second run skips training.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from curvedit.chartok import build_char_tokenizer
from curvedit.experiments.demo.world import ALPHABET, WorldConfig, build_world, pack, training_lines
from curvedit.io import digest, write_json

TRAIN_META = "curvedit-train.json"


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation of the demo LM.

    Attributes:
        world: the world to train on.
        seq_len: context length in characters.
        hidden, layers, heads, intermediate: Llama shape (SwiGLU MLP: gate/up/down).
        epochs: passes over the training stream.
        batch_size, lr, weight_decay, warmup_steps: AdamW with linear warm-up, cosine decay.
        seed: model init and data order.
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    seq_len: int = 64
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    seed: int = 0

    def config_hash(self) -> str:
        """A short hash of every setting (the cache key)."""
        return digest(asdict(self))[:12]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def cached_model_dir(wanted_hash: str, candidates: tuple[Path, ...]) -> Path | None:
    """The first candidate model directory whose `curvedit-train.json` records `wanted_hash`."""
    for candidate in candidates:
        meta = candidate / TRAIN_META
        if meta.is_file() and json.loads(meta.read_text()).get("config_hash") == wanted_hash:
            return candidate
    return None


def build_model(config: TrainConfig, vocab_size: int):
    """A randomly initialised LlamaForCausalLM of the configured shape."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len * 2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        tie_word_embeddings=True, rope_theta=10000.0)
    return LlamaForCausalLM(model_config)


def _batches(windows: list[str], tokenizer, batch_size: int, seq_len: int):
    for start in range(0, len(windows) - batch_size + 1, batch_size):
        chunk = windows[start:start + batch_size]
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
        for row, text in enumerate(chunk):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(tokens)] = torch.tensor(tokens)
        yield ids, labels


def train_demo_model(config: TrainConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train the demo model and save it (weights, tokenizer, `curvedit-train.json`).

    Args:
        config: what to train.
        out_dir: the model directory to write.
        progress: show a progress bar with the running loss.

    Returns:
        `out_dir`.
    """
    torch.manual_seed(config.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_model(config, len(tokenizer))
    world = build_world(config.world)
    rng = random.Random(config.seed)
    epoch_windows = [list(pack(training_lines(world, rng), config.seq_len)) for _ in range(config.epochs)]
    steps = sum(len(w) // config.batch_size for w in epoch_windows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = warmup_cosine(optimizer, config.warmup_steps, steps)
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train demo LM", unit="step", disable=not progress)
    running = None
    for windows in epoch_windows:
        for ids, labels in _batches(windows, tokenizer, config.batch_size, config.seq_len):
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / TRAIN_META, {"config": asdict(config), "config_hash": config.config_hash(), "steps": steps,
                                  "seconds": round(time.perf_counter() - start, 1), "final_loss": running})
    return out
