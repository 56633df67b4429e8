"""Run the device side on one machine and record what it did, for compare.py to judge.

Runs unchanged on the x86 host and on arm64 under qemu-user. It uses only the device's public
surface: the ``km-edge`` CLI (``km_edge.cli:main``, called in this process, because an emulated
Python cannot start other arm64 programs without binfmt_misc) and ``device_runtime``'s Runtime
API for the logits. It never imports torch.

The tampered packs are made HERE, on the machine being checked (a byte flipped in each part, cut
short, emptied, a format version nobody reads, a foreign file), so arm64 refuses packs that were
tampered on arm64; compare.py checks that the tampered bytes and the refusals equal x86's.

Usage: python device_check.py DEVICE_DIR RESULT_JSON
DEVICE_DIR is a copy of the fixture's device/ folder; every path given to the CLI is relative to
it, so messages are comparable across machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

# The device folder fixture.py writes and this script reads (paths relative to it).
TASK = "letters"
BASE = "base"  # also the CLI's default, which run and verify rely on here
GOOD = f"packs/{TASK}.kmp"
GOOD_FP16 = f"packs/{TASK}-fp16.kmp"
HOSTILE = "packs/hostile"  # validly signed packs the device must refuse
HOSTILE_PACKS = ("untrusted", "w1-shape", "head-features")
PUBKEY = "keys/signing.pub"
STRANGER_PUBKEY = "keys/stranger.pub"
OTHER_BASE = "other-base"
VAL = f"data/{TASK}/val"

RUN_IMAGES = 3
UNKNOWN_FORMAT_VERSION = 99


# --- the CLI, in process ---------------------------------------------------------------------------
def cli(*args: str) -> dict:
    """``km-edge ARGS`` as a user runs it: exit code, stdout and stderr."""
    from km_edge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(args=list(args), prog_name="km-edge")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return {"args": list(args), "exit_code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


# --- packs tampered on this machine --------------------------------------------------------------
def _flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0xFF
    return bytes(out)


def tamper(good: Path, folder: Path) -> dict[str, str]:
    """{case: relative path} of packs broken here from the good pack's bytes."""
    import msgpack

    data = good.read_bytes()
    envelope = msgpack.unpackb(data, raw=False)
    if not isinstance(envelope, dict) or "payload" not in envelope or "format_version" not in envelope:
        raise SystemExit("device_check: the pack envelope has no payload/format_version; "
                         "update tools/arm64/device_check.py to the pack format")
    payload_at = data.index(envelope["payload"])
    signature_at = data.index(envelope["signature"])
    cases = {
        "flip-start": _flip(data, 0),
        "flip-payload-middle": _flip(data, payload_at + len(envelope["payload"]) // 2),
        "flip-signature": _flip(data, signature_at + 10),
        "flip-end": _flip(data, len(data) - 1),
        "truncated": data[: len(data) * 2 // 3],
        "empty": b"",
        "not-a-pack": sorted(Path(VAL).rglob("*.png"))[0].read_bytes(),
        "unknown-format": msgpack.packb({**envelope, "format_version": UNKNOWN_FORMAT_VERSION},
                                        use_bin_type=True),
    }
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for case, content in cases.items():
        path = folder / f"{case}.kmp"
        path.write_bytes(content)
        made[case] = str(path)
    return made


# --- cases -----------------------------------------------------------------------------------------
def refusal_cases(tampered: dict[str, str]) -> dict[str, tuple[str, list[str]]]:
    """{case: (pack, extra CLI args)}: every pack or setting the device must refuse."""
    cases = {case: (path, []) for case, path in tampered.items()}
    cases.update({
        "untrusted-signer": (f"{HOSTILE}/untrusted.kmp", []),
        "w1-shape": (f"{HOSTILE}/w1-shape.kmp", []),
        "head-features": (f"{HOSTILE}/head-features.kmp", []),
        "other-base": (GOOD, ["--base", OTHER_BASE]),
        "untrusted-key": (GOOD, ["--pubkey", STRANGER_PUBKEY]),
        "missing-file": ("packs/missing.kmp", []),
    })
    return cases


def refusal_class(pack: str, extra: list[str]) -> str:
    """The KmEdgeError subclass the Runtime API raises for this case (its name), or 'accepted'."""
    from device_runtime.errors import KmEdgeError
    from device_runtime.keys import load_trusted_keys
    from device_runtime.runtime import Runtime

    options = dict(zip(extra[::2], extra[1::2]))
    try:
        runtime = Runtime(options.get("--base", BASE),
                          load_trusted_keys([options.get("--pubkey", PUBKEY)]))
        runtime.check_pack(pack)
    except KmEdgeError as exc:
        return type(exc).__name__
    return "accepted"


def logits_of(pack: str, images: list[str]) -> list[list[float]]:
    """The pack's logits on the images through the Runtime API (onnxruntime backend)."""
    import numpy as np

    from device_runtime.keys import load_trusted_keys
    from device_runtime.preprocess import load_image, preprocess
    from device_runtime.runtime import Runtime

    runtime = Runtime(BASE, load_trusted_keys([PUBKEY]))
    runtime.load_pack(pack)
    batch = np.stack([preprocess(load_image(path), runtime.preprocess_spec) for path in images])
    return runtime.logits(batch).astype(float).tolist()


def environment() -> dict:
    import numpy
    import onnxruntime

    import device_runtime
    import km_edge
    import km_edge.cli  # noqa: F401  (counted with the imports)

    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_installed": importlib.util.find_spec("torch") is not None,
        "km_edge_file": km_edge.__file__,
        "device_runtime_file": device_runtime.__file__,
    }


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: device_check.py DEVICE_DIR RESULT_JSON")
    device, result_path = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    os.chdir(device)
    started = time.monotonic()
    images = sorted(str(p) for p in Path(VAL).rglob("*.png"))
    result: dict = {"environment": environment(), "cli": {}, "refusals": {}, "tampered_sha256": {}}
    sections = {"imports": time.monotonic() - started}
    mark = time.monotonic()

    def section(name: str) -> None:
        nonlocal mark
        sections[name] = time.monotonic() - mark
        mark = time.monotonic()

    # what a user runs on a good pack
    result["cli"]["verify"] = cli("verify", GOOD, "--json")
    result["cli"]["verify-fp16"] = cli("verify", GOOD_FP16, "--json")
    result["cli"]["inspect"] = cli("inspect", GOOD, "--json")
    result["cli"]["inspect-text"] = cli("inspect", GOOD)
    result["cli"]["run"] = cli("run", "--pack", GOOD, *images[:: max(1, len(images) // RUN_IMAGES)][:RUN_IMAGES],
                               "--top-k", "3", "--json")
    result["cli"]["eval"] = cli("eval", "--pack", GOOD, VAL, "--json")
    result["cli"]["eval-fp16"] = cli("eval", "--pack", GOOD_FP16, VAL, "--json")
    section("good packs")

    # every refusal, through run and verify, plus the API's error class
    tampered = tamper(Path(GOOD), Path("tampered"))
    for case, path in tampered.items():
        result["tampered_sha256"][case] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    for case, (pack, extra) in refusal_cases(tampered).items():
        result["refusals"][case] = {
            "run": cli("run", "--pack", pack, images[0], *extra),
            "verify": cli("verify", pack, *extra),
            "verify-json": cli("verify", pack, *extra, "--json"),
            "class": refusal_class(pack, extra),
        }
    section("refusals")

    # logits of every val image through the Runtime API
    result["images"] = images
    result["logits"] = {"fp32": logits_of(GOOD, images), "fp16": logits_of(GOOD_FP16, images)}
    section("logits")
    result["seconds"] = round(time.monotonic() - started, 1)
    result["sections_s"] = {name: round(value, 1) for name, value in sections.items()}
    result_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
