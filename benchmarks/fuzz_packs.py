#!/usr/bin/env python
"""Fuzz the pack reader: byte-level and structure-aware mutations of real packs, signed or not.

Every case must end in one of two clean outcomes: a ``PackError`` refusal, or an acceptance whose
pack re-encodes and re-signs to exactly the bytes that were read (nothing ignored, nothing read two
ways). Anything else (another exception, an acceptance that does not round-trip) is *unclean* and
recorded with the case's seed so it can be replayed. Structure-aware cases are re-signed with the
fuzzer's own (trusted) key, so they reach the body parser: they play a stolen key or a buggy host.

    nice -n 19 python benchmarks/fuzz_packs.py --cases 100000 --out benchmarks/results/fuzz_packs.json

Seed packs: KM (fp32, fp16), LoRA, head-only, built from the demo base's real layer shapes with
non-zero modulators (needs torch), plus any ``--pack FILE --key PRIVATE_KEY`` you give.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_runtime.errors import PackError  # noqa: E402
from device_runtime.keys import key_id  # noqa: E402
from device_runtime.pack import read_pack, seal  # noqa: E402
from device_runtime.pack.codec import pack_canonical  # noqa: E402

NOW = None  # set in main: a fixed clock, so expiry is judged the same way in every run
HOSTILE = [
    0, -1, 1, 2, 3, 2**31, 2**32 + 1, 2**63 - 1, 2**64 - 1, -2**63, True, False, None,
    1e300, -1e300, 3e38, -3e38, 5e-324, 1e-300, 1e-45, float("nan"), float("inf"), -float("inf"),
    0.5, 32.9, -0.0, "", "x" * 5000, "\x1b[31mred", "a\nb", "..", "../../evil", "/etc", "32",
    "\u202egnp.exe", [], {}, [1, 2, 3], [2**64 - 1, 0], [0, [2**64 - 1, 0]], b"", b"\0" * 7,
    {"a": 1}, [[[[[[]]]]]], "float32", "float16", "float64", "km", "lora", "bn", "head",
    "kernel", "channel", "auto", "gelu", "relu", "bilinear", "lanczos",
    "2026-11-28T02:10:00Z", "2026-13-40T99:00:00Z", "2026-11-28T02:10:00+00:00", "1999-01-01T00:00:00Z",
    "2099-01-01T00:00:00Z",
]


def seed_packs(private_key) -> dict[str, bytes]:
    """Signed packs of the demo base's real shapes: km fp32/fp16, lora, head-only."""
    import torch

    from device_runtime.pack import build_pack
    from km_edge.methods import MethodConfig, build_task_model
    from km_edge.models import build_base
    from km_edge.pack import task_tensors

    torch.manual_seed(0)
    packs = {}
    preprocess = {"resize": 36, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "interpolation": "bilinear"}
    for name, config in (("km", MethodConfig("km", train_bn=True)), ("lora", MethodConfig("lora")),
                         ("head", MethodConfig("head"))):
        model = build_task_model(build_base("demo", None, input_size=32), 4, config, 0)
        for module in model.modules():
            for tensor in ("w2", "b"):
                if isinstance(getattr(module, tensor, None), torch.nn.Parameter) and hasattr(module, "weight_shape"):
                    torch.nn.init.normal_(getattr(module, tensor), std=0.01)
        body = {"task": f"fuzz-{name}", "pack_version": 3, "created": "2026-11-01T00:00:00Z",
                "expires": "2030-01-01T00:00:00Z", "base_id": "ab" * 32, "labels": ["A", "C", "E", "H"],
                "preprocess": preprocess, "method": name,
                "modulator": config.modulator.to_dict() if name == "km" else None,
                **task_tensors(model, config), "metrics": {"host_val_accuracy": 0.875},
                "trainer": {"epochs": 10, "lr": 0.01, "seed": 0, "activation": "gelu"}}
        packs[f"{name}-fp32"] = build_pack(body, private_key)
        if name == "km":
            packs[f"{name}-fp16"] = build_pack(body, private_key, storage_dtype="float16")
    return packs


# --- mutations --------------------------------------------------------------------------------
def _bytes_mutation(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    data = bytearray(data)
    n = len(data)
    op = rng.randrange(8)
    if op == 0:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == 1:  # interesting bytes
        pos = rng.randrange(n)
        data[pos:pos + 1] = bytes([rng.choice([0x00, 0xff, 0x7f, 0x80, 0xc0, 0xc1, 0xcf, 0xdd, 0xdf, 0xc6])])
    elif op == 2:  # insert
        pos = rng.randrange(n + 1)
        data[pos:pos] = rng.randbytes(rng.randint(1, 16))
    elif op == 3:  # delete a range
        pos = rng.randrange(n)
        del data[pos:pos + rng.randint(1, 64)]
    elif op == 4:  # truncate
        del data[rng.randrange(n):]
    elif op == 5:  # duplicate a range
        pos = rng.randrange(n)
        data[pos:pos] = data[pos:pos + rng.randint(1, 64)]
    elif op == 6:  # splice with another pack
        other = rng.choice(others)
        cut = rng.randrange(min(n, len(other)))
        data = data[:cut] + other[cut:]
    else:  # big-endian length fields: overwrite 4 bytes with a huge count
        pos = rng.randrange(max(1, n - 4))
        data[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"])
    return bytes(data)


def _paths(obj, prefix=()):
    """Every (path, value) in a decoded body, not descending into bin data."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _perturb(rng: random.Random, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, -value, value * 2**rng.randint(1, 40), 0])
    if isinstance(value, float):
        return rng.choice([value * 1e38, value * 1e-320, -value, value + 1.0, math.nextafter(value, math.inf)])
    if isinstance(value, str):
        return rng.choice([value + "\n", value * 3, value[:-1], value.upper(), value + "\x00", value + "é"])
    if isinstance(value, bytes):
        if not value:
            return b"\0"
        data = bytearray(value)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if isinstance(value, list):
        return value + value[:1] if value else [0]
    return value


def _structure_mutation(rng: random.Random, body: dict):
    """Mutate one node of a decoded body; returns (new body, encoding) where encoding may add a
    duplicate key or a non-canonical encoding."""
    body = msgpack.unpackb(msgpack.packb(body, use_bin_type=True), raw=False)  # deep copy
    path, value = rng.choice(list(_paths(body))[1:])
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    op = rng.randrange(6)
    if op == 0:
        parent[last] = rng.choice(HOSTILE)
    elif op == 1:
        parent[last] = _perturb(rng, value)
    elif op == 2:
        del parent[last]
    elif op == 3 and isinstance(parent, dict):
        parent[rng.choice(["extra", "Task", "format_version ", "\x00"])] = rng.choice(HOSTILE)
    elif op == 3:
        parent.insert(rng.randrange(len(parent) + 1), rng.choice(HOSTILE))
    elif op == 4 and isinstance(value, (list, dict)) and value:
        parent[last] = list(value.values()) if isinstance(value, dict) else {str(i): v for i, v in enumerate(value)}
    else:
        parent[last] = _perturb(rng, value)
    encoding = rng.choices(["canonical", "duplicate-key", "single-float"], weights=[8, 1, 1])[0]
    return body, encoding


def _encode(rng: random.Random, body, encoding: str) -> bytes:
    if encoding == "single-float":
        return msgpack.packb(body, use_bin_type=True, use_single_float=True)
    if encoding == "duplicate-key" and isinstance(body, dict) and body:
        dup = rng.choice(list(body))
        packer = msgpack.Packer(use_bin_type=True)
        out = packer.pack_map_header(len(body) + 1)
        for k, v in body.items():
            out += packer.pack(k) + packer.pack(v)
        return out + packer.pack(dup) + packer.pack(rng.choice(HOSTILE))
    return msgpack.packb(body, use_bin_type=True)


def make_case(rng: random.Random, packs: list[bytes], private_key):
    """(kind, bytes) of one fuzz case (a mutation msgpack itself cannot encode is drawn again)."""
    while True:
        try:
            kind, data = _make_case(rng, packs, private_key)
        except (OverflowError, ValueError, TypeError):
            continue
        if data not in packs:  # a mutation that changed nothing is not a case
            return kind, data


def _make_case(rng: random.Random, packs: list[bytes], private_key):
    data = rng.choice(packs)
    kind = rng.choices(["bytes", "signed-bytes", "structure", "envelope"], weights=[3, 2, 6, 1])[0]
    if kind == "bytes":
        return kind, _bytes_mutation(rng, data, packs)
    envelope = msgpack.unpackb(data, raw=False)
    if kind == "signed-bytes":  # arbitrary payload bytes, validly signed
        return kind, seal(_bytes_mutation(rng, envelope["payload"], [envelope["payload"]]), private_key)
    if kind == "structure":
        body, encoding = _structure_mutation(rng, msgpack.unpackb(envelope["payload"], raw=False))
        return f"structure/{encoding}", seal(_encode(rng, body, encoding), private_key)
    mutated, encoding = _structure_mutation(rng, envelope)
    return f"envelope/{encoding}", _encode(rng, mutated, encoding)


def judge(data: bytes, trusted: dict, private_key) -> tuple[str, str]:
    """("refused", error class) | ("accepted", "identical") | ("unclean", reason)."""
    try:
        pack = read_pack(data, trusted, now=NOW)
    except PackError as exc:
        message = str(exc)
        if "\n" in message or not message.startswith("pack: "):
            return "unclean", f"refusal not one line: {message[:200]!r}"
        return "refused", type(exc).__name__
    except Exception as exc:  # the point of the fuzzer: nothing else may escape
        return "unclean", f"{type(exc).__name__}: {str(exc)[:200]}"
    if seal(pack_canonical(pack.to_msgpack()), private_key) != data:
        return "unclean", "accepted but does not re-encode to the same bytes"
    return "accepted", "identical"


def run(cases: int, seed: int, packs: list[bytes], private_key, progress: bool = False) -> dict:
    trusted = {key_id(private_key): private_key.public_key()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts: Counter = Counter()
    by_kind: Counter = Counter()
    unclean = []
    slowest = 0.0
    for i in range(cases):
        rng = random.Random(f"{seed}:{i}")
        kind, data = make_case(rng, packs, private_key)
        start = time.perf_counter()
        outcome, detail = judge(data, trusted, private_key)
        slowest = max(slowest, time.perf_counter() - start)
        counts[f"{outcome}/{detail}" if outcome != "unclean" else "unclean"] += 1
        by_kind[f"{kind.split('/')[0]}/{outcome}"] += 1
        if outcome == "unclean" and len(unclean) < 50:
            unclean.append({"case": i, "kind": kind, "reason": detail})
        if progress and (i + 1) % 5000 == 0:
            print(f"{i + 1} cases, {counts['unclean']} unclean", file=sys.stderr, flush=True)
    return {
        "cases": cases,
        "seed": seed,
        "outcomes": dict(sorted(counts.items())),
        "by_kind": dict(sorted(by_kind.items())),
        "clean": cases - counts["unclean"],
        "unclean": counts["unclean"],
        "unclean_examples": unclean,
        "slowest_case_s": round(slowest, 4),
        "max_rss_mib_before": round(rss_before / 1024, 1),  # torch and the seed packs
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv=None) -> int:
    global NOW
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pack", action="append", default=[], help="a real pack to mutate too (with --key)")
    parser.add_argument("--key", help="private key that signed the --pack files (re-signs mutations)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)
    private_key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: replayable cases
    packs = list(seed_packs(private_key).values())
    if args.pack:
        from device_runtime.keys import load_private_key

        if not args.key:
            parser.error("--pack needs --key (mutations are re-signed with it)")
        private_key = load_private_key(args.key)
        packs = [Path(p).read_bytes() for p in args.pack]
    start = time.perf_counter()
    report = run(args.cases, args.seed, packs, private_key, progress=True)
    report.update(seed_packs=len(packs), pack_bytes=[len(p) for p in packs],
                  seconds=round(time.perf_counter() - start, 1),
                  command="nice -n 19 python benchmarks/fuzz_packs.py " + " ".join(argv or sys.argv[1:]))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0 if report["unclean"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
