"""Judge the arm64 run against the x86 run of device_check.py; exit 1 on any difference.

Each side must pass the device's promises on its own (good packs verified, inspected, run and
evaluated; every refusal exit 2 with one ``km-edge: error:`` line, no traceback, a PackError
subclass naming the reason), and arm64 must equal x86: the same tampered bytes refused with the
same exit code, message and error class; the same verify / inspect output; logits within 1e-4;
predictions and accuracy equal except on images whose x86 top-1/top-2 logit margin is within twice
the largest logit difference (a near tie may go either way on another CPU). On each side the
compiled rebuild kernel must be the engine (so the cross-compiled aarch64 kernel is what arm64
ran) and within 1e-6 of the definition and of numpy in every rebuild case device_check recorded.

Before trusting a pass it checks itself: deliberately broken copies of the arm64 result (a logit
moved by 2e-4, a tampered pack accepted, another refusal message, other tampered bytes, torch
installed, an x86 machine, kernels rebuilt by numpy, a compiled rebuild 1e-3 off, a rebuild case
missing) must each be reported.

Usage: python compare.py X86_JSON ARM64_JSON ARM64_SITE
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np

from device_check import NATIVE_DIFFS, TASK, UNKNOWN_FORMAT_VERSION, rebuild_cases

LOGIT_ATOL = 1e-4
PROBABILITY_ATOL = 1e-4
NATIVE_ATOL = 1e-6  # compiled rebuild against the definition and numpy: float32 rounding only

# words each refusal's one line must contain (the reason, not just "error")
REASONS = {
    "flip-start": ["not a km-edge pack"],
    "flip-payload-middle": ["signature"],
    "flip-signature": ["signature"],
    "flip-end": ["signature"],
    "truncated": ["truncated"],
    "empty": ["empty"],
    "not-a-pack": ["not a km-edge pack"],
    "unknown-format": [f"format version {UNKNOWN_FORMAT_VERSION}"],
    "untrusted-signer": ["not trusted"],
    "untrusted-key": ["not trusted"],
    "w1-shape": ["shape", "w1"],
    "head-features": ["head", "shape"],
    "other-base": ["made for base"],
    "missing-file": ["no such file"],
}


def _json_out(entry: dict):
    try:
        return json.loads(entry["stdout"])
    except (ValueError, KeyError):
        return None


def check_side(name: str, r: dict) -> list[str]:
    """The device's promises on one machine."""
    bad: list[str] = []
    cli = r["cli"]
    n_images = len(r["images"])
    for key in ("verify", "verify-fp16", "inspect", "inspect-text", "run", "eval", "eval-fp16"):
        if cli[key]["exit_code"] != 0:
            bad.append(f"{name}: {key} exit {cli[key]['exit_code']}: {cli[key]['stderr'].strip()[:200]}")
    if bad:
        return bad
    for key in ("verify", "verify-fp16"):
        report = _json_out(cli[key])
        if not (report and report.get("ok") is True and report.get("base_checked") is True):
            bad.append(f"{name}: {key} did not report ok with the base checked: {cli[key]['stdout'][:200]}")
    inspected = _json_out(cli["inspect"]) or {}
    if inspected.get("task") != TASK or TASK not in cli["inspect-text"]["stdout"]:
        bad.append(f"{name}: inspect does not show the {TASK} pack")
    ran = _json_out(cli["run"]) or {}
    predictions = ran.get("predictions", [])
    if len(predictions) != 3 or any(len(p.get("top", [])) != 3 for p in predictions):
        bad.append(f"{name}: run --top-k 3 on 3 images gave {predictions!r:.200}")
    for key in ("eval", "eval-fp16"):
        evaluated = _json_out(cli[key]) or {}
        if evaluated.get("n_images") != n_images:
            bad.append(f"{name}: {key} counted {evaluated.get('n_images')} images, the folder has {n_images}")

    from device_runtime import errors

    if set(r["refusals"]) != set(REASONS):
        bad.append(f"{name}: refusal cases {sorted(r['refusals'])} are not {sorted(REASONS)}")
    for case, outcome in r["refusals"].items():
        for command in ("run", "verify"):
            got = outcome[command]
            lines = got["stderr"].strip().splitlines()
            where = f"{name}: {case}: {command}"
            if got["exit_code"] != 2:
                bad.append(f"{where}: exit {got['exit_code']}, not 2 ({got['stderr'].strip()[:160]})")
            elif len(lines) != 1 or not lines[0].startswith("km-edge: error: ") or "Traceback" in got["stderr"]:
                bad.append(f"{where}: not one 'km-edge: error:' line: {got['stderr'][:200]!r}")
            elif got["stdout"].strip():
                bad.append(f"{where}: printed on stdout although refused: {got['stdout'][:120]!r}")
            else:
                missing = [w for w in REASONS.get(case, []) if w.lower() not in lines[0].lower()]
                if missing:
                    bad.append(f"{where}: the reason {missing} is not named in: {lines[0]}")
        as_json = _json_out(outcome["verify-json"])
        if outcome["verify-json"]["exit_code"] != 2 or not as_json or as_json.get("exit_code") != 2 \
                or set(as_json) != {"error", "exit_code"}:
            bad.append(f"{name}: {case}: verify --json is not exit 2 with an error object only")
        cls = getattr(errors, outcome["class"], None)
        if not (isinstance(cls, type) and issubclass(cls, errors.PackError)):
            bad.append(f"{name}: {case}: the Runtime API gave {outcome['class']}, not a PackError")
    return bad + check_rebuild(name, r.get("rebuild") or {})


def check_rebuild(name: str, rebuild: dict) -> list[str]:
    """The compiled kernel rebuilt the kernels on this machine, within NATIVE_ATOL of the
    definition and of numpy in every case."""
    if rebuild.get("engine") != "native":  # then nothing native was measured: one line says why
        return [f"{name}: kernels are rebuilt by {rebuild.get('engine')!r}, not the compiled kernel "
                f"({rebuild.get('reason')})"]
    bad: list[str] = []
    cases = rebuild.get("cases") or {}
    expected = [case for _, _, case in rebuild_cases()]
    if sorted(cases) != sorted(expected):
        bad.append(f"{name}: rebuild cases {sorted(cases)} are not {sorted(expected)}")
    for case, diffs in cases.items():
        for key in NATIVE_DIFFS:
            value = diffs.get(key)
            if value is None or not value <= NATIVE_ATOL:  # also catches NaN
                shown = "not measured" if value is None else f"{value:.3g} > {NATIVE_ATOL:g}"
                bad.append(f"{name}: rebuild {case}: max |{key.replace('_vs_', ' - ')}| {shown}")
    return bad


def _largest_native_difference(r: dict, against: str) -> float:
    return max(diffs[key] for diffs in r["rebuild"]["cases"].values()
               for key in NATIVE_DIFFS if key.endswith(against))


def _near_ties(logits: np.ndarray, tolerance: float) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) <= 2 * tolerance


def check_same(x86: dict, arm: dict, arm64_site: str) -> list[str]:
    """arm64 did what x86 did."""
    bad: list[str] = []
    env = arm["environment"]
    if env["machine"] != "aarch64":
        bad.append(f"arm64: the check ran on {env['machine']}, not aarch64")
    if env["torch_installed"]:
        bad.append("arm64: torch is installed in the device install")
    for key in ("km_edge_file", "device_runtime_file"):
        if not env[key].startswith(arm64_site.rstrip("/") + "/"):
            bad.append(f"arm64: {env[key]} is not the plain install in {arm64_site}")

    if x86["images"] != arm["images"]:
        return bad + ["the two sides saw different images"]
    if x86["tampered_sha256"] != arm["tampered_sha256"]:
        differ = sorted(k for k in set(x86["tampered_sha256"]) | set(arm["tampered_sha256"])
                        if x86["tampered_sha256"].get(k) != arm["tampered_sha256"].get(k))
        bad.append(f"packs tampered on arm64 differ from x86's: {differ}")
    for case in sorted(set(x86["refusals"]) | set(arm["refusals"])):
        a, b = x86["refusals"].get(case), arm["refusals"].get(case)
        if a is None or b is None:
            bad.append(f"{case}: ran on one side only")
            continue
        if a["class"] != b["class"]:
            bad.append(f"{case}: x86 raised {a['class']}, arm64 {b['class']}")
        for command in ("run", "verify", "verify-json"):
            for field in ("exit_code", "stderr", "stdout"):
                if a[command][field] != b[command][field]:
                    bad.append(f"{case}: {command} {field} differs: x86 {a[command][field]!r:.160} "
                               f"arm64 {b[command][field]!r:.160}")
    for key in ("verify", "verify-fp16", "inspect", "inspect-text"):
        if x86["cli"][key]["stdout"] != arm["cli"][key]["stdout"]:
            bad.append(f"{key}: output differs between x86 and arm64")

    tolerance = {}
    for dtype in ("fp32", "fp16"):
        a, b = np.asarray(x86["logits"][dtype]), np.asarray(arm["logits"][dtype])
        if a.shape != b.shape or a.ndim != 2 or a.shape[0] != len(x86["images"]):
            bad.append(f"logits {dtype}: shapes x86 {a.shape} arm64 {b.shape}")
            continue
        diff = float(np.abs(a - b).max())
        tolerance[dtype] = diff
        if not diff <= LOGIT_ATOL:
            bad.append(f"logits {dtype}: max |x86 - arm64| = {diff:.3g} > {LOGIT_ATOL}")
        ties = _near_ties(a, diff)
        flipped = (a.argmax(1) != b.argmax(1)) & ~ties
        if flipped.any():
            bad.append(f"logits {dtype}: top-1 differs on {int(flipped.sum())} images with a clear margin")
    if "fp32" in tolerance:
        bad += _check_run_and_eval(x86, arm, np.asarray(x86["logits"]["fp32"]), tolerance)
    return bad


def _check_run_and_eval(x86: dict, arm: dict, logits: np.ndarray, tolerance: dict) -> list[str]:
    bad: list[str] = []
    ran_a, ran_b = _json_out(x86["cli"]["run"]) or {}, _json_out(arm["cli"]["run"]) or {}
    row_of = {path: i for i, path in enumerate(x86["images"])}
    ties = _near_ties(logits, tolerance["fp32"])
    for pa, pb in zip(ran_a.get("predictions", []), ran_b.get("predictions", [])):
        if pa["image"] != pb["image"]:
            bad.append("run: the two sides predicted different images")
            continue
        top_a, top_b = [t["index"] for t in pa["top"]], [t["index"] for t in pb["top"]]
        if top_a[0] != top_b[0] and not ties[row_of[pa["image"]]]:
            bad.append(f"run: {pa['image']}: top-1 x86 {top_a[0]} arm64 {top_b[0]}")
        probs = {t["index"]: t["probability"] for t in pb["top"]}
        for t in pa["top"]:
            if t["index"] in probs and abs(t["probability"] - probs[t["index"]]) > PROBABILITY_ATOL:
                bad.append(f"run: {pa['image']}: probability of {t['label']} differs by more than {PROBABILITY_ATOL}")
    for key, dtype in (("eval", "fp32"), ("eval-fp16", "fp16")):
        ea, eb = _json_out(x86["cli"][key]) or {}, _json_out(arm["cli"][key]) or {}
        n = ea.get("n_images", 0)
        allowed = int(_near_ties(np.asarray(x86["logits"][dtype]), tolerance.get(dtype, 0.0)).sum())
        differ = abs(round(ea.get("accuracy", -1) * n) - round(eb.get("accuracy", -2) * n))
        if eb.get("n_images") != n or differ > allowed:
            bad.append(f"{key}: x86 {ea.get('accuracy')} arm64 {eb.get('accuracy')} on {n} images "
                       f"({differ} images apart, {allowed} near ties)")
    return bad


def judge(x86: dict, arm: dict, arm64_site: str) -> list[str]:
    return check_side("x86", x86) + check_side("arm64", arm) + check_same(x86, arm, arm64_site)


def broken_copies(arm: dict) -> dict[str, dict]:
    """Deliberately wrong arm64 results the judge must catch."""
    out = {}

    def variant(name: str, change) -> None:
        broken = copy.deepcopy(arm)
        change(broken)
        out[name] = broken

    def move_logit(r):
        r["logits"]["fp32"][0][0] += 2 * LOGIT_ATOL

    def accept_tampered(r):
        r["refusals"]["flip-payload-middle"]["run"].update(exit_code=0, stderr="")

    def other_message(r):
        r["refusals"]["truncated"]["verify"]["stderr"] = "km-edge: error: truncated.kmp: signature does not match\n"

    def other_class(r):
        r["refusals"]["w1-shape"]["class"] = "BadSignatureError"

    def other_bytes(r):
        r["tampered_sha256"]["flip-end"] = "0" * 64

    def with_torch(r):
        r["environment"]["torch_installed"] = True

    def on_x86(r):
        r["environment"]["machine"] = "x86_64"

    def numpy_rebuild(r):  # what device_check records where the kernel does not load
        r["rebuild"].update(engine="numpy", library=None, reason="not built")
        for diffs in r["rebuild"]["cases"].values():
            diffs.update(dict.fromkeys(NATIVE_DIFFS))

    def native_off(r):
        case = sorted(r["rebuild"]["cases"])[-1]
        r["rebuild"]["cases"][case]["native_rows_vs_definition"] = 1e-3

    def case_missing(r):
        del r["rebuild"]["cases"][sorted(r["rebuild"]["cases"])[0]]

    for name, change in [("logit moved by 2e-4", move_logit), ("tampered pack accepted", accept_tampered),
                         ("another refusal message", other_message), ("another error class", other_class),
                         ("other tampered bytes", other_bytes), ("torch installed", with_torch),
                         ("ran on x86", on_x86), ("kernels rebuilt by numpy", numpy_rebuild),
                         ("compiled rebuild 1e-3 off", native_off), ("a rebuild case missing", case_missing)]:
        variant(name, change)
    return out


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: compare.py X86_JSON ARM64_JSON ARM64_SITE")
    with open(sys.argv[1]) as a, open(sys.argv[2]) as b:
        x86, arm = json.load(a), json.load(b)
    site = sys.argv[3]

    missed = [name for name, broken in broken_copies(arm).items() if not judge(x86, broken, site)]
    if missed:
        sys.exit(f"arm64 compare: the judge let deliberately broken arm64 results pass: {missed}")

    bad = judge(x86, arm, site)
    if bad:
        for line in bad:
            print(f"  FAIL {line}", file=sys.stderr)
        sys.exit(f"arm64 compare: {len(bad)} difference(s) between arm64 and x86 (above)")

    diff32 = float(np.abs(np.asarray(x86["logits"]["fp32"]) - np.asarray(arm["logits"]["fp32"])).max())
    diff16 = float(np.abs(np.asarray(x86["logits"]["fp16"]) - np.asarray(arm["logits"]["fp16"])).max())
    acc = {side: (_json_out(r["cli"]["eval"]) or {}).get("accuracy") for side, r in (("x86", x86), ("arm64", arm))}
    env = arm["environment"]
    rebuild = "; ".join(
        f"{side} {r['rebuild']['library']}: max |native - definition| "
        f"{_largest_native_difference(r, 'definition'):.2g}, |native - numpy| "
        f"{_largest_native_difference(r, 'numpy'):.2g}" for side, r in (("x86", x86), ("arm64", arm)))
    print(f"arm64 ({env['machine']}, Python {env['python']}, numpy {env['numpy']}, onnxruntime "
          f"{env['onnxruntime']}, no torch) = x86: verify, inspect, run, eval; "
          f"{len(arm['refusals'])} refusal cases x (run, verify, verify --json, API) identical; "
          f"max |logit diff| fp32 {diff32:.2g}, fp16 {diff16:.2g} on {len(arm['images'])} images; "
          f"eval accuracy x86 {acc['x86']:.4f} arm64 {acc['arm64']:.4f}; "
          f"compiled rebuild kernel in use on both, {len(rebuild_cases())} rebuild cases ({rebuild}); "
          f"{len(broken_copies(arm))} deliberately broken arm64 results all caught; "
          f"device checks took {x86['seconds']} s on x86, {arm['seconds']} s emulated")


if __name__ == "__main__":
    main()
