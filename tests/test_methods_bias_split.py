"""The `bias` method (TinyTL), BatchNorm with frozen statistics, per-group learning rates, and
`km-edge train` naming the split each printed accuracy comes from.

Runs on the tiny demo base with random weights and a two-colour ImageFolder written here, so it
needs no pretrained base and takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import run_cli
from device_runtime.pack import build_pack, read_pack
from km_edge.methods import MethodConfig, batchnorms, optimizer_groups, task_state
from km_edge.models import build_base, save_base_weights
from km_edge.pack import task_tensors
from km_edge.methods import build_task_model
from km_edge.train import fit

SIZE = 32
LABELS = ["blue", "red"]


def write_folder(root, per_class: int, seed: int) -> None:
    """Noisy red vs blue squares: trivially learnable, so a test folder is enough to score."""
    rng = np.random.default_rng(seed)
    for label, channel in (("red", 0), ("blue", 2)):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, size=(SIZE, SIZE, 3))
            pixels[..., channel] += 160
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    write_folder(root / "train", 12, 0)
    write_folder(root / "test", 6, 1)
    return root


def trained(config: MethodConfig, colours, steps: int = 4, **fit_options):
    from km_edge.data import load_task_splits, make_loader

    torch.manual_seed(0)
    base = build_base("demo", None, input_size=SIZE)
    before = {k: v.clone() for k, v in base.backbone.state_dict().items()}
    splits = load_task_splits(colours, 0)
    model = build_task_model(base, 2, config, 0)
    loader = make_loader(splits.train, base.preprocess, 8, True, 0)
    fit(model, config, loader, make_loader(splits.val, base.preprocess, 64, False), epochs=1, max_steps=steps,
        lr=3e-2, head_lr=3e-2, progress=False, **fit_options)
    return model, before


def bn_tensors(model, prefix="backbone."):
    state = model.state_dict()
    names = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    return {t: [state[f"{prefix}{n}.{t}"] for n in names] for t in ("weight", "bias", "running_mean", "running_var")}


def test_bias_method_trains_only_the_batchnorm_shifts_and_packs(colours):
    config = MethodConfig(method="bias")
    model, before = trained(config, colours)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert trainable == {f"{n}.bias" for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    after = bn_tensors(model)
    names = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for i, name in enumerate(names):  # scales and statistics stay the base's
        for t in ("weight", "running_mean", "running_var"):
            assert torch.equal(after[t][i], before[f"{name}.{t}"]), (name, t)
    assert any(not torch.equal(after["bias"][i], before[f"{n}.bias"]) for i, n in enumerate(names))
    assert any(k.endswith(".bias") and k.startswith("backbone.") for k in task_state(model, config))
    # a bias task ships as BatchNorm overrides that the device format accepts
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    tensors = task_tensors(model, config)
    assert len(tensors["bn"]) == len(names) and tensors["layers"] == []
    key = Ed25519PrivateKey.generate()
    body = {"task": "colours", "pack_version": 1, "base_id": "0" * 64, "labels": LABELS,
            "preprocess": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"},
            "method": "bias", "modulator": None, **tensors, "metrics": {}, "trainer": {}}
    pack = read_pack(build_pack(body, key), {pack_key_id(key): key.public_key()})
    assert pack.method == "bias"
    shifted = {e.name: e.tensors["bias"] for e in pack.bn}
    assert np.allclose(shifted[names[0]], after["bias"][0].numpy())


def pack_key_id(key) -> str:
    from device_runtime.keys import key_id

    return key_id(key.public_key())


def test_frozen_bn_statistics_keep_the_base_running_stats_while_affine_trains(colours):
    config = MethodConfig(method="km", train_bn=True, freeze_bn_stats=True)
    model, before = trained(config, colours)
    after = bn_tensors(model)
    names = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for i, name in enumerate(names):
        assert torch.equal(after["running_mean"][i], before[f"{name}.running_mean"])
        assert torch.equal(after["running_var"][i], before[f"{name}.running_var"])
    assert any(not torch.equal(after["weight"][i], before[f"{n}.weight"]) for i, n in enumerate(names))
    # without the freeze the statistics follow the task's data
    moving, before = trained(MethodConfig(method="km", train_bn=True), colours)
    assert not torch.equal(bn_tensors(moving)["running_mean"][0], before[f"{names[0]}.running_mean"])


def test_batchnorm_gets_its_own_learning_rate_group_only_when_asked():
    base = build_base("demo", None, input_size=SIZE)
    model = build_task_model(base, 2, MethodConfig(method="km", train_bn=True), 0)
    bn_ids = {id(p) for bn in batchnorms(model.backbone) for p in bn.parameters()}
    groups = optimizer_groups(model, 1e-3, 1e-2, bn_lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3, 1e-4]
    assert {id(p) for p in groups[2]["params"]} == bn_ids
    assert not bn_ids & {id(p) for p in groups[1]["params"]}
    assert len(optimizer_groups(model, 1e-3, 1e-2)) == 2


def test_train_report_names_the_split_of_each_accuracy(colours, tmp_path):
    from km_edge.config import render_config

    save_base_weights(tmp_path / "bases" / "demo.pth", build_base("demo", None, input_size=SIZE))
    config = render_config("demo", "bases/demo.pth", SIZE, {"colours": {"data": str(colours)}})
    (tmp_path / "km-edge.toml").write_text(config.replace('device = "auto"', 'device = "cpu"'))
    text = run_cli("train", "--task", "colours", "--max-steps", "3", "--epochs", "1", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    line = text.stdout.strip().splitlines()[-1]
    assert "holdout carved from train accuracy" in line and "that split picked the epoch" in line
    assert "test accuracy" in line and "(test folder, 12 images, used for no choice)" in line
    report = json.loads(run_cli("train", "--task", "colours", "--max-steps", "3", "--epochs", "1", "--json",
                                cwd=tmp_path).stdout)
    assert report["val_source"] == "split of train" and report["n_test"] == 12
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert round(report["test_accuracy"] * 12) == pytest.approx(report["test_accuracy"] * 12)


def test_a_bias_pack_runs_on_the_device_runtime_with_the_host_logits(colours, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_runtime.runtime import Runtime
    from km_edge.data import load_task_splits, make_loader
    from km_edge.export import export_base

    torch.manual_seed(0)
    base = build_base("demo", None, input_size=SIZE)
    manifest = export_base(base, tmp_path / "base")  # the frozen base, before its BN shifts train
    config = MethodConfig(method="bias")
    model = build_task_model(base, 2, config, 0)
    splits = load_task_splits(colours, 0)
    fit(model, config, make_loader(splits.train, base.preprocess, 8, True, 0),
        make_loader(splits.val, base.preprocess, 64, False), epochs=1, max_steps=4, lr=3e-2, head_lr=3e-2,
        progress=False)
    key = Ed25519PrivateKey.generate()
    body = {"task": "colours", "pack_version": 1, "base_id": manifest["base_id"], "labels": LABELS,
            "preprocess": manifest["preprocess"], "method": "bias", "modulator": None,
            **task_tensors(model, config), "metrics": {}, "trainer": {}}
    (tmp_path / "colours.kmp").write_bytes(build_pack(body, key))
    runtime = Runtime(tmp_path / "base", {pack_key_id(key): key.public_key()})
    runtime.load_pack(tmp_path / "colours.kmp")
    images = next(iter(make_loader(splits.val, base.preprocess, 64, False)))[0]
    model.eval()
    with torch.no_grad():
        host = model(images).numpy()
    np.testing.assert_allclose(runtime.logits(images.numpy()), host, atol=1e-4)


@pytest.mark.parametrize("steps, body_moves", [(3, False), (5, True)])
def test_a_delayed_body_waits_while_the_head_trains_alone(colours, steps, body_moves):
    from km_edge.data import load_task_splits, make_loader

    torch.manual_seed(0)
    base = build_base("demo", None, input_size=SIZE)
    config = MethodConfig(method="km")
    model = build_task_model(base, 2, config, 0)
    body = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if p.requires_grad}
    head = model.head.weight.detach().clone()
    splits = load_task_splits(colours, 0)
    fit(model, config, make_loader(splits.train, base.preprocess, 4, True, 0),
        make_loader(splits.val, base.preprocess, 64, False), epochs=1, max_steps=steps, lr=3e-2, head_lr=3e-2,
        body_delay_steps=3, progress=False)
    assert not torch.equal(model.head.weight, head)
    moved = [n for n, p in model.backbone.named_parameters() if p.requires_grad and not torch.equal(p, body[n])]
    assert bool(moved) is body_moves, [(n, float((dict(model.backbone.named_parameters())[n] - body[n]).abs().max())) for n in moved][:3]
