"""Tests for the offline demo datasets: layout, determinism, rewrite and font fallback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from km_edge import demodata
from km_edge.demodata import SOURCE_TASK, TARGET_TASKS, TASKS, write_demo_data

SCALE = 0.1
ALL_TASKS = (SOURCE_TASK, *TARGET_TASKS)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_data(root, seed=0, image_size=40, scale=SCALE)


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_summary_covers_source_and_targets(demo):
    _, info = demo
    assert set(info) == set(ALL_TASKS)
    assert SOURCE_TASK not in TARGET_TASKS
    for task in ALL_TASKS:
        spec = TASKS[task]
        assert info[task]["classes"] == sorted(spec.classes)
        assert info[task]["train"] == max(4, round(spec.train * SCALE))
        assert info[task]["val"] == max(4, round(spec.val * SCALE))
    assert len(info[SOURCE_TASK]["classes"]) == 10
    assert len(info["letters"]["classes"]) == 8
    assert len(info["shapes"]["classes"]) == 6
    assert len(info["textures"]["classes"]) == 6


def test_layout_and_counts_match_summary(demo):
    root, info = demo
    assert sorted(p.name for p in root.iterdir()) == sorted(ALL_TASKS)  # no leftover temp folders
    for task, d in info.items():
        assert sorted(p.name for p in (root / task).iterdir()) == ["train", "val"]
        for split in ("train", "val"):
            class_dirs = sorted(p.name for p in (root / task / split).iterdir())
            assert class_dirs == d["classes"]
            for cls in d["classes"]:
                names = sorted(p.name for p in (root / task / split / cls).iterdir())
                assert names == [f"{i:04d}.png" for i in range(d[split])]


def test_label_order_is_sorted_folder_order(demo):
    """ImageFolder assigns labels by sorted folder name; the summary must agree."""
    root, info = demo
    for task, d in info.items():
        folders = sorted(p.name for p in (root / task / "train").iterdir() if p.is_dir())
        assert {name: i for i, name in enumerate(folders)} == {name: i for i, name in enumerate(d["classes"])}
    assert info[SOURCE_TASK]["classes"] == [str(i) for i in range(10)]


def test_images_are_rgb_of_requested_size_and_not_blank(demo):
    root, _ = demo
    files = _pngs(root)
    assert len(files) > 300
    for path in files:
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (40, 40)
            arr = np.asarray(im)
        assert arr.std() > 5.0, path  # something is drawn on it


def test_same_seed_gives_identical_bytes(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, scale=0.05)
    b = write_demo_data(tmp_path / "b", seed=3, scale=0.05)
    assert a == b
    files_a = [p.relative_to(tmp_path / "a") for p in _pngs(tmp_path / "a")]
    files_b = [p.relative_to(tmp_path / "b") for p in _pngs(tmp_path / "b")]
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_different_seed_gives_different_images(demo, tmp_path):
    root0, _ = demo
    write_demo_data(tmp_path, seed=1, scale=0.05)
    for task in ALL_TASKS:
        cls = sorted(TASKS[task].classes)[0]
        rel = Path(task) / "train" / cls / "0000.png"
        assert (root0 / rel).read_bytes() != (tmp_path / rel).read_bytes(), rel


def test_rerun_replaces_task_folders_and_keeps_other_files(tmp_path):
    write_demo_data(tmp_path, seed=0, scale=0.1)
    stale = tmp_path / "letters" / "train" / "A" / "9999.png"
    stale.write_bytes(b"stale")
    (tmp_path / "shapes" / "train" / "blob_class").mkdir()
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")
    before = (tmp_path / SOURCE_TASK / "train" / "0" / "0000.png").read_bytes()

    info = write_demo_data(tmp_path, seed=1, scale=0.05)

    assert not stale.exists()
    assert not (tmp_path / "shapes" / "train" / "blob_class").exists()
    assert keep.read_text() == "not ours"
    n_train = info[SOURCE_TASK]["train"]
    assert len(list((tmp_path / SOURCE_TASK / "train" / "0").iterdir())) == n_train
    assert (tmp_path / SOURCE_TASK / "train" / "0" / "0000.png").read_bytes() != before
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_every_drawer_honours_image_size():
    rng = np.random.default_rng(0)
    for spec in TASKS.values():
        for name in spec.classes:
            im = spec.draw(name, rng, 32)
            assert im.mode == "RGB" and im.size == (32, 32)


def test_bitmap_font_fallback_still_draws(monkeypatch):
    """Without FreeType, load_default() gives a bitmap font; glyphs must still render."""
    demodata._glyph.cache_clear()
    monkeypatch.setattr(demodata, "_font", ImageFont.load_default_imagefont)
    try:
        rng = np.random.default_rng(0)
        for task in (SOURCE_TASK, "letters"):
            for name in TASKS[task].classes:
                assert demodata._glyph(name).getbbox() is not None
                im = TASKS[task].draw(name, rng, 40)
                assert im.size == (40, 40) and np.asarray(im).std() > 5.0
    finally:
        demodata._glyph.cache_clear()


def test_progress_bar_runs(tmp_path):
    info = write_demo_data(tmp_path, seed=0, scale=0.01, progress=True)
    assert info["textures"]["train"] == 4 and info["textures"]["val"] == 4


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": -1}, {"image_size": 4}, {"image_size": 32.5}, {"scale": 0}, {"scale": -1.0}],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        write_demo_data(tmp_path, **kwargs)


def test_module_does_not_import_torch():
    code = "import sys, km_edge.demodata; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr or "importing km_edge.demodata pulled in torch"
