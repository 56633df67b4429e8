"""Calibrates the KM learning margins of tests/test_training.py: trains the test session's demo
project (same data, pretraining and settings as tests/conftest.py) on letters with seeds 0, 1, 2 and
prints, per run, val accuracy and the untrained head's accuracy as JSON lines.

    OMP_NUM_THREADS=1 python benchmarks/km_margin.py 1
    OMP_NUM_THREADS=2 python benchmarks/km_margin.py 2
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    sys.path.insert(0, str(TESTS))
    import conftest
    from km_edge.config import render_config
    from km_edge.demodata import TARGET_TASKS, write_demo_data
    from km_edge.pretrain import pretrain_base

    root = Path(tempfile.mkdtemp())
    data = root / "data"
    write_demo_data(data, seed=0, scale=conftest.DATA_SCALE, progress=False)
    weights = root / "bases" / "demo.pth"
    pretrain_base(data / "source", "demo", weights, epochs=conftest.PRETRAIN_EPOCHS, batch_size=32, seed=0,
                  device="cpu", progress=False)
    config = render_config("demo", "bases/demo.pth", 32, {t: {"data": f"data/{t}"} for t in TARGET_TASKS})
    config = config.replace("epochs = 10", f"epochs = {conftest.TASK_EPOCHS}").replace('device = "auto"', 'device = "cpu"')
    (root / "km-edge.toml").write_text(config)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for seed in (0, 1, 2):
        result = subprocess.run([conftest.KM_EDGE, "train", "--task", "letters", "--seed", str(seed), "--json"],
                                cwd=root, capture_output=True, text=True, env=env, check=True)
        report = json.loads(result.stdout)
        print(json.dumps({"threads": threads, "seed": seed, "val": report["val_accuracy"],
                          "untrained": report["untrained_val_accuracy"], "n_val": report["n_val"]}), flush=True)


if __name__ == "__main__":
    main()
