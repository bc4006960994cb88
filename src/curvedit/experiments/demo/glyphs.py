"""A procedural image world for the vision demo: glyphs (digits and capital letters) rendered
with the TrueType fonts that ship with matplotlib, then randomly scaled, rotated, sheared,
shifted, thickened or thinned, coloured, cluttered with strokes and noised.

Nothing is downloaded: the fonts come from `matplotlib.get_data_path()`. Every font x class
is rendered once at `render_size` with Pillow; the per-image transformations run batched in
torch (`affine_grid` / `grid_sample`, pooling for the stroke width, a distance field for the
clutter strokes). The same config and seed give the same images (uint8, `(N, S, S, 3)`), so a
world exported as PNGs (`save_image_folder`) reads back through the folder loader unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from curvedit.data import DataError

# Digits and capitals without I and O, which no font tells apart from 1 and 0.
GLYPH_CLASSES = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
# matplotlib's text fonts (its symbol, display and "last resort" fonts are left out).
MATPLOTLIB_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)


@dataclass(frozen=True)
class GlyphWorldConfig:
    """What the glyph world draws.

    Attributes:
        classes: one character per class.
        fonts: font file names in matplotlib's `fonts/ttf` folder.
        images: how many images to draw (classes and fonts uniform at random).
        render_size: side of the canvas each glyph is first rendered on (pixels).
        scale: range of the glyph's height as a share of the image side.
        rotation: largest rotation either way (degrees).
        shear: largest horizontal shear either way (tan of the angle).
        shift: largest shift of the centre either way, as a share of the image side.
        stroke: (thinnest, thickest) change of stroke width, in render pixels (negative thins).
        clutter: largest number of random strokes drawn over the background.
        noise: largest standard deviation of the pixel noise (pixel values in [0, 1]).
        contrast: range of the glyph's brightness above the background (light on dark).
        tint: largest colour cast either way, per channel, of the background and the glyph.
        gradient: largest change of background brightness from the centre to an edge, per axis.
        seed: seed of every random choice.
    """

    classes: str = GLYPH_CLASSES
    fonts: tuple[str, ...] = MATPLOTLIB_FONTS
    images: int = 24000
    render_size: int = 64
    scale: tuple[float, float] = (0.55, 0.9)
    rotation: float = 15.0
    shear: float = 0.25
    shift: float = 0.12
    stroke: tuple[int, int] = (-1, 2)
    clutter: int = 3
    noise: float = 0.08
    contrast: tuple[float, float] = (0.35, 0.9)
    tint: float = 0.1
    gradient: float = 0.25
    seed: int = 0

    def validate(self) -> None:
        """Check the settings.

        Raises:
            DataError: fewer than two classes, a repeated class, no font, no image, a
                range that is empty or out of bounds, or a negative largest change.
        """
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise DataError(f"the glyph world needs at least two distinct classes, got {self.classes!r}")
        if not self.fonts:
            raise DataError("the glyph world needs at least one font")
        if self.images < 1 or self.render_size < 8:
            raise DataError(f"images must be >= 1 and render_size >= 8, got {self.images}, {self.render_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1.5:
            raise DataError(f"scale must be a range within (0, 1.5], got {self.scale}")
        if self.stroke[0] > self.stroke[1] or self.clutter < 0 or self.noise < 0:
            raise DataError(f"bad stroke {self.stroke}, clutter {self.clutter} or noise {self.noise}")
        if not 0 < self.contrast[0] <= self.contrast[1] <= 1:
            raise DataError(f"contrast must be a range within (0, 1], got {self.contrast}")
        if min(self.rotation, self.shear, self.shift, self.tint, self.gradient) < 0:
            raise DataError("rotation, shear, shift, tint and gradient are largest changes either way and cannot be "
                            "negative")

    def fingerprint(self, image_size: int) -> str:
        """A short hash of the settings, the image side and the font files' sizes."""
        fonts = {name: font_path(name).stat().st_size for name in self.fonts}
        blob = json.dumps({"config": asdict(self), "image_size": image_size, "fonts": fonts}, sort_keys=True)
        return "glyphs-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def font_path(name: str) -> Path:
    """The path of a font file shipped with matplotlib.

    Raises:
        DataError: matplotlib has no font of that name.
    """
    import matplotlib  # noqa: PLC0415

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise DataError(f"font {name!r} is not among matplotlib's fonts ({path.parent})")
    return path


def render_glyphs(classes: str, fonts: tuple[str, ...], size: int) -> torch.Tensor:
    """Every class in every font, white on black, centred on a `size` x `size` canvas, scaled
    so that the font's tallest glyph of `classes` spans 80% of the canvas height.

    Args:
        classes: one character per class.
        fonts: matplotlib font file names.
        size: canvas side.

    Returns:
        `(fonts, classes, size, size)` float32 in [0, 1].

    Raises:
        DataError: an unknown font, or a font that draws some class as nothing.
    """
    import numpy as np  # noqa: PLC0415
    from PIL import Image, ImageDraw, ImageFont  # noqa: PLC0415

    out = torch.zeros(len(fonts), len(classes), size, size)
    for f, name in enumerate(fonts):
        probe = ImageFont.truetype(str(font_path(name)), size)
        tallest = max(probe.getbbox(ch)[3] - probe.getbbox(ch)[1] for ch in classes)
        font = ImageFont.truetype(str(font_path(name)), max(1, round(size * size * 0.8 / max(tallest, 1))))
        for c, ch in enumerate(classes):
            canvas = Image.new("L", (size, size))
            ImageDraw.Draw(canvas).text((size / 2, size / 2), ch, font=font, fill=255, anchor="mm")
            glyph = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255)
            if glyph.sum() == 0:
                raise DataError(f"font {name!r} draws {ch!r} as nothing")
            out[f, c] = glyph
    return out


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _restroke(glyphs: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Thicken (change > 0, max-pool) or thin (change < 0, min-pool) each glyph `(N, 1, R, R)`
    by its `change` pixels."""
    out = glyphs.clone()
    for amount in change.unique().tolist():
        if amount == 0:
            continue
        rows = (change == amount).nonzero().flatten()
        kernel = 2 * abs(amount) + 1
        pooled = torch.nn.functional.max_pool2d(glyphs[rows] * (1 if amount > 0 else -1), kernel, 1, abs(amount))
        out[rows] = pooled if amount > 0 else -pooled
    return out


def _strokes(generator: torch.Generator, n: int, side: int, count: int) -> torch.Tensor:
    """Up to `count` random line segments per image, `(N, side, side)` in [0, 1] (distance field)."""
    grid = (torch.arange(side) + 0.5) / side
    points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)  # (P, 2) as (x, y)
    out = torch.zeros(n, side * side)
    for k in range(count):
        drawn = torch.randint(0, count + 1, (n,), generator=generator) > k  # 0..count strokes, uniform
        start, end = torch.rand(n, 2, generator=generator), torch.rand(n, 2, generator=generator)
        width = _uniform(generator, n, 0.02, 0.06)
        strength = _uniform(generator, n, 0.3, 1.0) * drawn
        direction = end - start
        along = ((points[None] - start[:, None]) * direction[:, None]).sum(-1) / direction.pow(2).sum(-1,
                                                                                                  keepdim=True)
        nearest = start[:, None] + along.clamp(0, 1)[..., None] * direction[:, None]
        distance = (points[None] - nearest).norm(dim=-1)
        out = torch.maximum(out, strength[:, None] * (1 - distance / width[:, None]).clamp(0, 1))
    return out.reshape(n, side, side)


def draw_glyph_world(config: GlyphWorldConfig, image_size: int, batch: int = 2048
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Draw the glyph world.

    Args:
        config: what to draw.
        image_size: side of the images.
        batch: images transformed at once (memory only; the images do not depend on it).

    Returns:
        (`(N, S, S, 3)` uint8 images, `(N,)` long labels, class names).

    Raises:
        DataError: bad settings or an unusable font.
    """
    config.validate()
    if image_size < 4:
        raise DataError(f"image_size must be at least 4, got {image_size}")
    glyphs = render_glyphs(config.classes, config.fonts, config.render_size)
    generator = torch.Generator().manual_seed(config.seed)
    n = config.images
    labels = torch.randint(0, len(config.classes), (n,), generator=generator)
    fonts = torch.randint(0, len(config.fonts), (n,), generator=generator)
    # Every random draw happens here, in a fixed order, so `batch` changes nothing.
    scale = _uniform(generator, n, *config.scale) / 0.8  # the rendered glyph spans 80% of its canvas
    angle = _uniform(generator, n, -config.rotation, config.rotation) * math.pi / 180
    shear = _uniform(generator, n, -config.shear, config.shear)
    shift = _uniform(generator, 2 * n, -config.shift, config.shift).reshape(n, 2) * 2  # [-1, 1] coordinates
    stroke = torch.randint(config.stroke[0], config.stroke[1] + 1, (n,), generator=generator)
    background = _uniform(generator, n, 0, 0.45)[:, None] + _uniform(generator, 3 * n, -config.tint,
                                                                     config.tint).reshape(n, 3)
    contrast = _uniform(generator, n, *config.contrast)
    foreground = (background + contrast[:, None]).clamp(0, 1)
    gradient = _uniform(generator, 2 * n, -config.gradient, config.gradient).reshape(n, 2)
    supersample = 2
    side = image_size * supersample
    clutter = _strokes(generator, n, side, config.clutter)
    clutter_colour = torch.rand(n, 3, generator=generator)
    noise = _uniform(generator, n, 0, config.noise)[:, None, None, None] * torch.randn(
        n, 3, image_size, image_size, generator=generator)
    out = torch.empty(n, image_size, image_size, 3, dtype=torch.uint8)
    ramp = torch.linspace(-1, 1, image_size)
    for first in range(0, n, batch):
        rows = slice(first, first + batch)
        glyph = _restroke(glyphs[fonts[rows], labels[rows]][:, None], stroke[rows])
        cos, sin = torch.cos(angle[rows]), torch.sin(angle[rows])
        # output (x, y) -> glyph canvas: undo the shift, rotate back, unshear, unscale
        inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # (B, 2, 2) rows
        unshear = torch.eye(2).repeat(len(cos), 1, 1)
        unshear[:, 0, 1] = -shear[rows]
        linear = unshear @ inverse / scale[rows][:, None, None]
        theta = torch.cat([linear, -(linear @ shift[rows][..., None])], -1)
        grid = torch.nn.functional.affine_grid(theta, [len(cos), 1, side, side], align_corners=False)
        ink = torch.nn.functional.grid_sample(glyph, grid, align_corners=False, padding_mode="zeros")
        ink = torch.nn.functional.avg_pool2d(ink, supersample)[:, 0]  # (B, S, S)
        marks = torch.nn.functional.avg_pool2d(clutter[rows][:, None], supersample)[:, 0]
        shade = gradient[rows, 0, None, None] * ramp[None, None] + gradient[rows, 1, None, None] * ramp[None, :, None]
        image = background[rows][:, :, None, None] + shade[:, None]
        image = image + marks[:, None] * (clutter_colour[rows][:, :, None, None] - image)
        image = image + ink[:, None] * (foreground[rows][:, :, None, None] - image)
        image = (image + noise[rows]).clamp(0, 1)
        out[rows] = (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    return out, labels, list(config.classes)


def save_image_folder(images: torch.Tensor, labels: torch.Tensor, classes: list[str], root: str | Path) -> Path:
    """Write images as `root/CLASS/NNNNNN.png` (the layout the folder loader reads).

    Args:
        images: `(N, S, S, 3)` uint8.
        labels: `(N,)` class indices.
        classes: class names (folder names).
        root: the folder to create; it must not exist yet (nothing is overwritten).

    Returns:
        `root`.

    Raises:
        DataError: `root` exists already.
    """
    from PIL import Image  # noqa: PLC0415

    root = Path(root)
    if root.exists():
        raise DataError(f"{root} exists already; choose a new folder for the exported images")
    for index, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(folder / f"{index:06d}.png")
    return root
