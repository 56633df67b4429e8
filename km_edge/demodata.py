"""Offline, deterministic demo datasets in ImageFolder layout.

Why: the demo and the tests need a source task to train a base ConvNet on and a
few visually different target tasks to fit Kernel Modulation packs to, without
network access, downloads or font files that a fresh machine may lack. Everything
here is drawn with Pillow + numpy (no torch), so the device install can run it too.

Layout written by :func:`write_demo_data`::

    root/<task>/train/<class>/0000.png
    root/<task>/val/<class>/0000.png

Class folder names sort into label order (the torchvision ImageFolder convention).
The same seed gives byte-identical files on the same Pillow/zlib build.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["SOURCE_TASK", "TARGET_TASKS", "TASKS", "TaskSpec", "write_demo_data"]

SOURCE_TASK = "source"
TARGET_TASKS = ("letters", "shapes", "textures")  # targets that differ from the source

_SUPERSAMPLE = 2  # draw masks at 2x and box-downsample: cheap anti-aliasing
_GLYPH_REF_SIZE = 64  # font size of the cached reference glyphs
_MIN_PER_CLASS = 4

Drawer = Callable[[str, np.random.Generator, int], Image.Image]


# --------------------------------------------------------------------------- colours


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour_pair(rng: np.random.Generator, min_contrast: float = 80.0) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground/background colours whose luminance differs enough to read.

    Random colours (not black on white) keep colour from being a shortcut feature.
    """
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if abs(_luma(fg) - _luma(bg)) >= min_contrast:
            return fg, bg


def _compose(
    size: int,
    layers: list[tuple[Image.Image, np.ndarray]],
    bg: np.ndarray,
    rng: np.random.Generator,
    noise: tuple[float, float] = (3.0, 8.0),
) -> Image.Image:
    """Alpha-blend colour layers (mask, rgb) over a background, then add light noise."""
    out = np.empty((size, size, 3), dtype=np.float32)
    out[:] = bg
    for mask, colour in layers:
        if mask.size != (size, size):
            mask = mask.resize((size, size), Image.Resampling.BOX)
        alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        out += alpha * (np.asarray(colour, dtype=np.float32) - out)
    sigma = rng.uniform(*noise)
    out += rng.normal(0.0, sigma, size=out.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- geometry


def _affine(
    mask: Image.Image, angle_deg: float, scale: float, shear: float, shift: tuple[float, float]
) -> Image.Image:
    """Rotate/scale/shear a mask about its centre and shift it, in one resample."""
    w, h = mask.size
    cx, cy = w / 2.0, h / 2.0
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shr = np.array([[1.0, shear], [0.0, 1.0]])
    fwd = rot @ shr * scale
    inv = np.linalg.inv(fwd)
    # output pixel p maps to input inv @ (p - c - shift) + c
    off = np.array([cx, cy]) - inv @ np.array([cx + shift[0], cy + shift[1]])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return mask.transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)


def _polygon(n: int, r_outer: float, r_inner: float | None, cx: float, cy: float, rot: float) -> list[tuple[float, float]]:
    """Regular polygon (r_inner None) or star with n points, rotated by rot radians."""
    radii = [r_outer] if r_inner is None else [r_outer, r_inner]
    k = n * len(radii)
    pts = []
    for i in range(k):
        t = rot + 2 * math.pi * i / k - math.pi / 2
        r = radii[i % len(radii)]
        pts.append((cx + r * math.cos(t), cy + r * math.sin(t)))
    return pts


def _cross(r: float, half_width: float, cx: float, cy: float, rot: float) -> list[tuple[float, float]]:
    """Plus-shaped 12-gon with arms of length r and half-width half_width."""
    a, b = r, half_width
    base = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
            (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]


def _clutter(mask: Image.Image, rng: np.random.Generator, n_lines: int, width: float) -> None:
    """Random straight strokes: generic edges that carry no label information."""
    draw = ImageDraw.Draw(mask)
    s = mask.size[0]
    for _ in range(n_lines):
        x0, y0, x1, y1 = rng.uniform(-0.1 * s, 1.1 * s, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(140, 256)), width=max(1, int(round(width))))


# --------------------------------------------------------------------------- glyphs


@functools.lru_cache(maxsize=None)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (FreeType), or its bitmap fallback when FreeType is missing."""
    return ImageFont.load_default(size=_GLYPH_REF_SIZE)


@functools.lru_cache(maxsize=None)
def _glyph(char: str) -> Image.Image:
    """Tight 'L' mask of one character, rendered once and cached.

    Works for both font kinds: the bitmap fallback gives a tiny glyph that is
    upscaled later like any other.
    """
    font = _font()
    pad = _GLYPH_REF_SIZE
    canvas = Image.new("L", (3 * pad, 3 * pad), 0)
    ImageDraw.Draw(canvas).text((pad // 2, pad // 2), char, fill=255, font=font)
    bbox = canvas.getbbox()
    if bbox is None:
        raise ValueError(f"font renders nothing for {char!r}")
    return canvas.crop(bbox)


@dataclass(frozen=True)
class GlyphStyle:
    """Jitter ranges for drawn characters; letters use a different style than digits."""

    height: tuple[float, float]  # glyph height as a fraction of the image
    stroke: tuple[int, int]  # extra dilation passes at 2x (inclusive range)
    angle: float  # max |rotation| in degrees
    scale: tuple[float, float]
    shear: float  # max |shear|
    shift: float  # max |translation| as a fraction of the image
    aspect: tuple[float, float]  # width stretch
    clutter: tuple[int, int]  # number of clutter lines (inclusive range)


DIGIT_STYLE = GlyphStyle(height=(0.55, 0.65), stroke=(0, 1), angle=15.0, scale=(0.8, 1.2),
                         shear=0.0, shift=0.12, aspect=(0.9, 1.1), clutter=(1, 3))
LETTER_STYLE = GlyphStyle(height=(0.45, 0.7), stroke=(0, 3), angle=12.0, scale=(0.85, 1.15),
                          shear=0.3, shift=0.1, aspect=(0.75, 1.3), clutter=(0, 1))


def _draw_glyph(char: str, rng: np.random.Generator, size: int, style: GlyphStyle) -> Image.Image:
    s = size * _SUPERSAMPLE
    glyph = _glyph(char)
    h = max(4, int(round(s * rng.uniform(*style.height))))
    w = max(2, int(round(glyph.width * h / glyph.height * rng.uniform(*style.aspect))))
    glyph = glyph.resize((w, h), Image.Resampling.BILINEAR)
    for _ in range(int(rng.integers(style.stroke[0], style.stroke[1] + 1))):
        glyph = glyph.filter(ImageFilter.MaxFilter(3))
    mask = Image.new("L", (s, s), 0)
    mask.paste(glyph, ((s - glyph.width) // 2, (s - glyph.height) // 2))
    mask = _affine(
        mask,
        angle_deg=rng.uniform(-style.angle, style.angle),
        scale=rng.uniform(*style.scale),
        shear=rng.uniform(-style.shear, style.shear),
        shift=tuple(rng.uniform(-style.shift, style.shift, size=2) * s),
    )
    fg, bg = _colour_pair(rng)
    layers = []
    n_lines = int(rng.integers(style.clutter[0], style.clutter[1] + 1))
    if n_lines:
        lines = Image.new("L", (s, s), 0)
        _clutter(lines, rng, n_lines, width=rng.uniform(1, 2.5) * _SUPERSAMPLE / 2)
        clutter_colour = bg + rng.uniform(0.3, 0.8) * (rng.uniform(0, 255, size=3) - bg)
        layers.append((lines, clutter_colour))
    layers.append((mask, fg))
    return _compose(size, layers, bg, rng)


def _draw_digit(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    return _draw_glyph(name, rng, size, DIGIT_STYLE)


def _draw_letter(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    return _draw_glyph(name, rng, size, LETTER_STYLE)


# --------------------------------------------------------------------------- shapes


def _draw_shape(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    s = size * _SUPERSAMPLE
    r = s * rng.uniform(0.2, 0.36)
    margin = r * 1.15
    cx, cy = rng.uniform(margin, s - margin, size=2)
    rot = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        width = max(2, int(round(r * rng.uniform(0.22, 0.4))))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
    elif name == "square":
        draw.polygon(_polygon(4, r * 1.1, None, cx, cy, rot), fill=255)
    elif name == "triangle":
        draw.polygon(_polygon(3, r * 1.15, None, cx, cy, rot), fill=255)
    elif name == "star":
        draw.polygon(_polygon(5, r * 1.1, r * rng.uniform(0.38, 0.5), cx, cy, rot), fill=255)
    elif name == "cross":
        draw.polygon(_cross(r, r * rng.uniform(0.22, 0.34), cx, cy, rot), fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}")
    fg, bg = _colour_pair(rng)
    layers = []
    if rng.random() < 0.5:  # occasional distractor stroke so edges alone do not decide
        lines = Image.new("L", (s, s), 0)
        _clutter(lines, rng, 1, width=rng.uniform(1, 2) * _SUPERSAMPLE / 2)
        layers.append((lines, bg + rng.uniform(0.3, 0.7) * (fg - bg)))
    layers.append((mask, fg))
    return _compose(size, layers, bg, rng)


# --------------------------------------------------------------------------- textures


def _square_wave(phase: np.ndarray, softness: float) -> np.ndarray:
    """Anti-aliased square wave in [0, 1] from a phase in radians."""
    return np.clip(0.5 + softness * np.sin(phase), 0.0, 1.0)


def _texture_field(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Pattern in [0, 1] of shape (size, size) for one texture class."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size * rng.uniform(0.12, 0.3)
    phase = rng.uniform(0, 2 * math.pi)
    softness = rng.uniform(1.5, 4.0)
    jitter = math.radians(rng.uniform(-8, 8))

    def along(theta: float) -> np.ndarray:
        return x * math.cos(theta) + y * math.sin(theta)

    if name == "stripes_horizontal":  # bands run left-right, so intensity varies with y
        return _square_wave(2 * math.pi * along(math.pi / 2 + jitter) / period + phase, softness)
    if name == "stripes_vertical":
        return _square_wave(2 * math.pi * along(jitter) / period + phase, softness)
    if name == "stripes_diagonal":
        theta = (math.pi / 4 if rng.random() < 0.5 else 3 * math.pi / 4) + jitter
        return _square_wave(2 * math.pi * along(theta) / period + phase, softness)
    if name == "checkerboard":
        u, v = along(jitter), along(jitter + math.pi / 2)
        phase2 = rng.uniform(0, 2 * math.pi)
        prod = np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period + phase2)
        return np.clip(0.5 + softness * prod, 0.0, 1.0)
    if name == "dots":
        u, v = along(jitter), along(jitter + math.pi / 2)
        off = rng.uniform(0, period, size=2)
        du = (u + off[0]) % period - period / 2
        dv = (v + off[1]) % period - period / 2
        radius = period * rng.uniform(0.18, 0.32)
        return np.clip(radius - np.hypot(du, dv) + 0.5, 0.0, 1.0)
    if name == "blobs":
        cells = int(rng.integers(3, 8))
        coarse = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32), "F")
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        smooth = (smooth - np.median(smooth)) / (smooth.std() + 1e-6)
        return np.clip(0.5 + softness * smooth, 0.0, 1.0)
    raise ValueError(f"unknown texture {name!r}")


def _draw_texture(name: str, rng: np.random.Generator, size: int) -> Image.Image:
    field = _texture_field(name, rng, size)
    fg, bg = _colour_pair(rng)
    mask = Image.fromarray(np.rint(field * 255).astype(np.uint8), "L")
    return _compose(size, [(mask, fg)], bg, rng, noise=(4.0, 12.0))


# --------------------------------------------------------------------------- task table


@dataclass(frozen=True)
class TaskSpec:
    """One demo task: its classes (folder names), base per-class counts and drawer."""

    classes: tuple[str, ...]
    train: int  # images per class at scale=1.0
    val: int
    seed_offset: int  # keeps the tasks' random streams apart for one seed
    draw: Drawer


TASKS: dict[str, TaskSpec] = {
    SOURCE_TASK: TaskSpec(tuple("0123456789"), 160, 40, 0, _draw_digit),
    "letters": TaskSpec(tuple("ACEHKMRX"), 40, 30, 1, _draw_letter),
    "shapes": TaskSpec(("circle", "cross", "ring", "square", "star", "triangle"), 40, 30, 2, _draw_shape),
    "textures": TaskSpec(
        ("blobs", "checkerboard", "dots", "stripes_diagonal", "stripes_horizontal", "stripes_vertical"),
        40, 30, 3, _draw_texture,
    ),
}


# --------------------------------------------------------------------------- writer


def _count(base: int, scale: float) -> int:
    return max(_MIN_PER_CLASS, int(round(base * scale)))


def _write_task(dest: Path, spec: TaskSpec, rng: np.random.Generator, size: int, counts: dict[str, int], bar) -> None:
    for split in ("train", "val"):
        for name in spec.classes:
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                img = spec.draw(name, rng, size)
                img.save(folder / f"{i:04d}.png", format="PNG")
                bar.update(1)


def write_demo_data(
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 40,
    scale: float = 1.0,
    progress: bool = False,
    tasks: tuple[str, ...] | list[str] | None = None,
) -> dict:
    """Writes root/<task>/train/<class>/NNNN.png and root/<task>/val/<class>/NNNN.png for the
    source task and every target task (or only ``tasks``); returns {task: {"classes": [...],
    "train": n, "val": n}}. A task's images do not depend on which other tasks are written.

    ``train``/``val`` are per-class counts. An existing root/<task> is replaced: each task is
    written to a hidden sibling folder first and swapped in, so an interrupted run never
    leaves a half-written task under the real name.
    """
    from tqdm import tqdm

    seed = int(seed)
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if int(image_size) != image_size or image_size < 8:
        raise ValueError("image_size must be an integer >= 8")
    if not scale > 0:
        raise ValueError("scale must be > 0")
    image_size = int(image_size)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown demo task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    chosen = {task: spec for task, spec in TASKS.items() if tasks is None or task in tasks}
    plan = {task: {"train": _count(spec.train, scale), "val": _count(spec.val, scale)} for task, spec in chosen.items()}
    total = sum((c["train"] + c["val"]) * len(TASKS[t].classes) for t, c in plan.items())

    summary: dict[str, dict] = {}
    with tqdm(total=total, disable=not progress, desc="demo data", unit="img") as bar:
        for task, spec in chosen.items():
            final = root / task
            tmp = root / f".{task}.partial"
            if tmp.exists():
                shutil.rmtree(tmp)
            rng = np.random.default_rng([seed, spec.seed_offset])
            _write_task(tmp, spec, rng, image_size, plan[task], bar)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            summary[task] = {"classes": sorted(spec.classes), **plan[task]}
    return summary
