#!/usr/bin/env python
"""Transfer benchmark: KM against head-only, BatchNorm, LoRA-conv and full fine-tuning.

Every run trains with the same step budget through km-edge's own training loop (``fit``). Each
base x configuration gets a learning-rate sweep on seed 0 of the first target, chosen by accuracy
on a holdout carved from train (never on val); the chosen rate then runs on every target and seed,
and val accuracy is reported as mean +- std over seeds. Outputs: results/transfer.json (every run), transfer.md, transfer.png.

    python benchmarks/transfer.py            # the full benchmark (make bench-transfer)
    python benchmarks/transfer.py --quick    # a smoke run of the same code paths (CI)
    python benchmarks/transfer.py --config real [--quick|--pilot]   # ImageNet EfficientNet-Lite0, real
                                             # images (benchmarks/transfer_real.py); --config synthetic = this
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --- what is measured ---------------------------------------------------------------------------
# Bases: the demo net plus torchvision trunks at reduced width and input size, each pretrained by
# the project on the demo source task so the runs fit a CPU.
BASES = [
    {"name": "demo", "arch": "demo", "width": 1.0, "input_size": 32, "pretrain_epochs": 12},
    # mobilenet_v2 trains slowly from scratch at 32 px (width 0.35, 10 epochs: 0.14 on the source)
    {"name": "mobilenet_v2-w0.5", "arch": "mobilenet_v2", "width": 0.5, "input_size": 32, "pretrain_epochs": 20,
     "pretrain_lr": 5e-3},
    {"name": "resnet18-w0.25", "arch": "resnet18", "width": 0.25, "input_size": 32, "pretrain_epochs": 10},
]
TARGETS = ["letters", "shapes", "textures"]
LEARNING_RATES = {  # swept per configuration; the head always trains at max(lr, 1e-2)
    "head": [3e-3, 1e-2, 3e-2],
    "bn": [3e-3, 1e-2, 3e-2],
    "lora": [1e-3, 3e-3, 1e-2],
    "km": [1e-3, 3e-3, 1e-2],
    "full": [3e-4, 1e-3, 3e-3],
}
DEFAULT_KM_ID = "km-auto-k8c1-gelu-bn"  # km-edge train's default, chosen from this benchmark


def method_grid() -> list[dict]:
    """The configurations compared: one dict each, with a stable id."""
    grid = [{"id": "head", "method": "head"}, {"id": "bn", "method": "bn"}]
    for rank in (1, 2, 4):
        for bn in (False, True):
            grid.append({"id": f"lora-r{rank}" + ("-bn" if bn else ""), "method": "lora", "lora_rank": rank, "train_bn": bn})
    # KM: every kind with and without BN at the default sizes; hidden sizes and activations of the
    # auto kind with BN (the full factorial would not fit the CPU budget).
    km_variants = [  # kind, kernel hidden, channel hidden, activation, train BN
        *[(kind, 8, 1, "relu", bn) for kind in ("kernel", "channel", "auto") for bn in (False, True)],
        ("auto", 4, 1, "relu", True), ("auto", 16, 4, "relu", True),
        ("auto", 8, 1, "gelu", True),
    ]
    for kind, kh, ch, act, bn in km_variants:
        grid.append({
            "id": f"km-{kind}-k{kh}c{ch}-{act}" + ("-bn" if bn else ""), "method": "km",
            "modulator": {"kind": kind, "kernel_hidden": kh, "channel_hidden": ch, "activation": act},
            "train_bn": bn,
        })
    grid.append({"id": "full", "method": "full"})
    return grid


FULL = {"bases": BASES, "targets": TARGETS, "steps": 40, "batch_size": 32, "seeds": [0, 1, 2],
        "data_scale": 1.0, "lrs": LEARNING_RATES, "grid": None}
QUICK = {"bases": [dict(BASES[0], pretrain_epochs=1), dict(BASES[2], pretrain_epochs=1)],
         "targets": TARGETS[:2], "steps": 6, "batch_size": 16, "seeds": [0, 1], "data_scale": 0.15,
         "lrs": {k: v[:2] for k, v in LEARNING_RATES.items()},
         "grid": ["head", "bn", "lora-r2", "km-auto-k8c1-relu", "km-auto-k8c1-relu-bn", DEFAULT_KM_ID, "full"]}


# --- one run (in a worker process) --------------------------------------------------------------
_CACHE: dict = {}


def grid_method(config: dict, **overrides):
    """The MethodConfig of one grid configuration."""
    from device_runtime.km import ModulatorSpec
    from km_edge.methods import MethodConfig

    options = {"train_bn": config.get("train_bn", False), "lora_rank": config.get("lora_rank", 2), **overrides}
    modulator = ModulatorSpec(**config["modulator"]) if "modulator" in config else ModulatorSpec()
    return MethodConfig(method=config["method"], modulator=modulator, **options)


def _eval_loader(samples, spec):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from device_runtime.preprocess import load_image, preprocess

    key = (tuple(str(p) for p, _ in samples), json.dumps(spec, sort_keys=True))
    if key not in _CACHE:
        images = torch.stack([torch.from_numpy(preprocess(load_image(p), spec)) for p, _ in samples])
        labels = torch.tensor([y for _, y in samples])
        _CACHE[key] = TensorDataset(images, labels)
    return DataLoader(_CACHE[key], batch_size=256)


def run_one(job: dict) -> dict:
    """Train one configuration on one base x target x seed x learning rate; measure everything."""
    import torch

    torch.set_num_threads(1)
    from device_runtime.imagefolder import list_image_folder
    from km_edge.data import make_loader, stratified_split
    from km_edge.methods import build_task_model, head_learning_rate, parameter_report, set_train_mode
    from km_edge.models import build_base
    from km_edge.torch_setup import seed_everything
    from km_edge.train import evaluate, fit

    config = job["config"]
    seed_everything(job["seed"])
    base = build_base(job["base"]["arch"], job["weights"], input_size=job["base"]["input_size"])
    base_params = base.num_params()
    classes, train = list_image_folder(Path(job["data"]) / "train")
    _, val = list_image_folder(Path(job["data"]) / "val")
    train, holdout = stratified_split(train, 0.2, seed=0)  # same holdout for every run
    method = grid_method(config)
    model = build_task_model(base, len(classes), method, job["seed"])
    report = parameter_report(model, base_params)
    spec = base.preprocess
    lr = job["lr"]
    head_lr = head_learning_rate(method.method, lr)
    result = fit(model, method, make_loader(train, spec, job["batch_size"], True, job["seed"]),
                 _eval_loader(holdout, spec), epochs=1, max_steps=job["steps"], lr=lr, head_lr=head_lr,
                 progress=False)
    val_accuracy, _ = evaluate(model, _eval_loader(val, spec), torch.device("cpu"))
    memory = None
    if job["phase"] == "sweep" and job["lr"] == min(job["lrs"]):  # same for every rate and seed: once
        set_train_mode(model, method)  # after evaluation: the probe step must not touch the results
        memory = training_memory_bytes(model, *next(iter(make_loader(train, spec, job["batch_size"], True, 0))))
    return {
        **{k: job[k] for k in ("base_name", "target", "config_id", "seed", "lr", "steps", "phase")},
        "method": method.method,
        "holdout_accuracy": result.best_val_accuracy,
        "val_accuracy": val_accuracy,
        "best_epoch": result.best_epoch,
        "seconds_per_step": result.seconds_per_step,
        "pack_bytes": pack_bytes(model, method, classes),
        "train_memory_bytes": memory,
        **report,
    }


# Pack bytes do not depend on the preprocessing values; any valid spec will do.
_SIZE_ONLY_PREPROCESS = {"resize": 32, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                         "interpolation": "bilinear"}


def pack_bytes(model, method, classes) -> int | None:
    """Bytes of the real signed fp32 pack these task tensors make (full fine-tuning: the whole model)."""
    if method.method == "full":
        return int(sum(p.numel() for p in model.parameters()) * 4)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.pack import build_pack
    from km_edge.pack import task_tensors

    body = {"task": "bench", "pack_version": 1, "base_id": "0" * 64, "labels": list(classes),
            "preprocess": _SIZE_ONLY_PREPROCESS, "method": method.method,
            "modulator": method.modulator.to_dict() if method.method == "km" else None,
            **task_tensors(model, method), "metrics": {}, "trainer": {}}
    return len(build_pack(body, Ed25519PrivateKey.generate()))


# --- training memory ------------------------------------------------------------------------------
def training_memory_bytes(model, images, labels) -> dict:
    """Peak training memory of one step, counted exactly rather than read off a noisy RSS.

    weights (frozen and trainable) + every tensor autograd saves for backward (the activations,
    and the modulated kernels for KM/LoRA) + gradient and the two AdamW moments per trainable value.
    """
    import torch

    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    activations = sum(saved.values())
    return {"weights": weights, "activations": activations, "optimizer": 3 * trainable,
            "total": weights + activations + 3 * trainable}


# --- set-up: data and pretrained bases ----------------------------------------------------------
def pretrain_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from km_edge.pretrain import pretrain_base

    base = job["base"]
    return pretrain_base(job["data"], base["arch"], job["path"], epochs=base["pretrain_epochs"],
                         lr=base.get("pretrain_lr", 3e-3),
                         input_size=base["input_size"], width=base["width"], device="cpu", progress=False)


def prepare(workdir: Path, cfg: dict, pool, log) -> dict:
    """Demo data and every base pretrained on the source task (cached in the workdir)."""
    from km_edge.demodata import write_demo_data

    data = workdir / f"data-s{cfg['data_scale']}"
    if not (data / "source" / "train").is_dir():
        log(f"writing demo data to {data}")
        write_demo_data(data, seed=0, scale=cfg["data_scale"])
    weights, todo = {}, []
    for base in cfg["bases"]:
        tag = hashlib.sha256(json.dumps([base, cfg["data_scale"]], sort_keys=True).encode()).hexdigest()[:10]
        path = workdir / "bases" / f"{base['name']}-{tag}.pth"
        weights[base["name"]] = str(path)
        if not path.exists():
            log(f"pretraining {base['name']} on the source task ({base['pretrain_epochs']} epochs)")
            todo.append({"base": base, "data": str(data / "source"), "path": str(path)})
    for job, report in zip(todo, pool.map(pretrain_one, todo)):
        log(f"  {job['base']['name']}: source val accuracy {report['source_val_accuracy']:.3f}")
    return {"data": data, "weights": weights}


def full_size_shares(config: dict) -> dict:
    """The default KM configuration's parameter share on full-size torchvision bases (224 px)."""
    from km_edge.methods import build_task_model, parameter_report
    from km_edge.models import build_base

    shares = {}
    for arch in ("mobilenet_v2", "resnet18"):
        base = build_base(arch)
        n = base.num_params()
        entry = {"base_params": n}
        for key, train_bn in (("", config.get("train_bn", False)), ("modulators_only_", False)):
            method = grid_method(config, train_bn=train_bn)
            report = parameter_report(build_task_model(build_base(arch), 1000, method, 0), n)
            entry[f"{key}trainable_params"] = report["trainable_params"]
            entry[f"{key}percent_of_base"] = report["percent_of_base"]
        shares[arch] = entry
    return shares


# --- aggregation, table, plot -------------------------------------------------------------------
def final_runs(runs: list[dict]) -> list[tuple[tuple[str, str, str], list[dict]]]:
    """The final runs (every seed at the chosen rate) grouped by (base, target, config), sorted."""
    by_key: dict = {}
    for run in runs:
        if run["phase"] == "final":
            by_key.setdefault((run["base_name"], run["target"], run["config_id"]), []).append(run)
    return sorted(by_key.items())


def summarise(runs: list[dict]) -> dict:
    rows = []
    for (base, target, config_id), items in final_runs(runs):
        accs = [r["val_accuracy"] for r in items]
        rows.append({
            "base": base, "target": target, "config": config_id, "method": items[0]["method"],
            "lr": items[0]["lr"], "seeds": len(items),
            "mean_accuracy": statistics.mean(accs), "std_accuracy": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "percent_of_base": items[0]["percent_of_base"], "trainable_params": items[0]["trainable_params"],
            "pack_bytes": items[0]["pack_bytes"],
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in items),
        })
    averages = config_averages(rows)
    fronts, verdicts = {}, {}
    for base in sorted({a["base"] for a in averages}):
        peft, fronts[base], default, full = base_points(averages, base, DEFAULT_KM_ID)
        others = [a for a in peft if a["method"] != "km" and a["percent_of_base"] <= (default or {}).get("percent_of_base", 0)]
        best_other = max(others, key=lambda a: a["mean_accuracy"], default=None)
        if default:
            verdicts[base] = {
                "default_km_accuracy": default["mean_accuracy"],
                "default_km_percent": default["percent_of_base"],
                "best_other_peft_within_budget": best_other["config"] if best_other else None,
                "best_other_peft_accuracy": best_other["mean_accuracy"] if best_other else None,
                "default_km_on_or_above_front": best_other is None or default["mean_accuracy"] >= best_other["mean_accuracy"],
                "gap_to_full_points": 100 * (full["mean_accuracy"] - default["mean_accuracy"]) if full else None,
            }
    return {"rows": rows, "averages": averages, "pareto_front": fronts, "default_km": verdicts}


def config_averages(rows: list[dict]) -> list[dict]:
    """Per (base, config): accuracy and % of base averaged over the targets."""
    per_config: dict = {}
    for row in rows:
        per_config.setdefault((row["base"], row["config"]), []).append(row)
    return [{
        "base": base, "config": config_id, "method": items[0]["method"],
        "mean_accuracy": statistics.mean(r["mean_accuracy"] for r in items),
        "percent_of_base": statistics.mean(r["percent_of_base"] for r in items), "targets": len(items),
    } for (base, config_id), items in sorted(per_config.items())]


def base_points(averages: list[dict], base: str, default_id: str):
    """One base's parameter-efficient points, their Pareto front (config ids), the default KM point
    and full fine-tuning's (None where not measured)."""
    points = [a for a in averages if a["base"] == base]
    peft = [a for a in points if a["method"] != "full"]
    default = next((a for a in points if a["config"] == default_id), None)
    full = next((a for a in points if a["config"] == "full"), None)
    return peft, [a["config"] for a in pareto_front(peft)], default, full


def pareto_front(points: list[dict]) -> list[dict]:
    """Configurations no other beats on accuracy at no more parameters."""
    front = []
    for p in points:
        dominated = any(
            q is not p and q["percent_of_base"] <= p["percent_of_base"] and q["mean_accuracy"] >= p["mean_accuracy"]
            and (q["percent_of_base"] < p["percent_of_base"] or q["mean_accuracy"] > p["mean_accuracy"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["percent_of_base"])


def relative_costs(summary: dict, memory: dict) -> dict:
    """Train step time and peak memory of each configuration relative to full fine-tuning."""
    costs = {}
    for base in {r["base"] for r in summary["rows"]}:
        rows = [r for r in summary["rows"] if r["base"] == base]
        step = {}
        for r in rows:
            step.setdefault(r["config"], []).append(r["seconds_per_step"])
        full_step = statistics.mean(step.get("full", [float("nan")]))
        full_mem = memory.get(base, {}).get("full", {}).get("total")
        for config_id, times in step.items():
            mem = memory.get(base, {}).get(config_id, {}).get("total")
            costs[(base, config_id)] = {
                "step_time_vs_full": statistics.mean(times) / full_step if full_step == full_step else None,
                "peak_memory_vs_full": (mem / full_mem) if mem is not None and full_mem else None,
            }
    return costs


def write_markdown(path: Path, summary: dict, costs: dict, cfg: dict, shares: dict, meta: dict) -> None:
    lines = [
        "# Transfer benchmark",
        "",
        f"Generated by `{meta['command']}` in {meta['minutes']:.1f} min on {meta['machine']}. "
        f"Every run: {cfg['steps']} AdamW steps of batch {cfg['batch_size']}, cosine schedule; learning rate swept "
        f"per base x configuration on seed 0 of the first target and chosen on a holdout carved from train (20 %); val accuracy is mean ± std over "
        f"seeds {cfg['seeds']} at the chosen rate. `% base` = trainable parameters (head excluded) / base "
        "parameters; `pack` = bytes of the signed fp32 pack (full: the whole model in fp32); `step` and `mem` = "
        "train step time and peak training memory (weights + tensors saved for backward + gradients and AdamW "
        "state, counted exactly in one step) relative to full fine-tuning.",
        "",
    ]
    for base in sorted({r["base"] for r in summary["rows"]}):
        rows = [r for r in summary["rows"] if r["base"] == base]
        targets = sorted({r["target"] for r in rows})
        configs = [c for c in dict.fromkeys(r["config"] for r in rows)]
        lines += [f"## {base}", "", "| config | % base | pack bytes | " + " | ".join(targets) + " | mean | step | mem |",
                  "|---|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|"]
        average = {a["config"]: a for a in summary["averages"] if a["base"] == base}
        front = set(summary["pareto_front"].get(base, []))
        for config_id in configs:
            cells = []
            for target in targets:
                row = next(r for r in rows if r["config"] == config_id and r["target"] == target)
                cells.append(f"{100 * row['mean_accuracy']:.1f} ± {100 * row['std_accuracy']:.1f}")
            first = next(r for r in rows if r["config"] == config_id)
            cost = costs.get((base, config_id), {})
            mark = " ◆" if config_id in front else ""
            name = f"**{config_id}**" if config_id == DEFAULT_KM_ID else config_id
            lines.append(
                f"| {name}{mark} | {first['percent_of_base']:.3f} | {first['pack_bytes']:,} | " + " | ".join(cells)
                + f" | {100 * average[config_id]['mean_accuracy']:.1f} | {ratio_text(cost.get('step_time_vs_full'))} | "
                f"{ratio_text(cost.get('peak_memory_vs_full'))} |"
            )
        verdict = summary["default_km"].get(base)
        if verdict:
            lines += ["", verdict_sentence(DEFAULT_KM_ID, verdict, "mean accuracy")]
        lines.append("")
    lines += ["◆ = on the Pareto front of the parameter-efficient methods (accuracy vs % base).", ""]
    if shares:
        lines += ["## Default KM on full-size torchvision bases (224 px, head excluded)", "",
                  "| base | base params | trainable (modulators + BN) | % base | modulators only | % base |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arch, s in shares.items():
            lines.append(f"| {arch} | {s['base_params']:,} | {s['trainable_params']:,} | {s['percent_of_base']:.3f} | "
                         f"{s['modulators_only_trainable_params']:,} | {s['modulators_only_percent_of_base']:.3f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def ratio_text(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def verdict_sentence(default_id: str, v: dict, accuracy: str) -> str:
    """The default KM configuration against the others on one base (``v``: summarise's verdict);
    ``accuracy`` says which accuracy the numbers are (transfer_real.py reports test accuracy)."""
    text = (f"Default KM ({default_id}, {v['default_km_percent']:.2f} % of base): "
            f"{100 * v['default_km_accuracy']:.1f} % {accuracy}")
    if "targets_where_default_km_below_head" in v:
        text += f"; below head-only on: {', '.join(v['targets_where_default_km_below_head']) or 'none'}"
    if v["best_other_peft_within_budget"]:
        text += (f"; best other parameter-efficient configuration at no more parameters: "
                 f"{v['best_other_peft_within_budget']} {100 * v['best_other_peft_accuracy']:.1f} %")
    if "default_km_on_or_above_front" in v:
        text += "; on or above the front: " + ("yes" if v["default_km_on_or_above_front"] else "no")
    if v["gap_to_full_points"] is not None:
        text += f"; gap to full fine-tuning: {v['gap_to_full_points']:+.1f} points (positive = full is better)"
    return text + "."


METHOD_COLOURS = {"head": "tab:gray", "bn": "tab:olive", "bias": "tab:green", "lora": "tab:blue", "km": "tab:red",
                  "full": "black"}


def write_plot(path: Path, summary: dict, default_id: str = DEFAULT_KM_ID, *,
               ylabel: str = "val accuracy, mean over targets (%)", title: str = "", annotate: bool = False) -> None:
    """Accuracy against % of base per base, the parameter-efficient Pareto front dashed, the default
    KM configuration a star (``annotate`` names every point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({a["base"] for a in summary["averages"]})
    fig, axes = plt.subplots(1, max(len(bases), 1), figsize=(6.5 * max(len(bases), 1), 5), squeeze=False)
    for ax, base in zip(axes[0], bases):
        points = [a for a in summary["averages"] if a["base"] == base]
        for p in points:
            x = max(p["percent_of_base"], 1e-3)
            special = p["config"] == default_id
            ax.scatter(x, 100 * p["mean_accuracy"], c=METHOD_COLOURS[p["method"]], s=100 if special else 32,
                       marker="*" if special else ("s" if p["method"] == "full" else "o"), alpha=0.8,
                       edgecolors="none")
            if annotate:
                ax.annotate(p["config"], (x, 100 * p["mean_accuracy"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        front = sorted((p for p in points if p["config"] in summary["pareto_front"].get(base, [])),
                       key=lambda p: p["percent_of_base"])
        ax.plot([max(p["percent_of_base"], 1e-3) for p in front], [100 * p["mean_accuracy"] for p in front],
                "--", c="tab:purple", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters, % of base (head excluded; head-only drawn at 1e-3)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{base}{title}")
        ax.grid(alpha=0.3)
    methods = {a["method"] for a in summary["averages"]}
    handles = [plt.Line2D([], [], ls="", marker="o", c=c, label=m) for m, c in METHOD_COLOURS.items() if m in methods]
    handles += [plt.Line2D([], [], ls="", marker="*", c="tab:red", markersize=10, label="default KM"),
                plt.Line2D([], [], ls="--", c="tab:purple", label="Pareto front (PEFT)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def resummarise(out: Path) -> int:
    """Recompute every derived number from the stored runs (e.g. after choosing another default)."""
    result = json.loads((out / "transfer.json").read_text())
    summary = summarise(result["runs"])
    costs = relative_costs(summary, result["memory"])
    default_config = next(c for c in result["grid"] if c["id"] == DEFAULT_KM_ID)
    shares = full_size_shares(default_config) if result["full_size_default_km"] else {}
    result.update(summary=summary, default_km=DEFAULT_KM_ID, full_size_default_km=shares,
                  costs=[{"base": b, "config": c, **v} for (b, c), v in sorted(costs.items())])
    (out / "transfer.json").write_text(json.dumps(result, indent=1, default=str))
    write_markdown(out / "transfer.md", summary, costs, result["config"], shares, result["meta"])
    write_plot(out / "transfer.png", summary)
    print(f"rewrote {out / 'transfer.md'} and transfer.png with default {DEFAULT_KM_ID}")
    return 0


# --- driver -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    global DEFAULT_KM_ID
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:  # --config real: the real-base benchmark (benchmarks/transfer_real.py)
        at = argv.index("--config")
        config = argv[at + 1] if at + 1 < len(argv) else ""
        if config not in ("real", "synthetic"):
            print(f"transfer.py: --config must be real or synthetic, got {config!r}", file=sys.stderr)
            return 2
        del argv[at:at + 2]
        if config == "real":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import transfer_real

            return transfer_real.main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, few steps (CI)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where JSON/MD/PNG go")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".cache"), help="data and pretrained bases")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    parser.add_argument("--only", default=None, help="comma-separated config ids to run (default: all)")
    parser.add_argument("--default-km", default=DEFAULT_KM_ID, help="the configuration reported as default KM")
    parser.add_argument("--summarise", action="store_true",
                        help="no training: rebuild transfer.md/png and the summary from --out's transfer.json")
    args = parser.parse_args(argv)
    DEFAULT_KM_ID = args.default_km
    if args.summarise:
        return resummarise(Path(args.out))
    from tqdm.auto import tqdm

    cfg = QUICK if args.quick else FULL
    started = time.time()
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"{len(cfg['bases'])} bases x {len(cfg['targets'])} targets; results to {out}")
    grid = [c for c in method_grid() if cfg["grid"] is None or c["id"] in cfg["grid"]]
    if args.only:
        grid = [c for c in grid if c["id"] in args.only.split(",")]

    def jobs_for(phase, targets, seeds, lr_of):
        jobs = []
        for base in cfg["bases"]:
            for target in targets:
                for config in grid:
                    for seed in seeds:
                        for lr in lr_of(base["name"], config):
                            jobs.append({"phase": phase, "base": base, "base_name": base["name"],
                                         "weights": prepared["weights"][base["name"]],
                                         "data": str(prepared["data"] / target), "target": target,
                                         "config": config, "config_id": config["id"], "seed": seed, "lr": lr,
                                         "steps": cfg["steps"], "batch_size": cfg["batch_size"],
                                         "lrs": cfg["lrs"][config["method"]]})
        return jobs

    runs: list[dict] = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        prepared = prepare(workdir, cfg, pool, log)
        # the rate is chosen per base x configuration on the first target's holdout (seed 0)
        sweep = jobs_for("sweep", cfg["targets"][:1], cfg["seeds"][:1], lambda b, c: cfg["lrs"][c["method"]])
        for run in tqdm(pool.map(run_one, sweep), total=len(sweep), desc="lr sweep"):
            runs.append(run)
        chosen = {}
        for run in runs:
            key = (run["base_name"], run["config_id"])
            if key not in chosen or run["holdout_accuracy"] > chosen[key]["holdout_accuracy"]:
                chosen[key] = run
        for run in chosen.values():
            runs.append(dict(run, phase="final"))
        rest = [job for job in jobs_for("final", cfg["targets"], cfg["seeds"], lambda b, c: [chosen[(b, c["id"])]["lr"]])
                if not (job["target"] == cfg["targets"][0] and job["seed"] == cfg["seeds"][0])]
        for run in tqdm(pool.map(run_one, rest), total=len(rest), desc="targets x seeds at the chosen rate"):
            runs.append(run)

    memory = {}
    for run in runs:
        if run.get("train_memory_bytes"):
            memory.setdefault(run["base_name"], {}).setdefault(run["config_id"], run["train_memory_bytes"])
    summary = summarise(runs)
    costs = relative_costs(summary, memory)
    default_config = next(c for c in method_grid() if c["id"] == DEFAULT_KM_ID)
    shares = {} if args.quick else full_size_shares(default_config)
    minutes = (time.time() - started) / 60
    meta = {"command": "make bench-transfer" + ("-quick" if args.quick else ""), "minutes": minutes,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.jobs} worker processes, "
                       "1 torch thread each"}
    result = {
        "meta": meta, "config": {k: v for k, v in cfg.items() if k != "grid"}, "grid": grid,
        "default_km": DEFAULT_KM_ID, "runs": runs, "summary": summary,
        "costs": [{"base": b, "config": c, **v} for (b, c), v in sorted(costs.items())],
        "memory": memory, "full_size_default_km": shares,
    }
    (out / "transfer.json").write_text(json.dumps(result, indent=1, default=str))
    write_markdown(out / "transfer.md", summary, costs, cfg, shares, meta)
    write_plot(out / "transfer.png", summary)
    log(f"wrote {out / 'transfer.json'}, transfer.md, transfer.png in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
