#!/usr/bin/env python
"""Few-shot benchmark: meta-learned KM against the usual few-shot baselines on unseen scripts.

Data: glyphs rendered from the DejaVu fonts (benchmarks/glyph_source.py): meta-training on Latin
and Cyrillic characters, learning rates chosen on validation episodes from held-out Latin/Cyrillic
characters, test episodes from Armenian, Georgian, Hebrew and Arabic characters (222 classes of 16
images: enough for 20-way 5-shot episodes with 10 queries per class; 98 validation classes).
Disjoint classes, and no glyph is an ImageNet class. Base: the real ImageNet EfficientNet-Lite0.

Cells: N-way K-shot for N in ``--ways`` (default 5 and 20) and K in ``--shots`` (1 and 5).
Methods (every trained one gets the same number of inner steps on the support set, full batch,
Adam, and starts its head at the support set's class means, so step 0 of each is the prototype
classifier):
  proto    nearest class mean on frozen base features (Prototypical-network classifier, no training)
  linear   linear probe: the head only, on frozen features
  km0      KM from zero init (modulators + head)
  kmmeta   KM from the Reptile meta-init (``km_edge.meta``, what ``km-edge meta-train`` writes)
  lora0    LoRA (rank 2) on every conv from zero init + head
  fomaml   first-order MAML of the base's last blocks (Lite0: ``blocks[6]`` + ``conv_head``; why
           those and not the full base: benchmarks/fomaml.py), tail + head adapted at test time
Both meta-learners (kmmeta, fomaml) train on the same meta-train classes with the same episode
budget (``--meta-episodes`` episodes of ``--meta-ways``-way ``--meta-shots``-shot, ``--inner-steps``
inner steps); their inits do not depend on N (heads start at the class means), so one init serves
every cell.

Runs resume: episodes come from a seed per (ways, shots, episode index), the state file keeps every
episode's accuracy and timing, and test episodes go round-robin over the cells, so a stopped run
has the same number of episodes in every cell. ``--plan`` measures a couple of episodes per cell and
method plus a few meta-training episodes at the given settings and writes the projected CPU-hours of
the full run (fewshot_plan.{json,md}) without touching the state.

Measured plan (``nice -n 19 python benchmarks/fewshot.py --plan``, 96 px, 1 torch thread on 2
cores shared with other jobs, 2026-11-28; benchmarks/results/fewshot_plan.md): the full run (all
six methods, 5- and 20-way, 1 and 5 shots, 600 test episodes per cell, 50 validation episodes per
learning-rate candidate, 2000 meta-training episodes per meta-learner) is about 60 CPU-hours:
8 for Reptile (14 s/episode), 1 for first-order MAML (1.9 s/episode), 51 for the episodes, of which
the 20-way 5-shot cell is 27 (LoRA 54 s, KM 30 s per episode).

    nice -n 19 python benchmarks/fewshot.py --plan                  # timing of the full run
    nice -n 19 python benchmarks/fewshot.py --episodes 600          # the full benchmark
    nice -n 19 python benchmarks/fewshot.py --episodes 30 --pilot   # a small, labelled pilot
"""

from __future__ import annotations

import argparse
import copy
import io
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

import fomaml as fomaml_lib  # noqa: E402
import glyph_source  # noqa: E402

ALL_METHODS = ("proto", "linear", "km0", "kmmeta", "lora0", "fomaml")
TRAINED = {"linear": "head", "km0": "km", "kmmeta": "km", "lora0": "lora"}  # km_edge methods
PACK_METHOD = {"proto": "head", "linear": "head", "km0": "km", "kmmeta": "km", "lora0": "lora"}
# Learning-rate grids searched on validation episodes: (body lr, head lr) pairs.
LR_GRID = {
    "linear": [(0.0, 3e-3), (0.0, 1e-2), (0.0, 3e-2)],
    "km0": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
    "kmmeta": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
    "lora0": [(1e-3, 1e-2), (3e-3, 1e-2), (1e-2, 1e-2)],
    "fomaml": [(1e-4, 1e-2), (3e-4, 1e-2), (1e-3, 1e-2)],
}
META_INNER_LR, META_HEAD_LR = 3e-3, 1e-2  # Reptile's inner rates (KM)
FOMAML_INNER_LR = 3e-4  # first-order MAML's inner rate on the tail weights (head: META_HEAD_LR)
FULL_TEST_EPISODES, FULL_VAL_EPISODES, FULL_META_EPISODES = 600, 50, 2000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=FULL_TEST_EPISODES, help="test episodes per cell (target count)")
    p.add_argument("--ways", type=int, nargs="+", default=[5, 20], help="N of the test cells")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--queries", type=int, default=10, help="query images per class in a test episode")
    p.add_argument("--inner-steps", type=int, default=10, help="adaptation steps, equal for every method")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--meta-episodes", type=int, default=FULL_META_EPISODES,
                   help="meta-training episodes (each learner)")
    p.add_argument("--meta-ways", type=int, default=5)
    p.add_argument("--meta-shots", type=int, default=5)
    p.add_argument("--meta-queries", type=int, default=5, help="query images per class in a meta-training episode")
    p.add_argument("--val-episodes", type=int, default=FULL_VAL_EPISODES, help="validation episodes per lr candidate")
    p.add_argument("--per-class", type=int, default=16, help="rendered images per character")
    p.add_argument("--input-size", type=int, default=96)
    p.add_argument("--arch", default="efficientnet_lite0", help="base architecture (frozen)")
    p.add_argument("--weights", default="imagenet", help="base weights (none: random, for smoke tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pilot", action="store_true", help="label the results as a pilot (too few episodes)")
    p.add_argument("--plan", action="store_true", help="time the full run at these settings and stop")
    p.add_argument("--report-only", action="store_true",
                   help="write the results of the state file (run no new episodes) and stop")
    p.add_argument("--plan-episodes", type=int, default=2, help="--plan: test episodes timed per cell")
    p.add_argument("--plan-meta-episodes", type=int, default=3, help="--plan: meta-training episodes timed")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "fewshot")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fewshot")
    args = p.parse_args(argv)
    for name in ("episodes", "queries", "inner_steps", "meta_episodes", "meta_ways", "meta_shots", "meta_queries",
                 "val_episodes", "per_class", "input_size", "threads", "plan_episodes", "plan_meta_episodes"):
        if getattr(args, name) < (0 if name in ("episodes", "val_episodes") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.ways) < 2 or min(args.shots) < 1:
        p.error("--ways must be at least 2 and --shots at least 1")
    return args


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


def load_splits(args) -> dict:
    data_path = args.work / f"glyphs-{args.per_class}-{args.seed}.npz"
    if data_path.exists():
        data = np.load(data_path, allow_pickle=False)
        return {n: glyph_source.GlyphSplit(data[f"{n}_images"], data[f"{n}_labels"].tolist(),
                                           data[f"{n}_classes"].tolist()) for n in ("meta", "val", "test")}
    splits = glyph_source.build_splits(args.per_class, args.seed)
    arrays = {}
    for n, s in splits.items():
        arrays.update({f"{n}_images": s.images, f"{n}_labels": np.array(s.labels), f"{n}_classes": np.array(s.classes)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(data_path, buffer.getvalue())
    return splits


# --- methods -------------------------------------------------------------------------------------
class Methods:
    """One model per method (for one N) on its own copy of the frozen backbone, reset every episode.

    ``run`` returns (query accuracy, adaptation seconds, total seconds); adaptation covers what a
    device-side trainer would do with the support set (its forward passes and the inner steps),
    total adds the query evaluation.
    """

    def __init__(self, base, ways: int, names: list[str], meta_init: dict | None, tail_init: list | None, seed: int):
        self.base, self.ways, self.models, self.starts, self.configs = base, ways, {}, {}, {}
        torch.manual_seed(seed)
        self.frozen = TaskModel(copy.deepcopy(base.backbone), base.feature_size, ways).eval()
        self.learner = None
        if "fomaml" in names:
            self.learner = fomaml_lib.TailLearner(base.backbone, base.feature_size, ways)
            self.tail_start = tail_init if tail_init is not None else self.learner.get()
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

    def run(self, name: str, sx, sy, qx, qy, steps: int, lr: float, head_lr: float) -> tuple[float, float, float]:
        started = time.perf_counter()
        if name == "proto":
            prototype_head(self.frozen, sx, sy, self.ways)
            adapted = time.perf_counter()
            acc = accuracy(self.frozen, qx, qy)
        elif name == "linear":  # the head on frozen support features: the same steps, no backbone passes
            with torch.no_grad():
                support_f = self.frozen.backbone(sx)
            head = linear_probe(support_f, sy, self.ways, steps, head_lr)
            adapted = time.perf_counter()
            with torch.no_grad():
                acc = float((head(self.frozen.backbone(qx)).argmax(1) == qy).float().mean())
        elif name == "fomaml":
            self.learner.put(self.tail_start)
            self.learner.adapt(self.learner.prefix_features(sx), sy, self.ways, steps, lr, head_lr)
            adapted = time.perf_counter()
            acc = self.learner.accuracy(self.learner.prefix_features(qx), qy)
        else:
            self.models[name].load_state_dict(self.starts[name], strict=False)
            adapt(self.models[name], self.configs[name], sx, sy, self.ways, steps, lr, head_lr)
            adapted = time.perf_counter()
            acc = accuracy(self.models[name], qx, qy)
        done = time.perf_counter()
        return acc, adapted - started, done - started


def linear_probe(support_f, sy, ways: int, steps: int, head_lr: float) -> torch.nn.Linear:
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
    return head


# --- meta-training (both learners, cached next to the state, bound to the base and settings) -----
def meta_train_km(args, base, splits, preprocess, settings, episodes: int, cache: Path | None):
    cached = torch.load(cache, weights_only=True) if cache is not None and cache.exists() else None
    if cached is not None and cached.get("settings") == settings:
        return cached["tensors"], cached["record"]
    config = MethodConfig(method="km", train_bn=False)
    torch.manual_seed(args.seed)
    model = TaskModel(copy.deepcopy(base.backbone), base.feature_size, args.meta_ways)
    prepare_model(model, config)
    images = to_input(splits["meta"].images, preprocess)
    record = reptile(model, config, images, splits["meta"].labels, ways=args.meta_ways, shots=args.meta_shots,
                     queries=args.meta_queries, episodes=episodes, inner_steps=args.inner_steps, lr=META_INNER_LR,
                     head_lr=META_HEAD_LR, meta_lr=1.0, seed=args.seed, progress=not args.plan)
    record["algorithm"] = "reptile"
    tensors = modulator_state(model)
    if cache is not None:
        buffer = io.BytesIO()
        torch.save({"settings": settings, "tensors": tensors, "record": record}, buffer)
        write_atomic(cache, buffer.getvalue())
    return tensors, record


def meta_train_tail(args, base, splits, preprocess, settings, episodes: int, cache: Path | None):
    cached = torch.load(cache, weights_only=True) if cache is not None and cache.exists() else None
    if cached is not None and cached.get("settings") == settings:
        return cached["tensors"], cached["record"]
    torch.manual_seed(args.seed)
    learner = fomaml_lib.TailLearner(base.backbone, base.feature_size, args.meta_ways)
    images = to_input(splits["meta"].images, preprocess)
    record = fomaml_lib.fomaml(learner, images, splits["meta"].labels, ways=args.meta_ways, shots=args.meta_shots,
                               queries=args.meta_queries, episodes=episodes, inner_steps=args.inner_steps,
                               lr=FOMAML_INNER_LR, head_lr=META_HEAD_LR, seed=args.seed, progress=not args.plan)
    tensors = learner.get()
    if cache is not None:
        buffer = io.BytesIO()
        torch.save({"settings": settings, "tensors": tensors, "record": record}, buffer)
        write_atomic(cache, buffer.getvalue())
    return tensors, record


# --- costs ---------------------------------------------------------------------------------------
def pack_bytes(base, ways: int, names: list[str], methods: Methods) -> dict[str, dict]:
    """Bytes of each method's task file at N ``ways``: real signed packs (fp32 and fp16) built by
    device_runtime's writer from the method's tensors; fomaml has no pack format (it changes base
    weights), so its figure is the raw fp32 bytes of the tail it replaces plus the head."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.pack import build_pack
    from km_edge.pack import task_tensors

    key = Ed25519PrivateKey.generate()
    out = {}
    for name in names:
        if name == "fomaml":
            n = methods.learner.n_params() + ways * (base.feature_size + 1)
            out[name] = {"float32": 4 * n, "float16": 2 * n, "kind": "raw tensors (no pack format)"}
            continue
        method = PACK_METHOD[name]
        model = methods.models.get(name)
        if model is None:  # proto and linear ship the same head-only pack
            config = MethodConfig(method="head", train_bn=False)
            model = TaskModel(copy.deepcopy(base.backbone), base.feature_size, ways)
            prepare_model(model, config)
        else:
            config = methods.configs[name]
        body = {"task": "fewshot", "pack_version": 1, "base_id": base.fingerprint(),
                "labels": [f"class{i}" for i in range(ways)], "preprocess": base.preprocess, "method": method,
                "modulator": config.modulator.to_dict() if method == "km" else None, **task_tensors(model, config),
                "metrics": {}, "trainer": {}}
        out[name] = {dtype: len(build_pack(body, key, storage_dtype=dtype)) for dtype in ("float32", "float16")}
        out[name]["kind"] = f"signed pack, method {method}"
    return out


# --- state ---------------------------------------------------------------------------------------
def load_state(path: Path, settings: dict) -> dict:
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("settings") == settings:
            return state
        print(f"{path}: settings changed; starting over", file=sys.stderr)
    return {"settings": settings, "lr": {}, "episodes": {}, "seconds": {}, "adapt_seconds": {}}


def save_state(path: Path, state: dict) -> None:
    write_atomic(path, json.dumps(state, indent=1).encode())


def ci95(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def cell_key(name: str, ways: int, shots: int) -> str:
    return f"{name}/{ways}/{shots}"


def test_episode(args, groups, splits, classes, preprocess, ways, shots, index):
    rng = np.random.default_rng([args.seed, 2, ways, shots, index])
    ep = sample_episode(groups["test"], classes, ways, shots, args.queries, rng)
    return episode_tensors(splits["test"], ep, preprocess)


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
    splits = load_splits(args)
    source = glyph_source.describe(splits)
    groups = {n: group_by_class(s.labels) for n, s in splits.items()}
    test_classes = check_episode_source(groups["test"], max(args.ways), max(args.shots), args.queries, "test glyphs")
    val_classes = check_episode_source(groups["val"], max(args.ways), max(args.shots), args.queries, "val glyphs")

    torch.manual_seed(args.seed)  # `--weights none` draws the same random base on every resume
    base = build_base(args.arch, args.weights, input_size=args.input_size)
    preprocess = base.preprocess
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("episodes", "pilot", "work", "out", "threads", "methods", "arch", "weights", "plan",
                             "plan_episodes", "plan_meta_episodes", "report_only")}
    settings["base_fingerprint"] = base.fingerprint()  # binds the base (arch and weights) to the state
    if args.plan:
        return plan(args, names, base, splits, groups, test_classes, preprocess, settings)
    state_path = args.work / "state.json"
    state = load_state(state_path, settings)
    for key in ("adapt_seconds", "meta"):
        state.setdefault(key, {})

    meta_init = tail_init = None
    if "kmmeta" in names:
        meta_init, state["meta"]["kmmeta"] = meta_train_km(args, base, splits, preprocess, settings,
                                                           args.meta_episodes, args.work / "meta-init.pt")
        save_state(state_path, state)
    if "fomaml" in names:
        tail_init, state["meta"]["fomaml"] = meta_train_tail(args, base, splits, preprocess, settings,
                                                             args.meta_episodes, args.work / "fomaml-init.pt")
        save_state(state_path, state)

    cells = [(ways, shots) for ways in args.ways for shots in args.shots]
    methods = {ways: Methods(base, ways, names, meta_init, tail_init, args.seed) for ways in args.ways}
    costs = {ways: pack_bytes(base, ways, names, methods[ways]) for ways in args.ways}

    # learning rates on validation episodes (held-out meta-train classes), per method and cell
    for ways, shots in cells:
        for name in names:
            key = cell_key(name, ways, shots)
            if name not in LR_GRID or key in state["lr"]:
                continue
            scores = []
            for lr, head_lr in LR_GRID[name]:
                accs = []
                for i in range(args.val_episodes):
                    rng = np.random.default_rng([args.seed, 1, ways, shots, i])
                    ep = sample_episode(groups["val"], val_classes, ways, shots, args.queries, rng)
                    sx, sy, qx, qy = episode_tensors(splits["val"], ep, preprocess)
                    accs.append(methods[ways].run(name, sx, sy, qx, qy, args.inner_steps, lr, head_lr)[0])
                scores.append({"lr": lr, "head_lr": head_lr, "val_accuracy": float(np.mean(accs)) if accs else None})
                print(f"val {key} lr={lr:g} head_lr={head_lr:g}: {scores[-1]['val_accuracy']}", file=sys.stderr)
            best = max(scores, key=lambda s: s["val_accuracy"] or 0.0)  # first best wins
            state["lr"][key] = {"chosen": best, "grid": scores}
            save_state(state_path, state)

    # test episodes, round-robin over the cells (resumable)
    for ways, shots in cells:
        for name in names:
            for table in ("episodes", "seconds", "adapt_seconds"):
                state[table].setdefault(cell_key(name, ways, shots), [])
    done = min(len(state["episodes"][cell_key(n, w, k)]) for w, k in cells for n in names)
    for i in range(done, done if args.report_only else args.episodes):
        for ways, shots in cells:
            sx, sy, qx, qy = test_episode(args, groups, splits, test_classes, preprocess, ways, shots, i)
            for name in names:
                key = cell_key(name, ways, shots)
                if len(state["episodes"][key]) > i:
                    continue
                chosen = state["lr"].get(key, {}).get("chosen", {"lr": 0.0, "head_lr": 0.0})
                acc, adapt_s, total_s = methods[ways].run(name, sx, sy, qx, qy, args.inner_steps, chosen["lr"],
                                                          chosen["head_lr"])
                state["episodes"][key].append(acc)
                state["adapt_seconds"][key].append(adapt_s)
                state["seconds"][key].append(total_s)
        save_state(state_path, state)
        write_results(args, state, source, names, cells, costs)  # a stopped run still leaves its results
        print(f"round {i + 1}/{args.episodes}: " + " ".join(
            f"{n}@{w}w{k}s={np.mean(state['episodes'][cell_key(n, w, k)]):.3f}" for w, k in cells for n in names),
            file=sys.stderr)
    write_results(args, state, source, names, cells, costs)
    return 0


def plan(args, names, base, splits, groups, test_classes, preprocess, settings) -> int:
    """Time a few test episodes per cell and method and a few meta-training episodes; project the
    CPU-hours of the full run (FULL_* episode counts) and write ``<out>_plan.{json,md}``."""
    started = time.perf_counter()
    meta_init = tail_init = None
    meta = {}
    if "kmmeta" in names:
        meta_init, meta["kmmeta"] = meta_train_km(args, base, splits, preprocess, settings, args.plan_meta_episodes,
                                                  None)
    if "fomaml" in names:
        tail_init, meta["fomaml"] = meta_train_tail(args, base, splits, preprocess, settings, args.plan_meta_episodes,
                                                    None)
    rows, total = [], 0.0
    for ways in args.ways:
        methods = Methods(base, ways, names, meta_init, tail_init, args.seed)
        for shots in args.shots:
            timings = {n: [] for n in names}
            for i in range(args.plan_episodes):
                sx, sy, qx, qy = test_episode(args, groups, splits, test_classes, preprocess, ways, shots, i)
                for name in names:
                    lr, head_lr = LR_GRID.get(name, [(0.0, 0.0)])[0]
                    timings[name].append(methods.run(name, sx, sy, qx, qy, args.inner_steps, lr, head_lr)[1:])
            for name in names:
                adapt_s = float(np.median([t[0] for t in timings[name]]))
                episode_s = float(np.median([t[1] for t in timings[name]]))
                runs = FULL_TEST_EPISODES + FULL_VAL_EPISODES * len(LR_GRID.get(name, []))
                rows.append({"method": name, "ways": ways, "shots": shots, "adapt_seconds": adapt_s,
                             "episode_seconds": episode_s, "full_run_episodes": runs,
                             "full_run_hours": episode_s * runs / 3600})
                total += episode_s * runs
    full_base = []
    if "fomaml" in names:
        full_base = full_base_adapt_seconds(args, base, groups, splits, test_classes, preprocess)
    meta_hours = {n: r["seconds_per_episode"] * FULL_META_EPISODES / 3600 for n, r in meta.items()}
    total_hours = total / 3600 + sum(meta_hours.values())
    result = {"settings": {k: v for k, v in settings.items()}, "plan_episodes": args.plan_episodes,
              "plan_meta_episodes": args.plan_meta_episodes, "rows": rows,
              "meta_seconds_per_episode": {n: r["seconds_per_episode"] for n, r in meta.items()},
              "meta_train_hours": meta_hours, "total_cpu_hours": total_hours,
              "full_base_fomaml_adapt": full_base,
              "measured_in_seconds": round(time.perf_counter() - started, 1), "machine": machine(args)}
    lines = [f"# Few-shot benchmark: time plan of the full run ({args.input_size} px, {args.arch})", "",
             f"Medians of {args.plan_episodes} test episode(s) per cell and method and {args.plan_meta_episodes} "
             f"meta-training episodes each, {args.threads} torch thread(s) on a shared machine "
             f"({os.cpu_count()} CPUs, under `nice -n 19`, other jobs running). Full run: {FULL_TEST_EPISODES} test "
             f"episodes per cell + {FULL_VAL_EPISODES} validation episodes per learning-rate candidate, "
             f"{FULL_META_EPISODES} meta-training episodes per meta-learner; {args.queries} queries per class, "
             f"{args.inner_steps} inner steps.", "",
             "| ways | shots | method | adaptation s | episode s | episodes in full run | CPU hours |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ways']} | {r['shots']} | {r['method']} | {r['adapt_seconds']:.2f} | {r['episode_seconds']:.2f} | "
              f"{r['full_run_episodes']} | {r['full_run_hours']:.2f} |" for r in rows]
    for n, h in meta_hours.items():
        lines.append(f"\nMeta-training {n}: {meta[n]['seconds_per_episode']:.2f} s/episode, "
                     f"{FULL_META_EPISODES} episodes = {h:.2f} CPU hours.")
    for r in full_base:
        lines.append(f"\nFull-base first-order MAML (not run; why the benchmark adapts the last blocks only): "
                     f"{args.inner_steps} inner steps on every {args.arch} weight take {r['adapt_seconds']:.2f} s at "
                     f"{r['ways']}-way {r['shots']}-shot (the tail: {r['tail_adapt_seconds']:.2f} s).")
    lines.append(f"\n**Total: about {total_hours:.1f} CPU hours** for the full run at these settings.")
    out = args.out.with_name(args.out.name + "_plan")
    write_atomic(out.with_suffix(".json"), json.dumps(result, indent=1).encode())
    write_atomic(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


def full_base_adapt_seconds(args, base, groups, splits, test_classes, preprocess) -> list[dict]:
    """Seconds of the inner loop full-base first-order MAML would run (every backbone weight), next
    to the tail's, on the first test episode of each shot count at the smallest N."""
    rows = []
    ways = min(args.ways)
    config = MethodConfig(method="full", train_bn=False)
    model = TaskModel(copy.deepcopy(base.backbone), base.feature_size, ways)
    prepare_model(model, config)
    learner = fomaml_lib.TailLearner(base.backbone, base.feature_size, ways)
    for shots in args.shots:
        sx, sy, _, _ = test_episode(args, groups, splits, test_classes, preprocess, ways, shots, 0)
        started = time.perf_counter()
        adapt(model, config, sx, sy, ways, args.inner_steps, 1e-4, 1e-2)
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        learner.adapt(learner.prefix_features(sx), sy, ways, args.inner_steps, 1e-4, 1e-2)
        rows.append({"ways": ways, "shots": shots, "adapt_seconds": full_s,
                     "tail_adapt_seconds": time.perf_counter() - started})
    return rows


def machine(args) -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "cpus": os.cpu_count()}


def write_results(args, state: dict, source: dict, names: list[str], cells, costs: dict) -> None:
    rows = []
    for ways, shots in cells:
        for name in names:
            key = cell_key(name, ways, shots)
            accs, secs = state["episodes"].get(key, []), state["seconds"].get(key, [])
            adapt_secs = state["adapt_seconds"].get(key, [])
            if not accs:
                continue
            rows.append({"method": name, "ways": ways, "shots": shots, "episodes": len(accs),
                         "accuracy": float(np.mean(accs)), "ci95": ci95(accs),
                         "lr": state["lr"].get(key, {}).get("chosen"),
                         "adapt_seconds_median": float(np.median(adapt_secs)),
                         "seconds_per_episode_median": float(np.median(secs)),
                         "seconds_per_episode_min": float(np.min(secs)),
                         "pack_bytes": costs[ways][name]})
    meta = {n: {k: v for k, v in r.items() if k != "history"} for n, r in state.get("meta", {}).items()}
    result = {
        "label": "PILOT (too few episodes for conclusions)" if args.pilot else "benchmark",
        "settings": state["settings"], "source": source, "rows": rows, "meta_train": meta,
        "meta_train_history": {n: r.get("history") for n, r in state.get("meta", {}).items()},
        "lr_selection": state["lr"], "pack_bytes": {str(w): c for w, c in costs.items()}, "machine": machine(args),
    }
    episodes_done = sorted({r["episodes"] for r in rows})
    lines = [f"# Few-shot benchmark ({result['label']})", "",
             f"N-way episodes on glyphs of unseen scripts ({', '.join(source['test_scripts'])}; "
             f"{source['test_classes']} classes) from the DejaVu fonts; base: {args.arch} (weights {args.weights}) at "
             f"{args.input_size} px, frozen; {args.inner_steps} inner steps for every trained method; "
             f"{args.queries} queries per class; 95 % CI = 1.96 sd / sqrt(episodes). Learning rates chosen on "
             f"{args.val_episodes} validation episode(s) per candidate and cell; both meta-learners trained on "
             f"{args.meta_episodes} {args.meta_ways}-way {args.meta_shots}-shot episodes of "
             f"{source['meta_classes']} Latin/Cyrillic characters. Episodes done per cell: "
             f"{', '.join(map(str, episodes_done))} (target {args.episodes}).", "",
             "| ways | shots | method | episodes | accuracy | 95 % CI | lr (body, head) | adapt s (median) | "
             "s/episode (median, min) | task file bytes fp32 / fp16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = f"{r['lr']['lr']:g}, {r['lr']['head_lr']:g}" if r["lr"] else "-"
        pb = r["pack_bytes"]
        lines.append(f"| {r['ways']} | {r['shots']} | {r['method']} | {r['episodes']} | {r['accuracy']:.3f} | "
                     f"±{r['ci95']:.3f} | {lr} | {r['adapt_seconds_median']:.2f} | "
                     f"{r['seconds_per_episode_median']:.2f}, {r['seconds_per_episode_min']:.2f} | "
                     f"{pb['float32']:,} / {pb['float16']:,}{' (raw)' if name_is_raw(pb) else ''} |")
    lines += ["", "| meta-learner | what | episodes | CPU seconds | s/episode |", "|---|---|---|---|---|"]
    for n, m in meta.items():
        what = ("KM modulators (Reptile)" if n == "kmmeta"
                else f"{m.get('tail')} ({m.get('tail_params', 0):,} weights, first-order MAML)")
        lines.append(f"| {n} | {what} | {m['episodes']} | {m['seconds']:.0f} | {m['seconds_per_episode']:.2f} |")
    lines += ["", f"Task file bytes: real signed packs written by device_runtime's pack writer from each method's "
                  f"tensors (proto and linear: a head-only pack); fomaml changes base weights, which no pack carries, "
                  f"so its figure is the raw bytes of the tail weights plus the head. Timings: {args.threads} torch "
                  f"thread(s) on a shared machine ({os.cpu_count()} CPUs) under `nice -n 19` with other jobs running; "
                  "adaptation = support forward passes + inner steps, s/episode adds the query evaluation."]
    plan_path = args.out.with_name(args.out.name + "_plan.json")
    if plan_path.exists():
        planned = json.loads(plan_path.read_text())
        lines += ["", f"Cost of the full run ({FULL_TEST_EPISODES} test episodes per cell, {FULL_VAL_EPISODES} "
                      f"validation episodes per lr candidate, {FULL_META_EPISODES} meta-training episodes per "
                      "meta-learner) at "
                      f"{planned['settings']['input_size']} px, projected by `--plan` from measured episode times: "
                      f"about {planned['total_cpu_hours']:.0f} CPU hours on this machine ({plan_path.stem}.md)."]
    paired = paired_differences(cells, names, state)
    result["paired_differences"] = paired
    if paired:
        lines += ["", "Paired differences on the same episodes (method minus baseline, 95 % CI):", "",
                  "| ways | shots | method | baseline | episodes | difference | 95 % CI |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {d['ways']} | {d['shots']} | {d['method']} | {d['baseline']} | {d['episodes']} | "
                  f"{d['difference']:+.3f} | ±{d['ci95']:.3f} |" for d in paired]
    write_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=1, allow_nan=True).encode())
    write_atomic(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


def name_is_raw(pack: dict) -> bool:
    return pack.get("kind", "").startswith("raw")


def paired_differences(cells, names, state) -> list[dict]:
    """Every trained method against the prototype and linear-probe baselines, episode by episode."""
    out = []
    for ways, shots in cells:
        for baseline in ("proto", "linear"):
            if baseline not in names:
                continue
            for name in names:
                if name in ("proto", baseline):
                    continue
                a = state["episodes"].get(cell_key(name, ways, shots), [])
                b = state["episodes"].get(cell_key(baseline, ways, shots), [])
                n = min(len(a), len(b))
                if n < 2:
                    continue
                diff = [x - y for x, y in zip(a[:n], b[:n])]
                out.append({"ways": ways, "shots": shots, "method": name, "baseline": baseline, "episodes": n,
                            "difference": float(np.mean(diff)), "ci95": ci95(diff)})
    return out


if __name__ == "__main__":
    sys.exit(main())
