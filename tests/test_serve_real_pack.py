"""`km-edge serve` on the demo project's trained letters pack answers exactly what `km-edge run` does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from serving import start_server


@pytest.mark.slow
def test_serve_answers_like_run_on_a_trained_pack(demo_project, letters_pack, tmp_path):
    packs = tmp_path / "packs"
    packs.mkdir()
    shutil.copy(letters_pack.pack, packs / "letters.kmp")
    images = sorted((demo_project.data / "letters" / "val").rglob("*.png"))[:4]
    ran = json.loads(demo_project.run("run", "--pack", letters_pack.pack, *images, "--top-k", "3", "--json",
                                      check=True).stdout)

    served = start_server(_ProjectDevice(demo_project, packs, tmp_path))
    try:
        files = [(f"f{i}", (path.name, path.read_bytes())) for i, path in enumerate(images)]
        answer = served.client.post("/v1/tasks/letters/predict", files=files, params={"top_k": 3}).json()
        assert answer["task"] == "letters" and answer["pack_version"] == ran["pack"]["version"]
        assert answer["base_id"] == ran["pack"]["base_id"]
        for got, want in zip(answer["predictions"], ran["predictions"]):
            assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
            np.testing.assert_allclose([t["probability"] for t in got["top"]],
                                       [t["probability"] for t in want["top"]], rtol=1e-5, atol=1e-7)
    finally:
        assert served.stop() == 0


class _ProjectDevice:
    """What start_server needs, pointing at the demo project's base and key."""

    def __init__(self, project, packs, root):
        self.root, self.packs = root, packs
        self.base_dir = project.base_dir
        self.pubkey = project.keys / "signing.pub"
        self.state = root / "state" / "rollback.json"
