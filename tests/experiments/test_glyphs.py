"""The glyph world: every image shows the glyph of its label, the same seed draws the same
images whatever the batch, and an exported world reads back through the folder loader."""

import pytest
import torch

from curvedit.data import DataError
from curvedit.experiments.demo.glyphs import GlyphWorldConfig, draw_glyph_world, render_glyphs, save_image_folder
from curvedit.experiments.demo.vision_data import GLYPHS, VisionDataConfig, load_images

FONTS = ("DejaVuSans.ttf", "cmtt10.ttf", "STIXGeneralItalic.ttf")


def test_every_class_renders_distinctly_in_every_shipped_font():
    glyphs = render_glyphs(GlyphWorldConfig().classes, GlyphWorldConfig().fonts, 32)
    assert glyphs.shape == (21, 34, 32, 32) and glyphs.min() >= 0 and glyphs.max() <= 1
    flat = glyphs.flatten(2)
    for font in flat:  # no two classes look the same in one font
        distance = torch.cdist(font, font) + torch.eye(len(font)) * 1e9
        assert distance.min() > 1.0


def test_untransformed_images_are_the_area_downsampled_glyph_of_their_label():
    """With every random change off (scale 0.8 of the side = the rendered size, no rotation,
    shear, shift, restroke, clutter, noise, tint or shading), each image is background + ink x contrast where
    ink is the rendered glyph of its label and font, averaged down to the image side."""
    config = GlyphWorldConfig(classes="0AB7", fonts=FONTS, images=40, render_size=64, scale=(0.8, 0.8), rotation=0,
                              shear=0, shift=0, stroke=(0, 0), clutter=0, noise=0, tint=0, gradient=0, seed=3)
    images, labels, classes = draw_glyph_world(config, 32)
    assert classes == list("0AB7") and images.shape == (40, 32, 32, 3) and images.dtype == torch.uint8
    rendered = render_glyphs(config.classes, config.fonts, 64)
    references = torch.nn.functional.interpolate(rendered.flatten(0, 1)[:, None], size=32, mode="area")[:, 0]
    grey = images[..., 0].double() / 255
    for index in range(40):  # which (font, class) reference fits best, as an affine map of the ink
        ink = references.double().flatten(1)
        design = torch.stack([torch.ones_like(ink), ink], -1)  # (refs, P, 2)
        target = grey[index].flatten()[None, :, None].expand(len(ink), -1, -1)
        solution = torch.linalg.lstsq(design, target).solution
        residual = (design @ solution - target).abs().amax((1, 2))
        best = int(residual.argmin())
        assert residual[best] <= 1 / 255  # uint8 rounding only
        assert best % len(classes) == int(labels[index])


def test_the_same_seed_draws_the_same_world_whatever_the_batch():
    config = GlyphWorldConfig(fonts=FONTS, images=50, seed=7)
    first, labels, _ = draw_glyph_world(config, 16, batch=50)
    second, labels_again, _ = draw_glyph_world(config, 16, batch=7)
    assert torch.equal(first, second) and torch.equal(labels, labels_again)
    other, _, _ = draw_glyph_world(GlyphWorldConfig(fonts=FONTS, images=50, seed=8), 16)
    assert not torch.equal(first, other)


def test_an_exported_world_reads_back_through_the_folder_loader(tmp_path):
    world = GlyphWorldConfig(fonts=FONTS, images=60)
    data = VisionDataConfig(source=GLYPHS, image_size=16, world=world)
    drawn = load_images(data)
    images, labels, classes = draw_glyph_world(world, 16)
    root = save_image_folder(images, labels, classes, tmp_path / "world")
    from_folder = load_images(VisionDataConfig(source=str(root), image_size=16))
    order = sorted(range(60), key=lambda i: (classes[labels[i]], i))  # the folder's order: class, then file
    assert torch.equal(from_folder.pixels, drawn.pixels[order])
    assert [from_folder.classes[k] for k in from_folder.labels.tolist()] == [classes[labels[i]] for i in order]
    assert drawn.fingerprint.startswith("glyphs-") and drawn.fingerprint == world.fingerprint(16)
    with pytest.raises(DataError, match="exists already"):
        save_image_folder(images, labels, classes, root)


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": "A"}, "two distinct classes"), ({"classes": "AA"}, "two distinct classes"),
    ({"fonts": ()}, "at least one font"), ({"fonts": ("Nope.ttf",)}, "not among matplotlib's fonts"),
    ({"scale": (0.9, 0.5)}, "scale must be a range"), ({"stroke": (2, 1)}, "bad stroke"),
    ({"images": 0}, "images must be >= 1"), ({"contrast": (0.0, 0.5)}, "contrast must be a range"),
    ({"rotation": -5.0}, "cannot be negative"),
])
def test_bad_glyph_worlds_are_refused_by_name(kwargs, message):
    with pytest.raises(DataError, match=message):
        draw_glyph_world(GlyphWorldConfig(**{"images": 4, **kwargs}), 16)
