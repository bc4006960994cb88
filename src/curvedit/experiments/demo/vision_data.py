"""Images for the vision demo: the generated glyph world (`curvedit.experiments.demo.glyphs`, the
default), scikit-learn's bundled digits (no download) or a folder of images
(`root/CLASS_NAME/*.png`), split into training and held-out images, with a fraction of the
training labels replaced by random *wrong* labels.

Every source ends in the same normalisation as the `ViTImageProcessor` saved with the
trained model (resize to `image_size`, scale to [0, 1], normalise with mean 0.5 and std 0.5);
so an image exported as a PNG and read back from a folder gives the same pixel values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from curvedit.data import DataError, image_batches, image_folder
from curvedit.experiments.demo.glyphs import GlyphWorldConfig, draw_glyph_world

DIGITS = "digits"
GLYPHS = "glyphs"


@dataclass(frozen=True)
class VisionDataConfig:
    """Which images, and how they are split and corrupted.

    Attributes:
        source: "glyphs" (the generated glyph world, drawn by `world`), "digits"
            (scikit-learn's 1,797 bundled 8x8 digits, loaded at run time) or the path of an
            image folder laid out as `root/CLASS_NAME/*.png`.
        image_size: side of the (square) model input; images are resized to it.
        max_images: use only the first this many images of the source (None: all).
        heldout_fraction: share of the images held out (never trained on).
        noise_fraction: share of the *training* images whose label is replaced by a
            random wrong label (exactly `round(noise_fraction * n_train)` images).
        tune_fraction: share of the noisy training images used only to choose the edit;
            the rest measure it.
        seed: seed of the splits and of the label noise.
        world: what the glyph world draws (used by source "glyphs" only).
    """

    source: str = GLYPHS
    image_size: int = 16
    max_images: int | None = None
    heldout_fraction: float = 0.2
    noise_fraction: float = 0.1
    tune_fraction: float = 0.5
    seed: int = 0
    world: GlyphWorldConfig = field(default_factory=GlyphWorldConfig)

    def validate(self) -> None:
        """Check the fractions and sizes.

        Raises:
            DataError: a fraction outside its range or a non-positive size.
        """
        if self.image_size < 1:
            raise DataError(f"image_size must be positive, got {self.image_size}")
        if self.max_images is not None and self.max_images < 4:
            raise DataError(f"max_images must be at least 4, got {self.max_images}")
        for name, value in (("heldout_fraction", self.heldout_fraction), ("noise_fraction", self.noise_fraction),
                            ("tune_fraction", self.tune_fraction)):
            if not 0 < value < 1:
                raise DataError(f"{name} must be in (0, 1), got {value}")


@dataclass
class LabelledImages:
    """Preprocessed images with their (true) labels.

    Attributes:
        pixels: `(N, 3, S, S)` float32 model inputs.
        labels: `(N,)` long true labels.
        classes: class names, indexed by label.
        fingerprint: a short hash that changes when the source's content changes.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    fingerprint: str


@dataclass
class NoisySplit:
    """Training / held-out split with label noise on part of the training images.

    All index tensors index `LabelledImages.pixels`.

    Attributes:
        train: training images.
        heldout: held-out images (true labels only; never trained on).
        train_labels: `(N,)` the labels the model is trained on: the true label, except on
            noisy images (defined for every image; only training entries are used).
        noisy_tune: noisy training images used to choose the edit.
        noisy_eval: noisy training images used to measure it.
        clean: training images whose label was kept.
        validation: held-out images set aside to choose the edit (empty unless split off
            `heldout` with `split_validation`).
    """

    train: torch.Tensor
    heldout: torch.Tensor
    train_labels: torch.Tensor
    noisy_tune: torch.Tensor
    noisy_eval: torch.Tensor
    clean: torch.Tensor
    validation: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def noisy(self) -> torch.Tensor:
        """Every noisy training image (tune, then eval)."""
        return torch.cat([self.noisy_tune, self.noisy_eval])

    def counts(self) -> dict[str, int]:
        """Sizes of each part, for reports."""
        return {"train": len(self.train), "heldout": len(self.heldout), "noisy": len(self.noisy),
                "noisy_tune": len(self.noisy_tune), "noisy_eval": len(self.noisy_eval), "clean": len(self.clean),
                "validation": len(self.validation)}

    def split_validation(self, fraction: float, seed: int) -> "NoisySplit":
        """A copy whose held-out images are split at random into `validation` (a share
        `fraction`, for choosing) and `heldout` (the rest, for reporting).

        Raises:
            DataError: a fraction outside (0, 1) or a split that leaves either part empty.
        """
        count = round(fraction * len(self.heldout))
        if not 0 < fraction < 1 or not 0 < count < len(self.heldout):
            raise DataError(f"validation fraction {fraction} of {len(self.heldout)} held-out images leaves a part "
                            "empty")
        order = torch.randperm(len(self.heldout), generator=torch.Generator().manual_seed(seed))
        return replace(self, validation=self.heldout[order[:count]].sort().values,
                       heldout=self.heldout[order[count:]].sort().values)


def image_processor(image_size: int) -> Any:
    """The processor saved with the demo model: resize to `image_size`, scale to [0, 1],
    normalise with mean 0.5 and std 0.5 (three channels)."""
    try:  # transformers >= 5: the PIL backend, which needs no torchvision
        from transformers import ViTImageProcessorPil as Processor  # noqa: PLC0415
    except ImportError:
        from transformers import ViTImageProcessor as Processor  # noqa: PLC0415

    return Processor(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def normalise_uint8(images: torch.Tensor) -> torch.Tensor:
    """`(N, S, S, 3)` uint8 images as model inputs `(N, 3, S, S)`: the processor's scaling to
    [0, 1] and normalisation with mean 0.5 and std 0.5, without a resize."""
    return (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


def digits_images() -> tuple[list[Any], list[int], list[str]]:
    """scikit-learn's bundled digits as RGB PIL images (grey 0..16 scaled to 0..255).

    Returns:
        (images, labels, class names "0".."9").

    Raises:
        DataError: scikit-learn is not installed.
    """
    from PIL import Image  # noqa: PLC0415

    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415
    except ImportError as err:
        raise DataError("the digits source needs scikit-learn (`pip install scikit-learn`)") from err
    digits = load_digits()
    grey = (digits.images * (255 / 16)).round().clip(0, 255).astype("uint8")
    images = [Image.fromarray(g, mode="L").convert("RGB") for g in grey]
    return images, [int(t) for t in digits.target], [str(c) for c in digits.target_names]


def _folder_fingerprint(root: Path) -> str:
    paths, labels, _ = image_folder(root)
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        digest.update(f"{path.relative_to(root)}|{label}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:12]


def load_images(config: VisionDataConfig, processor: Any | None = None) -> LabelledImages:
    """Load and preprocess the images of `config.source`.

    Args:
        config: the data settings.
        processor: the image processor (default `image_processor(config.image_size)`).

    Returns:
        The images (at most `max_images`, in source order) and their true labels.

    Raises:
        DataError: an unknown source, a folder without images, fewer than two classes,
            or missing scikit-learn.
    """
    config.validate()
    processor = processor or image_processor(config.image_size)
    if config.source == DIGITS:
        images, labels, classes = digits_images()
        images, labels = images[:config.max_images], labels[:config.max_images]
        pixels = torch.cat([processor(images=images[i:i + 256], return_tensors="pt")["pixel_values"]
                            for i in range(0, len(images), 256)])
        label_tensor = torch.tensor(labels)
        fingerprint = f"sklearn-digits-{len(images)}"
    elif config.source == GLYPHS:
        drawn, label_tensor, classes = draw_glyph_world(config.world, config.image_size)
        drawn, label_tensor = drawn[:config.max_images], label_tensor[:config.max_images]
        pixels = normalise_uint8(drawn)
        fingerprint = config.world.fingerprint(config.image_size)
    else:
        root = Path(config.source)
        if not root.is_dir():
            raise DataError(f"image source {config.source!r} is neither 'glyphs', 'digits' nor a folder")
        batches = list(image_batches(root, processor, 256, max_images=config.max_images))
        pixels = torch.cat([b["pixel_values"] for b in batches])
        label_tensor = torch.cat([b["labels"] for b in batches])
        classes = image_folder(root)[2]
        fingerprint = _folder_fingerprint(root)
    if len(classes) < 2:
        raise DataError(f"{config.source}: label noise needs at least two classes, found {len(classes)}")
    return LabelledImages(pixels=pixels.float(), labels=label_tensor.long(), classes=classes, fingerprint=fingerprint)


def corrupt_labels(labels: torch.Tensor, fraction: float, num_classes: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of exactly `round(fraction * len(labels))` random entries by a
    label drawn uniformly from the *other* classes (never the true one).

    Args:
        labels: `(N,)` true labels in `[0, num_classes)`.
        fraction: share to corrupt, in [0, 1].
        num_classes: number of classes (at least 2).
        generator: the RNG (seeded by the caller).

    Returns:
        (noisy labels `(N,)`, positions of the corrupted entries in random order).

    Raises:
        DataError: a fraction outside [0, 1], fewer than 2 classes, or a label out of range.
    """
    if not 0 <= fraction <= 1:
        raise DataError(f"noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise DataError(f"label noise needs at least two classes, got {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy, chosen


def split_and_corrupt(images: LabelledImages, config: VisionDataConfig) -> NoisySplit:
    """Hold out `heldout_fraction` of the images, corrupt `noise_fraction` of the training
    labels, and split the noisy images into tune and eval parts.

    Returns:
        A `NoisySplit` (deterministic for `config.seed`).

    Raises:
        DataError: too few images for a non-empty training, held-out, tune and eval set.
    """
    config.validate()
    total = len(images.labels)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(total, generator=generator)
    n_heldout = round(config.heldout_fraction * total)
    heldout, train = order[:n_heldout].sort().values, order[n_heldout:].sort().values
    noisy_train, noisy_pos = corrupt_labels(images.labels[train], config.noise_fraction, len(images.classes),
                                            generator)
    n_tune = round(config.tune_fraction * len(noisy_pos))
    if min(len(heldout), len(train), n_tune, len(noisy_pos) - n_tune) == 0:
        raise DataError(f"{total} images are too few for held-out={config.heldout_fraction}, "
                        f"noise={config.noise_fraction}, tune={config.tune_fraction}: a split would be empty")
    train_labels = images.labels.clone()
    train_labels[train] = noisy_train
    noisy = train[noisy_pos]
    clean_mask = torch.ones(len(train), dtype=torch.bool)
    clean_mask[noisy_pos] = False
    return NoisySplit(train=train, heldout=heldout, train_labels=train_labels, noisy_tune=noisy[:n_tune],
                      noisy_eval=noisy[n_tune:], clean=train[clean_mask])
