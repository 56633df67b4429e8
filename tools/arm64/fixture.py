"""Make, on the x86 host, the base and packs that the arm64 stage runs under emulation.

Everything is made the way a user makes it, through the ``km-edge`` CLI of this checkout (in one process) (the tiny
``demo`` base, trained for a few epochs: the stage checks that arm64 does what x86 does, not
accuracy). The few signed-but-wrong packs no CLI command writes are made with the device_runtime
pack API, as the test suite makes them. The result is two folders:

    OUT/project/   the host project (km-edge.toml, data, the private key, checkpoints)
    OUT/device/    what a device gets: base/, other-base/, keys/*.pub, packs/, val images

Usage: python tools/arm64/fixture.py OUT      (OUT must not exist; written whole or not at all)
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

from device_check import (BASE, GOOD, GOOD_FP16, HOSTILE, HOSTILE_PACKS, OTHER_BASE, PUBKEY, STRANGER_PUBKEY,
                          TASK, VAL)

DATA_SCALE = 0.5  # letters val: 15 images per class
PRETRAIN_EPOCHS = 6
TASK_EPOCHS = 6


def km_edge(*args, cwd: Path) -> None:
    """Run a ``km-edge`` command of this checkout (the caller puts it first on PYTHONPATH) in
    ``cwd``, in this process so torch is imported once; any failure ends the fixture in one line."""
    from km_edge.cli import main as cli

    started, words = time.monotonic(), " ".join(map(str, args))
    errors, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            cli.main(args=[str(a) for a in args], prog_name="km-edge")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(here)
    if code != 0:
        tail = (errors.getvalue().strip().splitlines() or ["(no message)"])[-1]
        sys.exit(f"arm64 fixture: 'km-edge {words}' failed ({code}): {tail}")
    print(f"  km-edge {args[0]}: {time.monotonic() - started:.1f} s", file=sys.stderr)


def hostile_packs(good: Path, project: Path, stranger: Path, out: Path) -> None:
    """Validly signed packs the device must still refuse: a key it does not trust, a modulator
    tensor and a head whose shapes disagree with the base."""
    import numpy as np

    from device_runtime.keys import load_private_key, load_trusted_keys
    from device_runtime.pack import build_pack, read_pack

    trusted = load_trusted_keys([project / "keys" / "signing.pub"])
    pack = read_pack(good, trusted)

    def body() -> dict:
        return {
            "task": pack.task, "pack_version": pack.pack_version, "created": pack.created,
            "base_id": pack.base_id, "labels": list(pack.labels), "preprocess": pack.preprocess,
            "method": pack.method, "modulator": pack.modulator,
            "layers": list(pack.layers),
            "head": dict(pack.head),
            "bn": list(pack.bn),
            "metrics": pack.metrics, "trainer": pack.trainer,
        }

    key = load_private_key(project / "keys" / "signing.key")
    signed = {"untrusted": build_pack(body(), load_private_key(stranger / "signing.key"))}
    wrong = body()
    first = wrong["layers"][0]
    d, h = first.tensors["w1"].shape  # a modulator for vectors one longer than the base's kernels
    wrong["layers"][0] = {"name": first.name, "adapter": first.adapter, "kind": first.kind,
                          "activation": first.activation, "scale": first.scale,
                          "tensors": {"w1": np.zeros((d + 1, h), np.float32), "b1": np.zeros(h, np.float32),
                                      "w2": np.zeros((h, d + 1), np.float32), "b2": np.zeros(d + 1, np.float32)}}
    signed["w1-shape"] = build_pack(wrong, key)
    wrong = body()
    weight = wrong["head"]["weight"]
    wrong["head"]["weight"] = np.zeros((weight.shape[0], weight.shape[1] + 3), np.float32)
    signed["head-features"] = build_pack(wrong, key)
    assert sorted(signed) == sorted(HOSTILE_PACKS)
    out.mkdir(parents=True)
    for name, data in signed.items():
        (out / f"{name}.kmp").write_bytes(data)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    final = Path(sys.argv[1])
    if final.exists():
        sys.exit(f"arm64 fixture: {final} exists")
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    project, device = work / "project", work / "device"
    work.mkdir(parents=True)

    km_edge("init", project.name, "--arch", "demo", "--weights", "bases/demo.pth", "--input-size", 32, cwd=work)
    km_edge("demo-data", "data", "--scale", DATA_SCALE, "--json", cwd=project)
    km_edge("pretrain", "--data", "data/source", "--arch", "demo", "--epochs", PRETRAIN_EPOCHS,
            "--device", "cpu", "--json", cwd=project)
    km_edge("export-base", "--json", cwd=project)
    km_edge("pack", "--task", TASK, "--epochs", TASK_EPOCHS, "--device", "cpu", "--seed", 0,
            "--out", device / GOOD, "--json", cwd=project)
    km_edge("pack", "--task", TASK, "--dtype", "fp16", "--out", device / GOOD_FP16, "--json", cwd=project)
    km_edge("keygen", "--keys-dir", "stranger", "--json", cwd=project)
    km_edge("export-base", "--arch", "demo", "--weights", "none", "--input-size", 32,
            "--out", device / OTHER_BASE, "--json", cwd=project)

    shutil.copytree(project / "base", device / BASE)
    (device / PUBKEY).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(project / "keys" / "signing.pub", device / PUBKEY)
    shutil.copy2(project / "stranger" / "signing.pub", device / STRANGER_PUBKEY)
    hostile_packs(device / GOOD, project, project / "stranger", device / HOSTILE)
    shutil.copytree(project / "data" / TASK / "val", device / VAL)
    work.rename(final)


if __name__ == "__main__":
    main()
