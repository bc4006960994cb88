"""Train the vision demo's small ViT on images with noisy labels, on CPU, deterministically.

The result is a normal HF model directory (config, safetensors weights, image processor)
that `from_pretrained` loads, plus `curvedit-train.json` (settings, hash, fit). Trained
models are cached by the hash of their `VisionTrainConfig` (data fingerprint included), so
a second run skips training.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from curvedit.experiments.demo.train import TRAIN_META, warmup_cosine
from curvedit.experiments.demo.vision_data import LabelledImages, NoisySplit, VisionDataConfig, image_processor
from curvedit.io import write_json


@dataclass(frozen=True)
class VisionTrainConfig:
    """Data, model shape and optimisation of the demo ViT.

    Attributes:
        data: images, splits and label noise.
        patch_size: ViT patch side (`image_size` must be a multiple of it).
        hidden, layers, heads, intermediate: ViT shape (MLP: fc1 `hidden -> intermediate`,
            fc2 back).
        epochs: passes over the training images (no augmentation, no dropout: the model
            is meant to fit the noisy labels).
        batch_size, lr, weight_decay, warmup_steps: AdamW with linear warm-up, cosine decay.
        seed: model init and data order.
    """

    data: VisionDataConfig = field(default_factory=VisionDataConfig)
    patch_size: int = 4
    hidden: int = 96
    layers: int = 6
    heads: int = 4
    intermediate: int = 384
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    seed: int = 0

    def config_hash(self, data_fingerprint: str) -> str:
        """A short hash of every setting and of the data's fingerprint (the cache key)."""
        blob = json.dumps({"config": asdict(self), "data": data_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_vit(config: VisionTrainConfig, classes: list[str]):
    """A randomly initialised `ViTForImageClassification` of the configured shape.

    Args:
        config: the shape (and the seed of the initialisation).
        classes: class names; their count is the number of outputs.

    Returns:
        The model (train mode).

    Raises:
        ValueError: the image size is not a multiple of the patch size, or the hidden size
            not a multiple of the head count.
    """
    from transformers import ViTConfig, ViTForImageClassification  # noqa: PLC0415

    size = config.data.image_size
    if size % config.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {config.patch_size}")
    if config.hidden % config.heads:
        raise ValueError(f"hidden {config.hidden} is not a multiple of heads {config.heads}")
    model_config = ViTConfig(
        image_size=size, patch_size=config.patch_size, num_channels=3, hidden_size=config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, intermediate_size=config.intermediate,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=len(classes),
        id2label=dict(enumerate(classes)), label2id={name: i for i, name in enumerate(classes)})
    torch.manual_seed(config.seed)
    return ViTForImageClassification(model_config)


@torch.no_grad()
def predict(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes `(N,)` of `pixels` `(N, 3, S, S)` (eval mode, batched)."""
    was_training = model.training
    model.eval()
    out = [model(pixel_values=pixels[i:i + batch_size]).logits.argmax(-1) for i in range(0, len(pixels), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def train_vision_model(config: VisionTrainConfig, images: LabelledImages, split: NoisySplit, out_dir: str | Path,
                       progress: bool = True) -> Path:
    """Train the demo ViT on the training images with their (noisy) labels and save it.

    Args:
        config: what to train.
        images: the preprocessed images (from `load_images(config.data)`).
        split: the split and noisy labels (from `split_and_corrupt(images, config.data)`).
        out_dir: the model directory to write (weights, processor, `curvedit-train.json`).
        progress: show a progress bar with the running loss.

    Returns:
        `out_dir`.
    """
    model = build_vit(config, images.classes)
    pixels, labels = images.pixels[split.train], split.train_labels[split.train]
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(pixels) / config.batch_size)
    steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.warmup_steps, steps)
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train demo ViT", unit="step", disable=not progress)
    running = None
    for _ in range(config.epochs):
        order = torch.randperm(len(pixels), generator=generator)
        for first in range(0, len(pixels), config.batch_size):
            batch = order[first:first + config.batch_size]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels[batch]).logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    noisy = split.noisy
    noisy_recalled = int((predict(model, images.pixels[noisy]) == split.train_labels[noisy]).sum())
    fit = {"noisy_memorized": noisy_recalled / len(noisy),
           "train_fit": int((predict(model, pixels) == labels).sum()) / len(labels)}
    out = Path(out_dir)
    model.save_pretrained(out)
    image_processor(config.data.image_size).save_pretrained(out)
    write_json(out / TRAIN_META, {"config": asdict(config), "config_hash": config.config_hash(images.fingerprint),
                                  "steps": steps, "seconds": round(seconds, 1), "final_loss": running,
                                  "torch_threads": torch.get_num_threads(), **fit})
    return out
