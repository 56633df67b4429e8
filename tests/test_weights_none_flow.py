"""Projects without downloads: the `init` default base, `--weights none`, failed weights downloads.

- `km-edge init` defaults to the ImageNet EfficientNet-Lite0 installed offline ([lite0] extra).
- `--weights none` draws the random base once (fixed seed), saves it in the project, and every
  later command (export-base, train, pack) uses that same base: the whole flow runs.
- A weights download that fails (no network, proxy, disk) is exit 2 with one line naming what was
  being fetched and the offline alternatives.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from km_edge.config import load_settings

from conftest import run_cli

# every download goes to a proxy on a closed local port and into empty caches: it must fail
NO_NETWORK = {
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": "",
    "HF_HUB_OFFLINE": "1",
}


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("km-edge: error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in lines[0]
    return lines[0]


def _write_task(root, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("val", 2)):
        for k, cls in enumerate(("dark", "light")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                level = 40 if k == 0 else 200
                pixels = np.clip(rng.normal(level, 30, size=(36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_init_defaults_to_the_offline_imagenet_lite0(tmp_path):
    assert run_cli("init", "p", cwd=tmp_path).returncode == 0
    assert load_settings(tmp_path / "p").base == {"arch": "efficientnet_lite0", "weights": "imagenet",
                                                  "input_size": 224}
    # another architecture without --weights gets a random base, never a download
    assert run_cli("init", "q", "--arch", "resnet18", cwd=tmp_path).returncode == 0
    assert load_settings(tmp_path / "q").base["weights"] == "none"


@pytest.mark.slow
def test_weights_none_flow_init_export_train_pack_run(tmp_path):
    project = tmp_path / "p"
    assert run_cli("init", project, "--arch", "mobilenet_v3_small", "--weights", "none", "--input-size", "64",
                   cwd=tmp_path).returncode == 0
    _write_task(project / "data" / "tone")

    def km_edge(*args):
        result = run_cli(*args, "--json", cwd=project)
        assert result.returncode == 0, (args, result.stderr)
        return json.loads(result.stdout)

    exported = km_edge("export-base")
    saved = project / "bases" / "mobilenet_v3_small-random.pth"
    assert saved.is_file() and exported["weights"] == str(saved.resolve())
    stamp = saved.stat().st_mtime_ns
    trained = km_edge("train", "--task", "tone", "--max-steps", "2", "--batch-size", "4", "--device", "cpu")
    packed = km_edge("pack", "--task", "tone")  # refused before: each process drew its own random base
    assert packed["base_id"] == exported["base_id"]
    assert saved.stat().st_mtime_ns == stamp  # drawn once, then reused
    image = sorted((project / "data" / "tone" / "val" / "light").glob("*.png"))[0]
    ran = km_edge("run", "--pack", packed["pack"], str(image), "--top-k", "1")
    assert ran["predictions"][0]["top"][0]["label"] in ("dark", "light")
    assert trained["val_accuracy"] == packed["host_val_accuracy"]

    # the same seed gives the same base in a fresh project: the random base is reproducible
    other = tmp_path / "q"
    assert run_cli("init", other, "--arch", "mobilenet_v3_small", "--weights", "none", "--input-size", "64",
                   cwd=tmp_path).returncode == 0
    again = run_cli("export-base", "--json", cwd=other)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["base_id"] == exported["base_id"]


@pytest.mark.parametrize("arch, weights, fetched", [
    ("mobilenet_v2", "IMAGENET1K_V1", "download.pytorch.org"),
    ("timm:mobilenetv3_small_050", "pretrained", "timm/mobilenetv3_small_050"),
])
def test_failed_weights_download_is_one_line_with_offline_alternatives(tmp_path, arch, weights, fetched):
    env = dict(NO_NETWORK, TORCH_HOME=str(tmp_path / "torch-cache"), HF_HOME=str(tmp_path / "hf-cache"))
    result = run_cli("export-base", "--arch", arch, "--weights", weights, cwd=tmp_path, env=env)
    line = _one_error_line(result)
    assert "could not download" in line and fetched in line, line
    assert "--arch efficientnet_lite0 --weights imagenet" in line and "--weights none" in line
    assert not (tmp_path / "base").exists()  # nothing written
