#!/usr/bin/env python
"""Few-shot benchmark: meta-learned KM against the usual few-shot baselines on unseen scripts.

Data: glyphs rendered from the DejaVu fonts (benchmarks/glyph_source.py): meta-training on Latin
and Cyrillic characters, learning rates chosen on validation episodes from held-out Latin/Cyrillic
characters, test episodes from Armenian, Georgian, Hebrew and Arabic characters (disjoint classes,
and no glyph is an ImageNet class). Base: the real ImageNet EfficientNet-Lite0 (frozen).

Methods (every trained one gets the same number of inner steps on the support set, full batch,
Adam, and starts its head at the support set's class means, so step 0 of each is the prototype
classifier):
  proto    nearest class mean on frozen base features (Prototypical-network classifier, no training)
  linear   linear probe: the head only, on frozen features
  km0      KM from zero init (modulators + head)
  kmmeta   KM from the Reptile meta-init (``km_edge.meta``, what ``km-edge meta-train`` writes)
  lora0    LoRA (rank 2) on every conv from zero init + head
First-order MAML of the last blocks is not implemented yet.

Episodes are drawn from a seed per (shots, episode index), so a run can stop and resume where it
was (``--episodes`` is the target count; the state file keeps every episode's accuracies).

    nice -n 19 python benchmarks/fewshot.py --episodes 600          # the full benchmark
    nice -n 19 python benchmarks/fewshot.py --episodes 30 --pilot   # a small, labelled pilot
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from device_runtime.files import write_atomic  # noqa: E402
from km_edge.meta import (  # noqa: E402
    accuracy, adapt, check_episode_source, group_by_class, modulator_state, prototype_head, prototype_weights, reptile,
    sample_episode)
from km_edge.methods import MethodConfig, prepare_model  # noqa: E402
from km_edge.models import TaskModel, build_base  # noqa: E402

import glyph_source  # noqa: E402

ALL_METHODS = ("proto", "linear", "km0", "kmmeta", "lora0")
TRAINED = {"linear": "head", "km0": "km", "kmmeta": "km", "lora0": "lora"}
# Learning-rate grids searched on validation episodes: (body lr, head lr) pairs.
LR_GRID = {
    "linear": [(0.0, 3e-3), (0.0, 1e-2), (0.0, 3e-2)],
    "km0": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
    "kmmeta": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
    "lora0": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
}
META_INNER_LR, META_HEAD_LR = 3e-3, 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=600, help="test episodes per shot setting (target count)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", type=int, default=10, help="query images per class in a test episode")
    p.add_argument("--inner-steps", type=int, default=10, help="adaptation steps, equal for every method")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--meta-episodes", type=int, default=2000, help="Reptile episodes (meta-training)")
    p.add_argument("--meta-shots", type=int, default=5)
    p.add_argument("--meta-queries", type=int, default=5, help="query images per class in a meta-training episode")
    p.add_argument("--val-episodes", type=int, default=50, help="validation episodes per lr candidate")
    p.add_argument("--per-class", type=int, default=16, help="rendered images per character")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--arch", default="efficientnet_lite0", help="base architecture (frozen)")
    p.add_argument("--weights", default="imagenet", help="base weights (none: random, for smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot", action="store_true", help="label the results as a pilot (too few episodes)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "fewshot")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fewshot")
    return p.parse_args(argv)


# --- data ----------------------------------------------------------------------------------------
def to_input(images: np.ndarray, preprocess: dict) -> torch.Tensor:
    """uint8 grey glyphs -> normalised 3-channel tensors at the base's crop size."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != preprocess["crop"]:
        x = torch.nn.functional.interpolate(x, size=preprocess["crop"], mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def episode_tensors(split, episode, preprocess):
    s_idx, s_lab = zip(*episode.support)
    q_idx, q_lab = zip(*episode.query)
    return (to_input(split.images[list(s_idx)], preprocess), torch.tensor(s_lab),
            to_input(split.images[list(q_idx)], preprocess), torch.tensor(q_lab))


# --- methods -------------------------------------------------------------------------------------
class Methods:
    """One model per method on its own copy of the frozen backbone, reset before every episode."""

    def __init__(self, base, ways: int, names: list[str], meta_init: dict | None, seed: int):
        self.base, self.ways, self.models, self.starts, self.configs = base, ways, {}, {}, {}
        torch.manual_seed(seed)
        self.frozen = TaskModel(copy.deepcopy(base.backbone), base.feature_size, ways).eval()
        for name in names:
            if name not in TRAINED:
                continue
            config = MethodConfig(method=TRAINED[name], train_bn=False, lora_rank=2)
            model = TaskModel(copy.deepcopy(base.backbone), base.feature_size, ways)
            prepare_model(model, config)
            if name == "kmmeta":
                loaded = model.load_state_dict(meta_init, strict=False)
                if loaded.unexpected_keys or set(meta_init) - set(model.state_dict()):
                    raise SystemExit(f"meta-init does not fit the KM model: {loaded.unexpected_keys[:3]}")
            self.models[name], self.configs[name] = model, config
            self.starts[name] = {k: v.detach().clone() for k, v in model.state_dict().items()
                                 if not k.endswith(".original") and not k.startswith("head.")
                                 and ".parametrizations." in k}

    def reset(self, name: str) -> None:
        self.models[name].load_state_dict(self.starts[name], strict=False)

    def run(self, name: str, sx, sy, qx, qy, steps: int, lr: float, head_lr: float, features=None) -> float:
        if name == "proto":
            prototype_head(self.frozen, sx, sy, self.ways)
            return accuracy(self.frozen, qx, qy)
        if name == "linear":  # head on cached frozen features: the same steps, no backbone passes
            return linear_probe(self.frozen, features, sy, qy, self.ways, steps, head_lr)
        self.reset(name)
        adapt(self.models[name], self.configs[name], sx, sy, self.ways, steps, lr, head_lr)
        return accuracy(self.models[name], qx, qy)


def linear_probe(frozen: TaskModel, features, sy, qy, ways: int, steps: int, head_lr: float) -> float:
    support_f, query_f = features
    head = torch.nn.Linear(support_f.shape[1], ways)
    with torch.no_grad():
        weight, bias = prototype_weights(support_f, sy, ways)
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=head_lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(support_f), sy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((head(query_f).argmax(1) == qy).float().mean())


def frozen_features(methods: Methods, sx, qx):
    with torch.no_grad():
        return methods.frozen.backbone(sx), methods.frozen.backbone(qx)


# --- state ---------------------------------------------------------------------------------------
def load_state(path: Path, settings: dict) -> dict:
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("settings") == settings:
            return state
        print(f"{path}: settings changed; starting over", file=sys.stderr)
    return {"settings": settings, "lr": {}, "episodes": {}, "seconds": {}}


def save_state(path: Path, state: dict) -> None:
    write_atomic(path, json.dumps(state, indent=1).encode())


def ci95(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


# --- the run -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    unknown = set(names) - set(ALL_METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {ALL_METHODS}")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    data_path = args.work / f"glyphs-{args.per_class}-{args.seed}.npz"
    if data_path.exists():
        data = np.load(data_path, allow_pickle=False)
        splits = {n: glyph_source.GlyphSplit(data[f"{n}_images"], data[f"{n}_labels"].tolist(),
                                             data[f"{n}_classes"].tolist()) for n in ("meta", "val", "test")}
    else:
        splits = glyph_source.build_splits(args.per_class, args.seed)
        arrays = {}
        for n, s in splits.items():
            arrays.update({f"{n}_images": s.images, f"{n}_labels": np.array(s.labels),
                           f"{n}_classes": np.array(s.classes)})
        np.savez(data_path, **arrays)
    source = glyph_source.describe(splits)
    groups = {n: group_by_class(s.labels) for n, s in splits.items()}

    torch.manual_seed(args.seed)  # `--weights none` draws the same random base on every resume
    base = build_base(args.arch, args.weights, input_size=args.input_size)
    fingerprint = base.fingerprint()
    preprocess = base.preprocess
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("episodes", "pilot", "work", "out", "threads", "methods", "arch", "weights")}
    settings["base_fingerprint"] = fingerprint  # binds the base (arch and weights) to the state
    state_path = args.work / "state.json"
    state = load_state(state_path, settings)

    # meta-training (cached next to the state; bound to the base and the settings)
    meta_init = None
    if "kmmeta" in names:
        meta_path = args.work / "meta-init.pt"
        cached = torch.load(meta_path, weights_only=True) if meta_path.exists() else None
        if cached is not None and cached.get("settings") == settings:
            meta_init, state["meta_train"] = cached["tensors"], cached["record"]
        else:
            config = MethodConfig(method="km", train_bn=False)
            torch.manual_seed(args.seed)
            model = TaskModel(copy.deepcopy(base.backbone), base.feature_size, args.ways)
            prepare_model(model, config)
            images = to_input(splits["meta"].images, preprocess)
            record = reptile(model, config, images, splits["meta"].labels, ways=args.ways, shots=args.meta_shots,
                             queries=args.meta_queries, episodes=args.meta_episodes, inner_steps=args.inner_steps, lr=META_INNER_LR,
                             head_lr=META_HEAD_LR, meta_lr=1.0, seed=args.seed, progress=True)
            del images
            meta_init = modulator_state(model)
            buffer = __import__("io").BytesIO()
            torch.save({"settings": settings, "tensors": meta_init, "record": record}, buffer)
            write_atomic(meta_path, buffer.getvalue())
            state["meta_train"] = record
        save_state(state_path, state)

    methods = Methods(base, args.ways, names, meta_init, args.seed)
    test_classes = check_episode_source(groups["test"], args.ways, max(args.shots), args.queries, "test glyphs")
    val_classes = check_episode_source(groups["val"], args.ways, max(args.shots), args.queries, "val glyphs")

    for shots in args.shots:
        # learning rates on validation episodes (held-out meta-train classes), per method and shots
        for name in names:
            key = f"{name}/{shots}"
            if name not in LR_GRID or key in state["lr"]:
                continue
            scores = []
            for lr, head_lr in LR_GRID[name]:
                accs = []
                for i in range(args.val_episodes):
                    rng = np.random.default_rng([args.seed, 1, shots, i])
                    ep = sample_episode(groups["val"], val_classes, args.ways, shots, args.queries, rng)
                    sx, sy, qx, qy = episode_tensors(splits["val"], ep, preprocess)
                    feats = frozen_features(methods, sx, qx) if name == "linear" else None
                    accs.append(methods.run(name, sx, sy, qx, qy, args.inner_steps, lr, head_lr, feats))
                scores.append({"lr": lr, "head_lr": head_lr, "val_accuracy": float(np.mean(accs))})
                print(f"val {key} lr={lr:g} head_lr={head_lr:g}: {np.mean(accs):.3f}", file=sys.stderr)
            best = max(scores, key=lambda s: s["val_accuracy"])  # first best wins
            state["lr"][key] = {"chosen": best, "grid": scores}
            save_state(state_path, state)

        # test episodes (resumable)
        for name in names:
            state["episodes"].setdefault(f"{name}/{shots}", [])
            state["seconds"].setdefault(f"{name}/{shots}", [])
        done = min(len(state["episodes"][f"{n}/{shots}"]) for n in names)
        for i in range(done, args.episodes):
            rng = np.random.default_rng([args.seed, 2, shots, i])
            ep = sample_episode(groups["test"], test_classes, args.ways, shots, args.queries, rng)
            sx, sy, qx, qy = episode_tensors(splits["test"], ep, preprocess)
            started = time.perf_counter()
            feats = frozen_features(methods, sx, qx)
            feature_seconds = time.perf_counter() - started
            for name in names:
                key = f"{name}/{shots}"
                if len(state["episodes"][key]) > i:
                    continue
                chosen = state["lr"].get(key, {}).get("chosen", {"lr": 0.0, "head_lr": 0.0})
                started = time.perf_counter()
                acc = methods.run(name, sx, sy, qx, qy, args.inner_steps, chosen["lr"], chosen["head_lr"], feats)
                seconds = time.perf_counter() - started + (feature_seconds if name == "linear" else 0.0)
                state["episodes"][key].append(acc)
                state["seconds"][key].append(seconds)
            save_state(state_path, state)
            write_results(args, state, source, names, methods)  # a stopped run still leaves its results
            line = " ".join(f"{n}={np.mean(state['episodes'][f'{n}/{shots}']):.3f}" for n in names)
            print(f"{shots}-shot episode {i + 1}/{args.episodes}: {line}", file=sys.stderr)

    write_results(args, state, source, names, methods)
    return 0


def km_pack_params(methods: Methods) -> int:
    model = methods.models.get("km0") or methods.models.get("kmmeta")
    if model is None:
        return 0
    return sum(v.numel() for k, v in modulator_state(model).items() if not k.endswith(".scale"))


def write_results(args, state: dict, source: dict, names: list[str], methods: Methods) -> None:
    rows = []
    for shots in args.shots:
        for name in names:
            key = f"{name}/{shots}"
            accs, secs = state["episodes"].get(key, []), state["seconds"].get(key, [])
            if not accs:
                continue
            rows.append({"method": name, "ways": args.ways, "shots": shots, "episodes": len(accs),
                         "accuracy": float(np.mean(accs)), "ci95": ci95(accs),
                         "lr": state["lr"].get(key, {}).get("chosen"),
                         "seconds_per_episode_median": float(np.median(secs)),
                         "seconds_per_episode_min": float(np.min(secs))})
    result = {
        "label": "PILOT (too few episodes for conclusions)" if args.pilot else "benchmark",
        "settings": state["settings"], "source": source, "rows": rows,
        "meta_train": {k: v for k, v in (state.get("meta_train") or {}).items() if k != "history"} or None,
        "meta_train_history": (state.get("meta_train") or {}).get("history"),
        "lr_selection": state["lr"], "km_modulator_params": km_pack_params(methods),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": args.threads, "cpus": os.cpu_count()},
    }
    lines = [f"# Few-shot benchmark ({result['label']})", "",
             f"{args.ways}-way episodes on glyphs of unseen scripts ({', '.join(source['test_scripts'])}; "
             f"{source['test_classes']} classes) from the DejaVu fonts; base: {args.arch} (weights {args.weights}) at "
             f"{args.input_size} px, frozen; {args.inner_steps} inner steps for every trained method; "
             f"{args.queries} queries per class; 95 % CI = 1.96 sd / sqrt(episodes). Learning rates chosen on "
             f"{args.val_episodes} validation episode(s) per candidate; Reptile meta-init from "
             f"{args.meta_episodes} episodes.", "",
             "| shots | method | episodes | accuracy | 95 % CI | lr (body, head) | s/episode (median, min) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['lr']['lr']:g}, {r['lr']['head_lr']:g}" if r["lr"] else "-"
        lines.append(f"| {r['shots']} | {r['method']} | {r['episodes']} | {r['accuracy']:.3f} | ±{r['ci95']:.3f} | "
                     f"{lr} | {r['seconds_per_episode_median']:.2f}, {r['seconds_per_episode_min']:.2f} |")
    meta = result["meta_train"]
    if meta:
        lines += ["", f"Meta-training (Reptile, {meta['episodes']} episodes, {args.meta_shots}-shot, on "
                      f"{meta['source_classes']} Latin/Cyrillic characters): {meta['seconds']:.0f} s, "
                      f"{meta['seconds_per_episode']:.2f} s/episode."]
    lines += ["", f"KM task tensors: {result['km_modulator_params']} modulator parameters "
                  f"(+ head {args.ways}x1281). Timings: {args.threads} torch thread(s) on a shared machine "
                  f"({os.cpu_count()} CPUs), under `nice -n 19`; per-episode seconds include adaptation "
                  "and query evaluation."]
    paired = paired_differences(args.shots, names, state)
    result["paired_differences"] = paired
    if paired:
        lines += ["", "Paired differences on the same episodes (method minus baseline, 95 % CI):", "",
                  "| shots | method | baseline | episodes | difference | 95 % CI |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['shots']} | {d['method']} | {d['baseline']} | {d['episodes']} | {d['difference']:+.3f} | "
                  f"±{d['ci95']:.3f} |" for d in paired]
    projection = project_full_run(rows, result["meta_train"])
    result["projected_full_run_hours"] = projection
    if projection:
        lines += ["", f"Projected cost of the full run at these measured per-episode medians (600 test episodes and "
                      f"50 validation episodes per lr candidate for each measured method and shot count, "
                      f"{FULL_META_EPISODES} Reptile episodes): about {projection:.1f} CPU hours on this machine."]
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=1, allow_nan=True).encode())
    write_atomic(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


def paired_differences(shots_list, names, state) -> list[dict]:
    """Every trained method against the prototype and linear-probe baselines, episode by episode."""
    out = []
    for shots in shots_list:
        for baseline in ("proto", "linear"):
            if baseline not in names:
                continue
            for name in names:
                if name in ("proto", baseline):
                    continue
                a, b = state["episodes"].get(f"{name}/{shots}", []), state["episodes"].get(f"{baseline}/{shots}", [])
                n = min(len(a), len(b))
                if n < 2:
                    continue
                diff = [x - y for x, y in zip(a[:n], b[:n])]
                out.append({"shots": shots, "method": name, "baseline": baseline, "episodes": n,
                            "difference": float(np.mean(diff)), "ci95": ci95(diff)})
    return out


FULL_TEST_EPISODES, FULL_VAL_EPISODES, FULL_META_EPISODES = 600, 50, 2000


def project_full_run(rows: list[dict], meta: dict | None) -> float | None:
    """Hours the full benchmark would take at the measured per-episode medians (methods measured here)."""
    if not rows:
        return None
    seconds = 0.0
    for r in rows:
        candidates = len(LR_GRID.get(r["method"], []))
        seconds += r["seconds_per_episode_median"] * (FULL_TEST_EPISODES + FULL_VAL_EPISODES * candidates)
    if meta:
        seconds += meta["seconds_per_episode"] * FULL_META_EPISODES
    return seconds / 3600


if __name__ == "__main__":
    sys.exit(main())
