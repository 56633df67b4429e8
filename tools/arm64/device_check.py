"""Run the device side on one machine and record what it did, for compare.py to judge.

Runs unchanged on the x86 host and on arm64 under qemu-user. It uses only the device's public
surface: the ``km-edge`` CLI (``km_edge.cli:main``, called in this process, because an emulated
Python cannot start other arm64 programs without binfmt_misc) and ``device_runtime``'s Runtime
API for the logits. It never imports torch.

The tampered packs are made HERE, on the machine being checked (a byte flipped in each part, cut
short, emptied, a format version nobody reads, a foreign file), so arm64 refuses packs that were
tampered on arm64; compare.py checks that the tampered bytes and the refusals equal x86's.

The compiled rebuild kernel is held to numpy and to the definition HERE too: which engine rebuilds
kernels on this machine (``device_runtime.native``), and the largest differences between the
kernel (one call for all layers, ``km.rebuild_kernels``, and row by row, ``km.modulate_fast``),
numpy (``modulate_fast(use_native=False)``) and the definition (``km.modulate``), on the pack's
layers with each activation and on odd shapes (rows not a multiple of the kernel's 8-row tiles,
short and long rows, one to 17 hidden units).

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

# the rebuild cross-check: the compiled kernel ("native", through km_modulate_layers as a pack load
# calls it, with and without threads, and through km_modulate_rows) against numpy and the definition
NATIVE_DIFFS = ("native_layers_vs_definition", "native_layers_threaded_vs_definition",
                "native_rows_vs_definition", "native_layers_vs_numpy", "native_rows_vs_numpy")
REBUILD_THREADS = 3
ODD_SHAPES = "odd shapes"
ODD_D = (1, 4, 8, 9, 13, 16, 25, 40, 100)  # vector lengths: across and along the rows, both special cases
ODD_H = (1, 3, 8, 17)
ODD_ROWS = (1, 7, 13, 27, 67)  # none a multiple of the kernel's 8-row tile
KERNEL_SIDES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 9: (3, 3), 13: (1, 13), 16: (4, 4), 25: (5, 5),
                40: (5, 8), 100: (10, 10)}  # (kh, kw) of a kernel modulator of length d


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


# --- the compiled rebuild kernel against numpy and the definition ---------------------------------
def _largest_difference(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.abs(a[name] - b[name]).max()) for name in a)


def rebuild_differences(kernels: dict, layers: list) -> dict:
    """Largest |difference| between the rebuild paths on these KM layers (native ones: None when
    the kernel is not in use here)."""
    from device_runtime import km, native

    def each(**options) -> dict:
        return {layer.name: km.modulate_fast(kernels[layer.name], layer.tensors, layer.kind,
                                             layer.activation, layer.scale, **options)
                for layer in layers}

    definition = {layer.name: km.modulate(kernels[layer.name], layer.tensors, layer.kind,
                                          layer.activation, layer.scale) for layer in layers}
    numpy_path = each(use_native=False)
    out = {"layers": len(layers), "numpy_vs_definition": _largest_difference(numpy_path, definition),
           "largest_weight": max(float(abs(w).max()) for w in definition.values())}
    if not native.available():
        return {**out, **dict.fromkeys(NATIVE_DIFFS)}
    one_call = km.rebuild_kernels(kernels, layers)
    threaded = km.rebuild_kernels(kernels, layers, threads=REBUILD_THREADS)
    rows = each(use_native=True)
    out.update({
        "native_layers_vs_definition": _largest_difference(one_call, definition),
        "native_layers_threaded_vs_definition": _largest_difference(threaded, definition),
        "native_rows_vs_definition": _largest_difference(rows, definition),
        "native_layers_vs_numpy": _largest_difference(one_call, numpy_path),
        "native_rows_vs_numpy": _largest_difference(rows, numpy_path),
    })
    return out


def odd_layers(activation: str) -> tuple[dict, list]:
    """Kernels and KM layers of odd shapes (ODD_D x ODD_H, kernel and channel modulators, the
    latter on 1x1 and 3x3 convs), values as tests/test_fast_rebuild.py draws them; the same on
    every machine (numpy's PCG64)."""
    import numpy as np

    from device_runtime import km
    from device_runtime.pack import Layer

    rng = np.random.default_rng(2026)
    kernels, layers, count = {}, [], 0
    for d in ODD_D:
        for h in ODD_H:
            for kind, spatial in (("kernel", KERNEL_SIDES[d]), ("channel", (1, 1)), ("channel", (3, 3))):
                n = ODD_ROWS[count % len(ODD_ROWS)]
                count += 1
                if kind == "kernel":
                    in_channels = 3 if n % 3 == 0 else 1
                    shape = (n // in_channels, in_channels, *spatial)
                else:  # rows: out channels x kh x kw
                    shape = (n if spatial == (1, 1) else max(1, n // 9), d, *spatial)
                weight = rng.normal(0, 0.2, shape).astype(np.float32)
                tensors = {name: rng.normal(0, 0.4, size).astype(np.float32)
                           for name, size in km.modulator_shapes(d, h).items()}
                tensors["w1"] *= np.float32(2.5 / np.sqrt(d))
                name = f"odd-{kind}-{spatial[0]}x{spatial[1]}-d{d}-h{h}-n{weight.size // d}"
                kernels[name] = weight
                layers.append(Layer(name, "km", kind, activation, km.kernel_scale(weight), tensors))
    return kernels, layers


def rebuild_cases() -> list[tuple[str, str, str]]:
    """(pack or ODD_SHAPES, activation, case name) of every rebuild cross-check."""
    from device_runtime.km import ACTIVATIONS

    return [(source, activation, f"{source} {activation}")
            for source in (GOOD, GOOD_FP16, ODD_SHAPES) for activation in ACTIVATIONS]


def rebuild_check() -> dict:
    """The engine that rebuilds kernels here, and the rebuild paths' differences on the fixture's
    base and packs (each layer with every activation) and on odd shapes."""
    from dataclasses import replace

    from device_runtime import km, native
    from device_runtime.basefiles import Base
    from device_runtime.keys import load_trusted_keys
    from device_runtime.pack import read_pack

    kernels = Base.open(BASE).conv_kernels()
    trusted = load_trusted_keys([PUBKEY])
    cases = {}
    for source, activation, name in rebuild_cases():
        if source == ODD_SHAPES:
            cases[name] = rebuild_differences(*odd_layers(activation))
            continue
        layers = [layer for layer in read_pack(source, trusted).layers if layer.adapter == "km"]
        if not layers:
            raise SystemExit(f"device_check: {source} has no KM layer to rebuild")
        cases[name] = rebuild_differences(kernels, [replace(layer, activation=activation) for layer in layers])
    return {"engine": native.engine(), "reason": native.REASON,
            "library": None if native.PATH is None else native.PATH.name, "cases": cases}


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

    result["rebuild"] = rebuild_check()
    section("rebuild")
    result["seconds"] = round(time.monotonic() - started, 1)
    result["sections_s"] = {name: round(value, 1) for name, value in sections.items()}
    result_path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
