"""Meta-learned KM initialisation (``km-edge meta-train``): Reptile over few-shot episodes.

Why Reptile (Nichol et al. 2018) and not first-order MAML: both skip second derivatives, but
Reptile needs no separate query gradient, so an episode costs exactly its inner steps (one
forward/backward on the support set each) and one model's memory; that is the cheapest meta-learner
that runs on a CPU. The outer update moves the modulators towards the adapted ones,
``theta += eps * (phi - theta)``, with ``eps`` annealed linearly to zero.

What is meta-learned: the KM modulator tensors only (``w1, b1, w2, b2`` of every conv). The head
cannot be shared across episodes (each has its own classes), so every episode starts its head from
the support set's class means ("Proto-MAML" head, Triantafillou et al. 2020): the adaptation starts
at the prototype classifier and the modulators learn to move features where the head can use them.
BatchNorm stays the base's during meta-training. A meta-init file is bound to the base's
fingerprint and to the modulator spec, exactly as checkpoints are; ``km-edge train --init FILE``
loads its modulators in place of the zero-start ones. Packs and the device are unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from device_runtime.errors import CheckpointError, DataError
from device_runtime.imagefolder import list_image_folder
from device_runtime.km import ModulatorSpec

from .checkpoint import load_torch_document, save_torch_document
from .methods import DEFAULT_LR, MethodConfig, head_learning_rate, set_train_mode, task_state
from .models import TaskModel

META_INIT_FORMAT = "km-edge-meta-init"
META_INIT_VERSION = 1
MAX_SOURCE_IMAGES = 200_000  # a source folder is listed and cached; bound it before reading
log = logging.getLogger(__name__)


# --- episodes --------------------------------------------------------------------------------
@dataclass
class Episode:
    """One N-way task: ``ways`` source classes relabelled 0..N-1, support and query indices."""

    classes: list[int]
    support: list[tuple[int, int]]  # (sample index, episode label)
    query: list[tuple[int, int]]


def group_by_class(labels: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    return groups


def eligible_classes(groups: dict[int, list[int]], shots: int, queries: int) -> list[int]:
    return sorted(c for c, items in groups.items() if len(items) >= shots + queries)


def sample_episode(groups: dict[int, list[int]], classes: list[int], ways: int, shots: int, queries: int,
                   rng: np.random.Generator) -> Episode:
    chosen = [classes[i] for i in rng.choice(len(classes), size=ways, replace=False)]
    support, query = [], []
    for label, cls in enumerate(chosen):
        picks = rng.choice(len(groups[cls]), size=shots + queries, replace=False)
        items = [groups[cls][i] for i in picks]
        support += [(i, label) for i in items[:shots]]
        query += [(i, label) for i in items[shots:]]
    return Episode(chosen, support, query)


def check_episode_source(groups: dict[int, list[int]], ways: int, shots: int, queries: int, where: str) -> list[int]:
    """The classes episodes may draw from; a source too small for the asked episodes is refused."""
    classes = eligible_classes(groups, shots, queries)
    if len(classes) < ways:
        raise DataError(f"{where}: {ways}-way episodes with {shots} shots + {queries} queries need {ways} classes "
                        f"with at least {shots + queries} images each; found {len(classes)} (lower --ways, "
                        "--shots or --queries, or add images)")
    return classes


# --- adaptation ------------------------------------------------------------------------------
def modulator_keys(model: TaskModel, config: MethodConfig) -> list[str]:
    return [k for k in task_state(model, config) if ".parametrizations.weight." in k]


def modulator_state(model: TaskModel) -> dict[str, torch.Tensor]:
    """The KM tensors of a model (parameters and the per-layer ``scale`` buffer)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if ".parametrizations.weight." in k and not k.endswith(".original")}


def prototype_weights(features: torch.Tensor, labels: torch.Tensor, ways: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the nearest-class-mean classifier: ``-|f - mu|^2 / T`` is linear in ``f`` up to a
    per-sample constant, ``W = 2 mu / T``, ``b = -|mu|^2 / T``. ``T`` is the mean squared distance of
    the support features to their overall mean (positive at one shot too), so the logits start on a
    scale where softmax is not saturated and the head and body still get gradients."""
    means = torch.stack([features[labels == c].mean(0) for c in range(ways)])
    spread = ((features - features.mean(0)) ** 2).sum(1).mean()
    temperature = spread if float(spread) > 1e-6 else torch.tensor(1.0)
    return 2 * means / temperature, -(means**2).sum(1) / temperature


@torch.no_grad()
def prototype_head(model: TaskModel, images: torch.Tensor, labels: torch.Tensor, ways: int) -> None:
    """Set the head to the nearest-class-mean classifier of the support features (base BN statistics)."""
    was_training = model.training
    model.eval()
    features = model.backbone(images)
    model.train(was_training)
    weight, bias = prototype_weights(features, labels, ways)
    model.head.weight.copy_(weight)
    model.head.bias.copy_(bias)


def adapt(model: TaskModel, config: MethodConfig, images: torch.Tensor, labels: torch.Tensor, ways: int,
          steps: int, lr: float, head_lr: float, batch_size: int | None = None) -> None:
    """Prototype head, then ``steps`` Adam steps on the support set (full batch unless ``batch_size``)."""
    prototype_head(model, images, labels, ways)
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters()), "lr": head_lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    optimizer = torch.optim.Adam(groups)
    set_train_mode(model, config, True)
    n = labels.numel()
    for step in range(steps):
        if batch_size and batch_size < n:
            pick = torch.randperm(n)[:batch_size]
            x, y = images[pick], labels[pick]
        else:
            x, y = images, labels
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: TaskModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


# --- Reptile -----------------------------------------------------------------------------------
def meta_config(options: dict) -> MethodConfig:
    """KM with the project's modulator spec; BatchNorm stays the base's while meta-training."""
    return MethodConfig(
        method="km",
        modulator=ModulatorSpec(kind=options["modulator"], kernel_hidden=int(options["kernel_hidden"]),
                                channel_hidden=int(options["channel_hidden"]), activation=options["activation"]),
        train_bn=False,
    )


def reptile(model: TaskModel, config: MethodConfig, images: torch.Tensor, labels: list[int], *, ways: int,
            shots: int, queries: int, episodes: int, inner_steps: int, lr: float, head_lr: float, meta_lr: float,
            seed: int, progress: bool = True, where: str = "source") -> dict:
    """Reptile on the modulators of ``model`` (modified in place); returns the training record.

    ``images`` holds every source image preprocessed (N, 3, H, W); ``labels`` their classes.
    """
    groups = group_by_class(labels)
    classes = check_episode_source(groups, ways, shots, queries, where)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    keys = [k for k, p in model.named_parameters() if p.requires_grad and not k.startswith("head.")]
    params = dict(model.named_parameters())
    theta = {k: params[k].detach().clone() for k in keys}
    history, started = [], time.perf_counter()
    bar = tqdm(total=episodes, desc="meta-train", disable=not progress, leave=False, dynamic_ncols=True)
    window: list[float] = []
    for episode_index in range(episodes):
        episode = sample_episode(groups, classes, ways, shots, queries, rng)
        s_idx, s_lab = zip(*episode.support)
        q_idx, q_lab = zip(*episode.query)
        support_x, support_y = images[list(s_idx)], torch.tensor(s_lab)
        query_x, query_y = images[list(q_idx)], torch.tensor(q_lab)
        with torch.no_grad():
            for k in keys:
                params[k].copy_(theta[k])
        adapt(model, config, support_x, support_y, ways, inner_steps, lr, head_lr)
        query_accuracy = accuracy(model, query_x, query_y)
        eps = meta_lr * (1.0 - episode_index / episodes)
        with torch.no_grad():
            for k in keys:
                theta[k] += eps * (params[k].detach() - theta[k])
        window = (window + [query_accuracy])[-50:]
        if episode_index % max(1, episodes // 20) == 0 or episode_index == episodes - 1:
            history.append({"episode": episode_index + 1, "query_accuracy_last50": float(np.mean(window))})
            log.debug("meta-train: episode %d/%d, query accuracy (last 50) %.4f", episode_index + 1, episodes,
                      history[-1]["query_accuracy_last50"])
        bar.update(1)
        bar.set_postfix(query_acc=f"{np.mean(window):.3f}")
    bar.close()
    with torch.no_grad():
        for k in keys:
            params[k].copy_(theta[k])
    seconds = time.perf_counter() - started
    return {"episodes": episodes, "seconds": round(seconds, 3), "seconds_per_episode": round(seconds / episodes, 4),
            "source_classes": len(classes), "history": history}


def load_source_images(data_dir: str | Path, spec: dict) -> tuple[torch.Tensor, list[int], list[str]]:
    """Every image of ``DIR/train`` (or ``DIR`` itself when it holds the class folders), preprocessed."""
    from .data import ImageDataset

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist")
    root = data_dir / "train" if (data_dir / "train").is_dir() else data_dir
    classes, samples = list_image_folder(root)
    if len(samples) > MAX_SOURCE_IMAGES:
        raise DataError(f"{root}: {len(samples)} images; meta-train reads at most {MAX_SOURCE_IMAGES}")
    dataset = ImageDataset(samples, spec, augment=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, [label for _, label in samples], classes


def meta_train(data_dir: str | Path, base_spec: dict, options: dict, meta: dict, out_path: str | Path,
               progress: bool = True) -> dict:
    """``km-edge meta-train``: learn a KM initialisation on a source ImageFolder and write it."""
    from .models import build_base
    from .methods import build_task_model
    from .torch_setup import seed_everything

    if not Path(data_dir).is_dir():  # refused before the base is built
        raise DataError(f"{data_dir}: data folder does not exist")
    seed = int(options["seed"])
    seed_everything(seed)
    base = build_base(**base_spec)
    fingerprint = base.fingerprint()
    images, labels, class_names = load_source_images(data_dir, base.preprocess)
    check_episode_source(group_by_class(labels), int(meta["ways"]), int(meta["shots"]), int(meta["queries"]),
                         str(data_dir))
    config = meta_config(options)
    model = build_task_model(base, int(meta["ways"]), config, seed)
    lr = float(options.get("lr") or DEFAULT_LR["km"])
    head_lr = float(options.get("head_lr") or head_learning_rate("km", lr))
    log.info("meta-training (Reptile) on %s: %d images of %d classes, %s episodes %s-way %s-shot", data_dir,
             len(labels), len(class_names), meta["episodes"], meta["ways"], meta["shots"])
    record = reptile(model, config, images, labels, ways=int(meta["ways"]), shots=int(meta["shots"]),
                     queries=int(meta["queries"]), episodes=int(meta["episodes"]),
                     inner_steps=int(meta["inner_steps"]), lr=lr, head_lr=head_lr, meta_lr=float(meta["meta_lr"]),
                     seed=seed, progress=progress, where=str(data_dir))
    tensors = modulator_state(model)
    document = {
        "format": META_INIT_FORMAT,
        "version": META_INIT_VERSION,
        "algorithm": "reptile",
        "base": {**{k: v for k, v in base_spec.items() if v is not None}, "fingerprint": fingerprint},
        "method_config": config.to_dict(),
        "meta": {**{k: v for k, v in meta.items()}, "lr": lr, "head_lr": head_lr, "seed": seed},
        "source": {"data": str(data_dir), "classes": len(class_names), "images": len(labels)},
        "tensors": tensors,
        "record": record,
    }
    save_torch_document(out_path, document)
    moved = max((float(v.abs().max()) for k, v in tensors.items() if k.endswith((".w2", ".b2"))), default=0.0)
    return {"meta_init": str(out_path), "algorithm": "reptile", "base_fingerprint": fingerprint,
            "modulator": config.modulator.to_dict(), **{k: meta[k] for k in meta},
            "source_classes": record["source_classes"], "source_images": len(labels),
            "seconds": record["seconds"], "seconds_per_episode": record["seconds_per_episode"],
            "final_query_accuracy": record["history"][-1]["query_accuracy_last50"],
            "max_abs_last_layer": moved, "history": record["history"]}


# --- using a meta-init -------------------------------------------------------------------------
def load_meta_init(path: str | Path, fingerprint: str, config: MethodConfig) -> dict[str, torch.Tensor]:
    """The modulator tensors of a meta-init, checked against the base (its fingerprint, taken before
    adapters are attached) and this KM spec."""
    path = Path(path)
    document = load_torch_document(path, META_INIT_FORMAT, "meta-init",
                                   "no meta-init file (make one with `km-edge meta-train`)")
    if document.get("version") != META_INIT_VERSION:
        raise CheckpointError(f"{path}: meta-init version {document.get('version')!r} is not {META_INIT_VERSION}")
    if config.method != "km":
        raise CheckpointError(f"{path}: a meta-init starts KM modulators; --method is {config.method!r}, not km")
    if fingerprint != document.get("base", {}).get("fingerprint"):
        raise CheckpointError(f"{path}: meta-init was learned on a different base (weights differ); "
                              "run `km-edge meta-train` for this base")
    theirs = document.get("method_config", {}).get("modulator")
    if theirs != config.modulator.to_dict():
        raise CheckpointError(f"{path}: meta-init modulators are {theirs}, the task asks for "
                              f"{config.modulator.to_dict()}; set the same modulator settings or meta-train again")
    tensors = document.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: meta-init holds no tensors")
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise CheckpointError(f"{path}: meta-init holds numbers that are not finite")
    return tensors


def apply_meta_init(model: TaskModel, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Put a meta-init's modulators into a prepared KM model; refuses tensors that do not fit."""
    own = modulator_state(model)
    missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
    wrong = [k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: meta-init tensors do not fit the model (missing {sorted(missing)[:2]}, "
                              f"unexpected {sorted(unexpected)[:2]}, wrong shape {sorted(wrong)[:2]})")
    model.load_state_dict(tensors, strict=False)
