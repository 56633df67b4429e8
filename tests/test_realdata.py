"""benchmarks/realdata.py reads the registries' own package files (npm .tgz, Debian .deb) offline.

Small packages in the real formats are written here (an npm tarball with emoji.json and PNGs; a
.deb ar archive whose data.tar.xz holds icon themes), so the readers, the splits and meta.json are
checked without the fetch step.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import realdata  # noqa: E402


def png(seed: int, alpha: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(8, 8, 4 if alpha else 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_emoji_package(path: Path, vendor: str, rows: list[dict], seed: int) -> None:
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "package/emoji.json", json.dumps(rows).encode())
        for i, row in enumerate(rows):
            add(tar, f"package/img/{vendor}/64/{row['image']}", png(seed * 1000 + i))


def write_deb(path: Path, files: dict[str, bytes], links: dict[str, str]) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, blob in files.items():
            add(tar, name, blob)
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))


@pytest.fixture()
def cache(tmp_path):
    cache = tmp_path / "packages"
    cache.mkdir()
    rows = []
    for category, subcategory, n in (("Animals & Nature", "animal-mammal", 20), ("Food & Drink", "food-fruit", 20),
                                     ("Flags", "country-flag", 4)):
        rows += [{"image": f"{subcategory}-{i}.png", "category": category, "subcategory": subcategory}
                 for i in range(n)]
    write_emoji_package(cache / realdata.SOURCES["emoji-datasource-google"]["file"], "google", rows, 1)
    write_emoji_package(cache / realdata.SOURCES["emoji-datasource-twitter"]["file"], "twitter", rows, 2)
    for package, theme, layout, seed in (("faenza-icon-theme", "Faenza", "{ctx}/{size}", 3),
                                         ("oxygen-icon-theme", "oxygen", "base/{size}x{size}/{ctx}", 4)):
        files, links = {}, {}
        for ctx in ("apps", "places"):
            for i in range(12):
                for size in (16, 48, 256):  # 256 is over the 128 px limit: never picked
                    where = layout.format(ctx=ctx, size=size)
                    files[f"./usr/share/icons/{theme}/{where}/{ctx}-{i}.png"] = png(seed * 10000 + i * 7 + size)
            links[f"./usr/share/icons/{theme}/{layout.format(ctx=ctx, size=48)}/alias.png"] = f"{ctx}-0.png"
        write_deb(cache / realdata.SOURCES[package]["file"], files, links)
    return cache


def test_emoji_targets_split_by_style_and_keep_train_and_test_emoji_apart(cache, tmp_path):
    metas = realdata.build(tmp_path / "out", ["emoji-category", "emoji-subcategory"], cache, 8, 6)
    category = metas["emoji-category"]
    assert category["classes"] == ["animals-and-nature", "food-and-drink"]  # flags left out
    assert category["train_counts"] == {"animals-and-nature": 8, "food-and-drink": 8}
    root = tmp_path / "out" / "emoji-category"
    for label in category["classes"]:
        train = {p.name for p in (root / "train" / label).iterdir()}
        test = {p.name for p in (root / "test" / label).iterdir()}
        assert train and test and not train & test  # other emoji in test
    image = Image.open(next((root / "train" / "food-and-drink").iterdir()))
    assert image.mode == "RGB" and image.size == (realdata.IMAGE_SIZE, realdata.IMAGE_SIZE)
    assert "Apache-2.0" in category["licenses"]["emoji-datasource-google"]
    assert "CC-BY-4.0" in category["licenses"]["emoji-datasource-twitter"]
    sub = metas["emoji-subcategory"]
    assert sub["classes"] == ["animal-mammal", "food-fruit"] and sub["n_test"] == 12
    assert json.loads((tmp_path / "out" / "emoji-subcategory" / "meta.json").read_text())["shift"].startswith("style")


def test_icon_target_reads_deb_files_largest_size_up_to_128_and_skips_links(cache, tmp_path):
    icons = realdata.icon_images(cache, "oxygen-icon-theme", "oxygen")
    assert sorted(icons) == ["apps", "places"] and len(icons["apps"]) == 12  # the symlinked alias is not an icon
    assert "alias" not in icons["apps"]
    assert Image.open(io.BytesIO(icons["apps"]["apps-3"])).size == (8, 8)
    meta = realdata.build(tmp_path / "out", ["icons-faenza-oxygen"], cache, 5, 4)["icons-faenza-oxygen"]
    assert meta["train_counts"] == {"apps": 5, "places": 5} and meta["test_counts"] == {"apps": 4, "places": 4}
    assert meta["licenses"] == {"faenza-icon-theme": "GPL-3+", "oxygen-icon-theme": "LGPL-3+"}


def test_a_missing_package_file_names_the_fetch_step(tmp_path):
    with pytest.raises(realdata.SourceMissing, match="make bench-data"):
        realdata.build(tmp_path / "out", ["emoji-category"], tmp_path / "empty", 8, 6)
    assert realdata.main(["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "empty"),
                          "--targets", "icons-elementary-tango"]) == 2
