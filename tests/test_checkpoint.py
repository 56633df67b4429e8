"""The task checkpoint (km_edge.checkpoint): what `km-edge train` writes is what `km-edge pack` restores.

Fast: a KM task model on a random demo base, its modulators set to non-zero values, written and read
back through the checkpoint module alone (no training loop involved).
"""

from __future__ import annotations

import io

import pytest
import torch

from device_runtime.errors import CheckpointError
from km_edge.checkpoint import (
    CHECKPOINT_VERSION,
    load_checkpoint,
    new_checkpoint,
    restore_task_model,
    save_checkpoint,
)
from km_edge.methods import MethodConfig, build_task_model, task_state
from km_edge.models import build_base, save_base_weights

LABELS = ["a", "b", "c"]


def trained_checkpoint(tmp_path) -> tuple[dict, torch.nn.Module]:
    """A KM model whose task tensors differ from a fresh one's, and its checkpoint document."""
    base_file = save_base_weights(tmp_path / "demo.pth", build_base("demo", None, input_size=32))
    base = build_base("demo", str(base_file))
    fingerprint = base.fingerprint()
    config = MethodConfig(method="km", train_bn=True)
    model = build_task_model(base, len(LABELS), config, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    model.eval()
    checkpoint = new_checkpoint(
        task="abc", config=config, labels=LABELS, options={"seed": 0, "lr": None}, base_spec={"arch": "demo",
        "weights": str(base_file)}, base=base, fingerprint=fingerprint, tensors=task_state(model, config),
        val_accuracy=0.5, val_source="split", test_accuracy=None, best_epoch=1, history=[], params={},
    )
    return checkpoint, model


def test_checkpoint_round_trip_restores_the_same_logits(tmp_path):
    checkpoint, model = trained_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path / "checkpoints" / "abc.pt", checkpoint)
    loaded = load_checkpoint(path)
    assert loaded["version"] == CHECKPOINT_VERSION and loaded["labels"] == LABELS
    assert "lr" not in loaded["options"]  # unset options are not recorded
    restored, base, config = restore_task_model(loaded)
    assert config == MethodConfig(method="km", train_bn=True) and base.arch == "demo"
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model(images), rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_version_is_refused_with_the_way_out(tmp_path):
    checkpoint, _ = trained_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path / "old.pt", {**checkpoint, "version": CHECKPOINT_VERSION + 1})
    with pytest.raises(CheckpointError, match=rf"old\.pt: checkpoint version {CHECKPOINT_VERSION + 1} is not {CHECKPOINT_VERSION} \(train the task again"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_a_file_that_is_not_a_checkpoint_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:  # a torch document of another kind
        buffer = io.BytesIO()
        torch.save({"format": "something-else"}, buffer)
        content = buffer.getvalue()
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"x\.pt: not a km-edge checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_says_to_train_first(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no checkpoint \(train the task first\)"):
        load_checkpoint(tmp_path / "nope.pt")


def test_an_unreadable_checkpoint_says_why_not_only_the_exception_kind(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    # the exception's own words follow its kind, on one line
    assert "x.pt: not a km-edge checkpoint (" in message and "Error: " in message and "\n" not in message


def test_tensors_that_do_not_fit_are_refused_naming_the_checkpoint_and_the_way_out(tmp_path):
    checkpoint, _ = trained_checkpoint(tmp_path)
    tensors = dict(checkpoint["tensors"])
    tensors.pop(sorted(tensors)[0])
    with pytest.raises(CheckpointError) as refused:
        restore_task_model({**checkpoint, "tensors": tensors}, where=tmp_path / "abc.pt")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'abc.pt'}: task tensors do not fit the model: missing [")
    assert "`km-edge pack --task abc --retrain`" in message and not message.startswith("'")
