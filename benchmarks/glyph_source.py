"""Few-shot source data rendered from the fonts a Debian system ships: one class per character.

Source: the DejaVu font families (Debian package ``fonts-dejavu-core`` / ``fonts-dejavu-extra``,
``/usr/share/fonts/truetype/dejavu``; license: the Bitstream Vera Fonts license for the Vera-derived
glyphs, changes by the DejaVu authors in the public domain; see
https://dejavu-fonts.github.io/License.html). Each of the ~22 faces (Sans, Serif, Mono, Condensed,
bold, oblique/italic, ExtraLight) draws a character differently; an image is one face's glyph under a
random rotation, scale and shift, so a class has real variation across "writers" (faces), like
Omniglot's drawers.

Split by script, so test classes are never seen in meta-training (and glyphs are not ImageNet classes):
meta-train and validation: Latin and Cyrillic letters (validation = a held-out 20 % of those
characters, for choosing learning rates); test: Armenian, Georgian, Hebrew and Arabic letters.
Greek is left out: many Greek capitals are drawn exactly like Latin or Cyrillic ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SCRIPTS = {  # name: code point ranges of letters (inclusive)
    "latin": [(0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF), (0x100, 0x17F)],
    "cyrillic": [(0x400, 0x4FF)],
    "armenian": [(0x531, 0x556), (0x561, 0x587)],
    "georgian": [(0x10A0, 0x10C5), (0x10D0, 0x10FA)],
    "hebrew": [(0x5D0, 0x5EA)],
    "arabic": [(0x621, 0x64A)],
}
META_SCRIPTS = ("latin", "cyrillic")
TEST_SCRIPTS = ("armenian", "georgian", "hebrew", "arabic")
VAL_FRACTION = 0.2
MIN_FACES = 4  # a character drawn by fewer faces has too little variation to be a class
CANVAS = 96
FONT_SIZE = 60


@dataclass
class GlyphSplit:
    """uint8 images (N, CANVAS, CANVAS), their class index, and the class names (characters)."""

    images: np.ndarray
    labels: list[int]
    classes: list[str]


def font_files() -> list[Path]:
    fonts = sorted(FONT_DIR.glob("*.ttf"))
    if not fonts:
        raise SystemExit(f"no fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    return fonts


def coverage(fonts: list[Path]) -> dict[Path, set[int]]:
    from fontTools.ttLib import TTFont

    return {path: set(TTFont(path, lazy=True).getBestCmap() or {}) for path in fonts}


def script_chars(script: str) -> list[str]:
    chars = []
    for low, high in SCRIPTS[script]:
        chars += [chr(c) for c in range(low, high + 1) if chr(c).isalpha() and c not in (0xD7, 0xF7)]
    return chars


def render(char: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
    """One glyph, black on white, centred, randomly rotated (+-12 deg), scaled (0.75-1.1) and shifted."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size=int(FONT_SIZE * rng.uniform(0.75, 1.1)))
    image = Image.new("L", (CANVAS * 2, CANVAS * 2), 255)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
    x = CANVAS - (left + right) / 2 + rng.uniform(-6, 6)
    y = CANVAS - (top + bottom) / 2 + rng.uniform(-6, 6)
    draw.text((x, y), char, font=font, fill=0)
    image = image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, fillcolor=255)
    offset = CANVAS // 2
    return np.asarray(image.crop((offset, offset, offset + CANVAS, offset + CANVAS)), dtype=np.uint8)


def build_splits(per_class: int = 16, seed: int = 0) -> dict[str, GlyphSplit]:
    """``{"meta": ..., "val": ..., "test": ...}``: disjoint classes; ``per_class`` images each."""
    fonts = font_files()
    cover = coverage(fonts)
    rng = np.random.default_rng(seed)

    def classes_of(scripts) -> list[str]:
        return [c for s in scripts for c in script_chars(s) if sum(ord(c) in cover[f] for f in fonts) >= MIN_FACES]

    meta_chars = classes_of(META_SCRIPTS)
    order = rng.permutation(len(meta_chars))
    n_val = int(round(VAL_FRACTION * len(meta_chars)))
    val_chars = [meta_chars[i] for i in sorted(order[:n_val])]
    train_chars = [meta_chars[i] for i in sorted(order[n_val:])]
    test_chars = classes_of(TEST_SCRIPTS)

    def draw(chars: list[str]) -> GlyphSplit:
        images, labels = [], []
        for label, char in enumerate(chars):
            faces = [f for f in fonts if ord(char) in cover[f]]
            for i in range(per_class):  # every face in turn, then again under other distortions
                images.append(render(char, faces[(i + label) % len(faces)], rng))
                labels.append(label)
        return GlyphSplit(np.stack(images), labels, chars)

    return {"meta": draw(train_chars), "val": draw(val_chars), "test": draw(test_chars)}


def describe(splits: dict[str, GlyphSplit]) -> dict:
    return {
        "source": "DejaVu fonts (fonts-dejavu-core), " + ", ".join(p.name for p in font_files()),
        "license": "Bitstream Vera Fonts license (Vera-derived glyphs); DejaVu changes public domain",
        "meta_scripts": list(META_SCRIPTS), "test_scripts": list(TEST_SCRIPTS),
        **{f"{name}_classes": len(split.classes) for name, split in splits.items()},
        **{f"{name}_images": int(split.images.shape[0]) for name, split in splits.items()},
    }
