#!/usr/bin/env python
"""Transfer benchmark on a real pretrained base (ImageNet EfficientNet-Lite0) and real images.

Every method trains through km-edge's own loop (``fit``) with the same step budget, batch and
augmentation. Splits per target (``benchmarks/realdata.py``): *train*, a *holdout* carved from
train (20 %, stratified, the same for every run) that makes every choice (learning rates, the
epoch kept), and *test* (another style for most targets), evaluated once per final configuration.

For each base x target x configuration: a sweep over body learning rate x head learning rate on
seed 0, chosen on holdout accuracy; then the chosen rates on the other seeds. Seed 0's chosen run
is scored on test from its saved task tensors, so no sweep run ever touches test.

Every finished run is appended to ``<out>/<name>.jsonl``; a later start skips what is there, so
the benchmark resumes where it stopped. Outputs: <name>.json (summary), <name>.md, <name>.png.

    python benchmarks/transfer.py --config real                    # the full benchmark
    python benchmarks/transfer.py --config real --quick            # CI smoke run (demo base, LFW faces)
    python benchmarks/transfer.py --config real --pilot            # 2 targets, 7 methods, default rates, 1 seed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from transfer import (  # noqa: E402
    _eval_loader,
    base_points,
    config_averages,
    final_runs,
    pack_bytes,
    ratio_text,
    training_memory_bytes,
    verdict_sentence,
    write_plot,
)

# --- what is measured ---------------------------------------------------------------------------
REAL_BASES = [
    # 96 px keeps a run to minutes on one CPU core; emoji are 64 px and icons 32-96 px at the source.
    {"name": "efficientnet_lite0-imagenet", "arch": "efficientnet_lite0", "weights": "imagenet", "input_size": 96},
]
REAL_TARGETS = ["emoji-category", "emoji-subcategory", "icons-faenza-oxygen", "icons-elementary-tango"]
BODY_LRS = [1e-4, 1e-3, 3e-3, 1e-2]  # every method with trainable body tensors
HEAD_ONLY_LRS = [1e-3, 3e-3, 1e-2, 3e-2]  # head-only: the head's rate is the method's rate
HEAD_LRS = [1e-3, 1e-2]  # swept separately for every method that has its own head rate
HOLDOUT_FRACTION = 0.2
DEFAULT_KM_ID = "km-auto-k8c1-gelu-bn"  # km-edge train's default today (MethodConfig defaults + train_bn)


def real_grid() -> list[dict]:
    """The configurations compared, one dict each with a stable id."""
    grid = [
        {"id": "head", "method": "head"},
        {"id": "bn", "method": "bn"},
        {"id": "bn-affine", "method": "bn", "freeze_bn_stats": True},
        {"id": "bias", "method": "bias"},
    ]
    for rank in (1, 2, 4):
        for bn in (False, True):
            grid.append({"id": f"lora-r{rank}" + ("-bn" if bn else ""), "method": "lora", "lora_rank": rank,
                         "train_bn": bn})

    def km(kind="auto", kh=8, ch=1, act="gelu", bn=False, suffix="", **extra):
        return {"id": f"km-{kind}-k{kh}c{ch}-{act}" + ("-bn" if bn else "") + suffix, "method": "km",
                "modulator": {"kind": kind, "kernel_hidden": kh, "channel_hidden": ch, "activation": act},
                "train_bn": bn, **extra}

    grid += [
        km(bn=True),                                              # today's default
        km(),                                                     # BatchNorm frozen
        km(bn=True, freeze_bn_stats=True, suffix="affine"),        # BN affine trains, statistics frozen
        km(bn=True, bn_lr_scale=0.1, suffix="-bnlr0.1"),           # per-group rates: BN at lr / 10
        km(kind="kernel"), km(kind="channel"),                     # kinds (BN frozen)
        km(kh=4, ch=1), km(kh=16, ch=4),                           # hidden sizes
        km(act="relu"),                                            # activation
        km(weight_decay=1e-2, suffix="-wd1e-2"),                   # stronger pull toward identity (w2, b2 -> 0)
        # the head alone for the first quarter of the steps, then the modulators too (linear probe, then
        # fine-tune): the pilot saw BN-frozen KM's features die within ~20 steps of a fresh head's gradients
        km(body_delay=0.25, suffix="-lpft"), km(bn=True, body_delay=0.25, suffix="-lpft"),
    ]
    grid.append({"id": "full", "method": "full"})
    grid.append({"id": "full-lpft", "method": "full", "body_delay": 0.25})
    return grid


PILOT_GRID = ["head", DEFAULT_KM_ID, "km-auto-k8c1-gelu", "full", "lora-r2", "bn", "bias", "km-auto-k8c1-gelu-lpft"]
# the pilot trains each method at km-edge's default rates (methods.DEFAULT_LR, head 1e-2): no sweep
PILOT_LRS = "default"

FULL = {"bases": REAL_BASES, "targets": REAL_TARGETS, "steps": 100, "batch_size": 16, "seeds": [0, 1, 2],
        "train_per_class": 60, "test_per_class": 40, "grid": None, "body_lrs": BODY_LRS,
        "head_only_lrs": HEAD_ONLY_LRS, "head_lrs": HEAD_LRS}
PILOT = dict(FULL, targets=["emoji-category", "icons-faenza-oxygen"], seeds=[0], grid=PILOT_GRID, lrs=PILOT_LRS)
QUICK = {"bases": [{"name": "demo-random", "arch": "demo", "weights": None, "input_size": 32}],
         "targets": ["faces-lfw"], "steps": 4, "batch_size": 16, "seeds": [0, 1],
         "train_per_class": 20, "test_per_class": 10,
         "grid": ["head", "bn-affine", "bias", "lora-r1", DEFAULT_KM_ID, "km-auto-k8c1-gelu-bn-bnlr0.1",
                  "km-auto-k8c1-gelu-lpft", "full"],
         "body_lrs": [1e-3, 1e-2], "head_only_lrs": [1e-2, 3e-2], "head_lrs": [1e-2]}


def grid_method(config: dict):
    from device_runtime.km import ModulatorSpec
    from km_edge.methods import MethodConfig

    return MethodConfig(method=config["method"],
                        modulator=ModulatorSpec(**config["modulator"]) if "modulator" in config else ModulatorSpec(),
                        train_bn=config.get("train_bn", False), lora_rank=config.get("lora_rank", 2),
                        freeze_bn_stats=config.get("freeze_bn_stats", False))


def rate_pairs(cfg: dict, config: dict) -> list[tuple[float, float]]:
    """(body lr, head lr) pairs the sweep tries for one configuration."""
    from km_edge.methods import DEFAULT_LR, head_learning_rate

    if cfg.get("lrs") == "default":
        lr = DEFAULT_LR[config["method"]]
        return [(lr, head_learning_rate(config["method"], lr))]
    if config["method"] == "head":
        return [(lr, lr) for lr in cfg["head_only_lrs"]]
    return [(lr, head_lr) for lr in cfg["body_lrs"] for head_lr in cfg["head_lrs"]]


def run_key(job: dict) -> str:
    return (f"{job['base_name']}|{job['target']}|{job['config_id']}|s{job['seed']}|lr{job['lr']:g}|hlr{job['head_lr']:g}"
            f"|n{job['steps']}")


# --- one run (in a worker process) --------------------------------------------------------------
def _splits(data: Path):
    from device_runtime.imagefolder import list_image_folder
    from km_edge.data import stratified_split

    classes, train = list_image_folder(data / "train")
    test_classes, test = list_image_folder(data / "test")
    if test_classes != classes:
        raise RuntimeError(f"{data}: test classes differ from train classes")
    train, holdout = stratified_split(train, HOLDOUT_FRACTION, seed=0)  # the same holdout for every run
    return classes, train, holdout, test


def _base(job: dict):
    """The base of a job; a random-weights base (quick mode) is the same in every process."""
    import torch

    from km_edge.models import build_base

    base = job["base"]
    torch.manual_seed(0)
    return build_base(base["arch"], base["weights"], input_size=base["input_size"])


def run_one(job: dict) -> dict:
    """Train one configuration at one (lr, head lr, seed); score holdout (and test for a final run)."""
    import torch

    torch.set_num_threads(1)
    from km_edge.data import make_loader
    from km_edge.methods import build_task_model, parameter_report, set_train_mode, task_state
    from km_edge.torch_setup import seed_everything
    from km_edge.train import evaluate, fit

    config, seed = job["config"], job["seed"]
    base = _base(job)
    seed_everything(seed)
    base_params = base.num_params()
    classes, train, holdout, test = _splits(Path(job["data"]))
    method = grid_method(config)
    model = build_task_model(base, len(classes), method, seed)
    report = parameter_report(model, base_params)
    spec = base.preprocess
    lr, head_lr = job["lr"], job["head_lr"]
    bn_lr = lr * config["bn_lr_scale"] if "bn_lr_scale" in config else None
    cpu_started = time.process_time()  # CPU time: what a run costs, whatever else the machine is doing
    result = fit(model, method, make_loader(train, spec, job["batch_size"], True, seed), _eval_loader(holdout, spec),
                 epochs=1, max_steps=job["steps"], lr=lr, head_lr=head_lr, bn_lr=bn_lr,
                 body_delay_steps=int(config.get("body_delay", 0) * job["steps"]),
                 weight_decay=config.get("weight_decay", 1e-4), progress=False)
    record = {
        **{k: job[k] for k in ("base_name", "target", "config_id", "seed", "lr", "head_lr", "steps", "phase")},
        "key": run_key(job), "method": method.method, "holdout_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch, "epochs": len(result.history),
        "curve": [round(h["val_accuracy"], 4) for h in result.history],
        "train_loss_curve": [round(h["train_loss"], 4) for h in result.history],
        "seconds_per_step": result.seconds_per_step,
        "cpu_seconds": time.process_time() - cpu_started,  # training + the holdout evaluations, one thread
        "pack_bytes": pack_bytes(model, method, classes),
        "n_train": len(train), "n_holdout": len(holdout), "n_test": len(test), **report,
    }
    if job["phase"] == "final":
        record["test_accuracy"] = evaluate(model, _eval_loader(test, spec), torch.device("cpu"))[0]
    else:  # kept until the sweep's choice is made: the chosen run is scored on test from these
        state_path = Path(job["states"]) / f"{_safe_key(record['key'])}.pt"
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(task_state(model, method), state_path)
        record["state"] = str(state_path)
    if job.get("measure_memory"):
        set_train_mode(model, method)  # after evaluation: the probe step must not touch the results
        record["train_memory_bytes"] = training_memory_bytes(
            model, *next(iter(make_loader(train, spec, job["batch_size"], True, 0))))
    return record


def score_chosen(job: dict) -> dict:
    """Seed 0's chosen sweep run, scored once on test from its saved task tensors."""
    import torch

    torch.set_num_threads(1)
    from km_edge.methods import build_task_model, load_task_state
    from km_edge.train import evaluate

    sweep = job["sweep_record"]
    base = _base(job)
    classes, _, _, test = _splits(Path(job["data"]))
    method = grid_method(job["config"])
    model = build_task_model(base, len(classes), method, sweep["seed"])
    load_task_state(model, method, torch.load(sweep["state"], map_location="cpu", weights_only=True))
    accuracy = evaluate(model, _eval_loader(test, base.preprocess), torch.device("cpu"))[0]
    return {k: v for k, v in sweep.items() if k != "state"} | {"phase": "final", "test_accuracy": accuracy,
                                                               "key": sweep["key"] + "|final"}


def _safe_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


# --- the schedule -------------------------------------------------------------------------------
def read_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a stop mid-write: that run reruns
                pass
    return runs


def append_run(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def choose(sweeps: list[dict]) -> dict:
    """Best holdout accuracy; ties go to the lower body rate, then the lower head rate (the gentler run)."""
    return max(sweeps, key=lambda r: (r["holdout_accuracy"], -r["lr"], -r["head_lr"]))


def schedule(cfg: dict, grid: list[dict], data_root: Path, states: Path, jsonl: Path, pool, slots: int,
             log) -> list[dict]:
    """Run every missing job; each result goes to the JSON-lines file the moment it is done."""
    runs = read_runs(jsonl)
    done = {r["key"] for r in runs}
    groups = []
    memory_measured = {(r["base_name"], r["config_id"]) for r in runs if r.get("train_memory_bytes")}
    for base in cfg["bases"]:
        for config in grid:  # configuration-major: a stopped run has every target of its first configurations
            for target in cfg["targets"]:
                common = {"base": base, "base_name": base["name"], "target": target, "config": config,
                          "config_id": config["id"], "data": str(data_root / target), "steps": cfg["steps"],
                          "batch_size": cfg["batch_size"], "states": str(states)}
                groups.append(common)
    futures, pending = {}, deque()
    todo_sweeps: dict[int, set] = {}
    # never more in flight than `slots` workers, so what is queued here can still be reordered

    def submit(fn, job, tag):
        """Queue a job; test scoring and further seeds go first, so a stopped run leaves finished rows."""
        (pending.appendleft if tag[0] != "sweep" else pending.append)((fn, job, tag))

    def feed():
        while pending and len(futures) < slots:
            fn, job, tag = pending.popleft()
            futures[pool.submit(fn, job)] = (tag, job)

    def after_sweep(gi: int):
        """The group's sweep is complete: score the chosen run on test and train the other seeds."""
        common = groups[gi]
        sweeps = [r for r in runs if r["phase"] == "sweep" and r["base_name"] == common["base_name"]
                  and r["target"] == common["target"] and r["config_id"] == common["config_id"]
                  and r["seed"] == cfg["seeds"][0]]
        best = choose(sweeps)
        final0 = best["key"] + "|final"
        if final0 not in done:
            submit(score_chosen, dict(common, sweep_record=best, group_states=[r["state"] for r in sweeps]),
                   ("score", gi))
        for seed in cfg["seeds"][1:]:
            job = dict(common, phase="final", seed=seed, lr=best["lr"], head_lr=best["head_lr"])
            if run_key(job) not in done:
                submit(run_one, job, ("final", gi))

    for gi, common in enumerate(groups):
        pairs = rate_pairs(cfg, common["config"])
        missing = set()
        for lr, head_lr in pairs:
            job = dict(common, phase="sweep", seed=cfg["seeds"][0], lr=lr, head_lr=head_lr)
            if run_key(job) in done:
                continue
            if (common["base_name"], common["config_id"]) not in memory_measured:
                job["measure_memory"] = True  # once per base x configuration: the same for every target
                memory_measured.add((common["base_name"], common["config_id"]))
            missing.add(run_key(job))
            submit(run_one, job, ("sweep", gi))
        todo_sweeps[gi] = missing
        if not missing:
            after_sweep(gi)
    log(f"{len(runs)} runs already in {jsonl.name}; {len(pending)} jobs queued now (finals follow their sweeps)")
    finished = 0
    feed()
    while futures:
        complete, _ = wait(list(futures), return_when=FIRST_COMPLETED)
        for future in complete:
            (kind, gi), job = futures.pop(future)
            record = future.result()
            append_run(jsonl, record)
            runs.append(record)
            done.add(record["key"])
            finished += 1
            acc = record.get("test_accuracy", record["holdout_accuracy"])
            log(f"[{finished}] {record['target']} {record['config_id']} seed {record['seed']} lr {record['lr']:g}/"
                f"{record['head_lr']:g} {kind}: {'test' if 'test_accuracy' in record else 'holdout'} {acc:.3f} "
                f"({record['seconds_per_step']:.2f} s/step)")
            if kind == "sweep":
                todo_sweeps[gi].discard(record["key"])
                if not todo_sweeps[gi]:
                    after_sweep(gi)
            if kind == "score":  # the choice is made and scored: the sweep's task tensors go
                for state in job["group_states"]:
                    Path(state).unlink(missing_ok=True)
        feed()
    return runs


# --- aggregation, table, plot -------------------------------------------------------------------
def summarise(runs: list[dict], default_id: str) -> dict:
    rows = []
    for (base, target, config_id), items in final_runs(runs):
        accs = [r["test_accuracy"] for r in items]
        curves = [r["curve"] for r in items]
        rows.append({
            "base": base, "target": target, "config": config_id, "method": items[0]["method"],
            "lr": items[0]["lr"], "head_lr": items[0]["head_lr"], "seeds": len(items),
            "mean_accuracy": statistics.mean(accs), "std_accuracy": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "holdout_accuracy": statistics.mean(r["holdout_accuracy"] for r in items),
            "percent_of_base": items[0]["percent_of_base"], "trainable_params": items[0]["trainable_params"],
            "pack_bytes": items[0]["pack_bytes"],
            "seconds_per_step": _median(step_seconds(r) for r in items),
            "best_epochs": [r["best_epoch"] for r in items], "epochs": items[0]["epochs"],
            "mean_curve": [round(statistics.mean(c[i] for c in curves), 4) for i in range(min(map(len, curves)))],
        })
    averages = config_averages(rows)
    fronts, verdicts = {}, {}
    for base in sorted({a["base"] for a in averages}):
        peft, fronts[base], default, full = base_points(averages, base, default_id)
        if default is None:
            continue
        others = [a for a in peft if a["config"] != default_id and a["percent_of_base"] <= default["percent_of_base"]]
        best_other = max(others, key=lambda a: a["mean_accuracy"], default=None)
        base_rows = [r for r in rows if r["base"] == base]
        head_by_target = {r["target"]: r["mean_accuracy"] for r in base_rows if r["config"] == "head"}
        km_by_target = {r["target"]: r["mean_accuracy"] for r in base_rows if r["config"] == default_id}
        verdicts[base] = {
            "default_km_accuracy": default["mean_accuracy"], "default_km_percent": default["percent_of_base"],
            "targets_where_default_km_below_head": sorted(t for t in km_by_target
                                                          if t in head_by_target and km_by_target[t] < head_by_target[t]),
            "best_other_peft_within_budget": best_other["config"] if best_other else None,
            "best_other_peft_accuracy": best_other["mean_accuracy"] if best_other else None,
            "default_km_at_or_above_other_peft": best_other is None or default["mean_accuracy"] >= best_other["mean_accuracy"],
            "gap_to_full_points": 100 * (full["mean_accuracy"] - default["mean_accuracy"]) if full else None,
        }
    return {"rows": rows, "averages": averages, "pareto_front": fronts, "default_km": verdicts}


def step_seconds(run: dict) -> float | None:
    """CPU seconds per step (training and its holdout evaluations, one thread); None where not recorded.

    CPU time does not grow when other processes share the cores, so ratios and runtime estimates
    made from it hold on a busy machine; wall time (``seconds_per_step``) does not, and is not used.
    """
    return run["cpu_seconds"] / run["steps"] if "cpu_seconds" in run else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def relative_costs(runs: list[dict]) -> dict:
    """Step time (median over every run of the configuration) and peak training memory, relative to full."""
    steps: dict = {}
    memory: dict = {}
    for r in runs:
        if not r["key"].endswith("|final"):  # a scored sweep run is not a second measurement
            steps.setdefault((r["base_name"], r["config_id"]), []).append(step_seconds(r))
        if r.get("train_memory_bytes"):
            memory[(r["base_name"], r["config_id"])] = r["train_memory_bytes"]["total"]
    costs = {}
    for (base, config_id), times in steps.items():
        full_step = _median(steps.get((base, "full"), []))
        full_mem = memory.get((base, "full"))
        mem = memory.get((base, config_id))
        step = _median(times)
        costs[(base, config_id)] = {
            "seconds_per_step": step,
            "step_time_vs_full": step / full_step if step is not None and full_step else None,
            "peak_memory_bytes": mem,
            "peak_memory_vs_full": mem / full_mem if mem is not None and full_mem else None,
        }
    return costs


def write_markdown(path: Path, summary: dict, costs: dict, cfg: dict, meta: dict, datasets: dict, label: str) -> None:
    lines = [f"# Transfer benchmark on a real pretrained base{label}", ""]
    if meta.get("pilot"):
        lines += ["**PILOT, not the benchmark's result**: " + meta["pilot"], ""]
    lines += [
        f"Generated by `{meta['command']}` from {meta['run_count']} runs in the JSON-lines file "
        f"({meta['train_cpu_seconds_total'] / 60:.0f} CPU minutes of training where recorded) on {meta['machine']}. Every run: {cfg['steps']} AdamW steps of batch "
        f"{cfg['batch_size']}, cosine schedule, the same augmentation (random resized crop 0.7-1, colour jitter "
        f"0.2); the task tensors of the epoch with the best *holdout* accuracy are kept. Rates: "
        + ("each method at km-edge's default rates (no sweep)" if cfg.get("lrs") == "default" else
           f"body lr in {cfg['body_lrs']} x head lr in {cfg['head_lrs']} (head-only: {cfg['head_only_lrs']}), "
           "chosen per target on the holdout of seed 0")
        + f". Reported: **test** accuracy, mean ± std over seeds {cfg['seeds']}, touched once per final "
        "configuration. `% base` = trainable backbone parameters (head excluded) / base parameters; `pack` = "
        "bytes of the signed fp32 pack (full: the whole model); `step`, `mem` = CPU time per train step (median, "
        "holdout evaluations included) and "
        "peak training memory (weights + tensors saved for backward + gradients and AdamW state) relative "
        "to full fine-tuning.",
        "",
        "## Targets", "",
        "| target | classes | train + holdout / test | train from | test from | shift | licenses |",
        "|---|---:|---|---|---|---|---|",
    ]
    for name, m in datasets.items():
        licenses = "; ".join(f"{k} {m['versions'][k]}: {v}" for k, v in m["licenses"].items())
        lines.append(f"| {name} | {len(m['classes'])} | {m['n_train']} / {m['n_test']} | {m['train_from']} | "
                     f"{m['test_from']} | {m['shift']} | {licenses} |")
    lines.append("")
    for base in sorted({r["base"] for r in summary["rows"]}):
        rows = [r for r in summary["rows"] if r["base"] == base]
        targets = sorted({r["target"] for r in rows})
        configs = list(dict.fromkeys(r["config"] for r in rows))
        average = {a["config"]: a for a in summary["averages"] if a["base"] == base}
        front = set(summary["pareto_front"].get(base, []))
        lines += [f"## {base}", "", "| config | % base | pack bytes | " + " | ".join(targets)
                  + " | mean | step | mem |", "|---|---:|---:|" + "---:|" * len(targets) + "---:|---:|---:|"]
        for config_id in configs:
            cells = []
            for target in targets:
                row = next((r for r in rows if r["config"] == config_id and r["target"] == target), None)
                cells.append("–" if row is None else f"{100 * row['mean_accuracy']:.1f} ± {100 * row['std_accuracy']:.1f}")
            first = next(r for r in rows if r["config"] == config_id)
            cost = costs.get((base, config_id), {})
            mark = " ◆" if config_id in front else ""
            name = f"**{config_id}**" if config_id == meta["default_km"] else config_id
            mean = average[config_id]
            mean_text = f"{100 * mean['mean_accuracy']:.1f}" + ("" if mean["targets"] == len(targets) else
                                                               f" ({mean['targets']} targets)")
            lines.append(f"| {name}{mark} | {first['percent_of_base']:.3f} | {first['pack_bytes']:,} | "
                         + " | ".join(cells) + f" | {mean_text} | {ratio_text(cost.get('step_time_vs_full'))} | "
                         f"{ratio_text(cost.get('peak_memory_vs_full'))} |")
        verdict = summary["default_km"].get(base)
        if verdict:
            lines += ["", verdict_sentence(meta["default_km"], verdict, "mean test accuracy")]
        lines += ["", "Chosen rates (body / head) and holdout curves (mean holdout accuracy after each epoch, "
                      "chosen runs; the kept epoch is the best one):", "",
                  "| config | target | lr / head lr | holdout curve | kept epochs | CPU s/step |", "|---|---|---|---|---|---:|"]
        for r in rows:
            curve = " ".join(f"{100 * v:.0f}" for v in r["mean_curve"])
            lines.append(f"| {r['config']} | {r['target']} | {r['lr']:g} / {r['head_lr']:g} | {curve} | "
                         f"{r['best_epochs']} of {r['epochs']} | "
                         + ("–" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}") + " |")
        lines.append("")
    lines += ["◆ = on the Pareto front of the parameter-efficient methods (mean test accuracy vs % base).", ""]
    path.write_text("\n".join(lines))


# --- runtime plan --------------------------------------------------------------------------------
def plan(cfg: dict, grid: list[dict], timing_runs: list[dict]) -> dict:
    """Training runs the configuration needs and, from measured runs (e.g. the pilot's), its CPU time.

    Per base x target x configuration: the sweep's rate pairs on the first seed, then one run per
    further seed. A configuration never measured is costed like the median of the measured ones that
    backpropagate through the whole base (all but head-only and full), or full fine-tuning's for ``full``.
    """
    per_step: dict = {}
    for r in timing_runs:  # CPU seconds per step where recorded (training + holdout evaluation), else wall
        if not r["key"].endswith("|final"):
            per_step.setdefault(r["config_id"], []).append(step_seconds(r))
    measured = {k: _median(v) for k, v in per_step.items() if _median(v) is not None}
    adapters = [v for k, v in measured.items() if k not in ("head", "full")]  # backward through the whole base
    fallback = {"full": measured.get("full"), "adapter": statistics.median(adapters) if adapters else None}
    runs, seconds, unknown = 0, 0.0, []
    for config in grid:
        n = len(rate_pairs(cfg, config)) + len(cfg["seeds"]) - 1
        n *= len(cfg["bases"]) * len(cfg["targets"])
        runs += n
        step = measured.get(config["id"]) or {"full": fallback["full"], "head": None}.get(config["method"],
                                                                                       fallback["adapter"])
        if step is None:
            unknown.append(config["id"])
        else:
            seconds += n * cfg["steps"] * step
    return {"training_runs": runs, "seconds_one_process": seconds, "not_measured": unknown,
            "measured_seconds_per_step": measured}


# --- driver -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run: demo base, LFW faces, a few steps (CI)")
    mode.add_argument("--pilot", action="store_true", help="2 targets x 7 methods at default rates, seed 0")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default=None, help="output file stem [transfer_real, _pilot or _quick]")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / ".cache"), help="packages and built targets")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel worker processes")
    parser.add_argument("--targets", default=None, help="comma-separated subset of the targets")
    parser.add_argument("--only", default=None, help="comma-separated configuration ids (default: the mode's grid)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the mode's)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="base input size instead of the mode's (e.g. 224 where a GPU is at hand)")
    parser.add_argument("--default-km", default=DEFAULT_KM_ID, help="the configuration reported as default KM")
    parser.add_argument("--summarise", action="store_true", help="no training: tables from the JSON-lines file")
    parser.add_argument("--plan", default=None, metavar="RUNS.jsonl",
                        help="no training: count the mode's runs and cost them with the step times in RUNS.jsonl")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else PILOT if args.pilot else FULL)
    name = args.name or ("transfer_real" + ("_quick" if args.quick else "_pilot" if args.pilot else ""))
    if args.targets:
        cfg["targets"] = args.targets.split(",")
    if args.seeds:
        cfg["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.input_size:  # another size is another base: its runs never mix with the default size's
        cfg["bases"] = [dict(b, input_size=args.input_size, name=f"{b['name']}-{args.input_size}px")
                        for b in cfg["bases"]]
    by_id = {c["id"]: c for c in real_grid()}
    ids = args.only.split(",") if args.only else cfg["grid"] or list(by_id)
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        print(f"transfer_real: unknown configuration {unknown[0]!r}; known: {', '.join(by_id)}", file=sys.stderr)
        return 2
    grid = [by_id[i] for i in ids]  # in the order given: the first ones finish first
    if args.plan:
        estimate = plan(cfg, grid, read_runs(Path(args.plan)))
        hours = estimate["seconds_one_process"] / 3600
        print(json.dumps(estimate, indent=1))
        print(f"{estimate['training_runs']} training runs; {hours:.1f} h of training in one process at the measured "
              f"step times (+ holdout/test evaluation), {hours / max(args.jobs, 1):.1f} h with {args.jobs} processes "
              "on as many free cores" + (f"; NOT costed (no measured run of their kind): "
                                          f"{', '.join(estimate['not_measured'])}" if estimate["not_measured"] else ""))
        return 0
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    started = time.time()

    import realdata

    data_root = workdir / "realdata"
    try:
        datasets = realdata.build(data_root, cfg["targets"], workdir / "packages", cfg["train_per_class"],
                                  cfg["test_per_class"])
    except realdata.SourceMissing as exc:
        print(f"transfer_real: {exc}", file=sys.stderr)
        return 2
    jsonl = out / f"{name}.jsonl"
    if not args.summarise:
        log(f"{len(cfg['bases'])} base(s) x {len(cfg['targets'])} targets x {len(grid)} configurations; runs to {jsonl}")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            runs = schedule(cfg, grid, data_root, workdir / "states" / name, jsonl, pool, args.jobs, log)
    else:
        runs = read_runs(jsonl)
    wanted = {c["id"] for c in grid}
    runs = [r for r in runs if r["config_id"] in wanted and r["target"] in cfg["targets"]]
    summary = summarise(runs, args.default_km)
    costs = relative_costs(runs)
    minutes = (time.time() - started) / 60
    command = "python benchmarks/transfer.py --config real" + (" --quick" if args.quick else " --pilot" if args.pilot else "")
    meta = {"command": command, "minutes": minutes, "run_count": len(runs), "default_km": args.default_km,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.jobs} worker processes, 1 torch "
                       "thread each",
            "train_cpu_seconds_total": sum((step_seconds(r) or 0.0) * r["steps"] for r in runs
                                           if not r["key"].endswith("|final"))}
    if args.pilot:
        meta["pilot"] = (f"{len(cfg['targets'])} targets x {len(grid)} methods, each at km-edge's default learning "
                         f"rates (no sweep), seeds {cfg['seeds']}; it measures the cost of one run so the full "
                         "benchmark's runtime can be stated, and gives a first look. It decides nothing.")
    result = {"meta": meta, "config": {k: v for k, v in cfg.items() if k != "grid"}, "grid": grid,
              "datasets": datasets, "summary": summary,
              "costs": [{"base": b, "config": c, **v} for (b, c), v in sorted(costs.items())]}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    label = " (PILOT)" if args.pilot else " (quick smoke run)" if args.quick else ""
    write_markdown(out / f"{name}.md", summary, costs, cfg, meta, datasets, label)
    write_plot(out / f"{name}.png", summary, args.default_km, title=label,
               ylabel="test accuracy, mean over targets and seeds (%)", annotate=True)
    log(f"wrote {out / name}.json, .md, .png ({len(runs)} runs) in {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
