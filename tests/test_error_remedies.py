"""Every refusal a user meets names the file or value and says the way out.

Each case below triggers one user-facing error through the `km-edge` CLI, as a user would (a
missing key, a missing base, a pack for another base, an untrusted, revoked or expired key, a
malformed or tampered pack, a bad image, a bad config key, a bad task name, a rollback, a
checkpoint for another base, ...), and checks the answer: exit code 2, exactly one
`km-edge: error:` line and no traceback, the file or value named, and the way out named: a flag,
an environment variable or a command (``REMEDY``), plus the words the case expects. Refusals with no
flag or command to offer are listed in ``NO_COMMAND_REMEDY`` with what their message offers instead
(the valid keys or choices, the layout a folder needs); an unreadable image in `run` is named with
its reason while the other images are still predicted.

The device cases run on a random `demo` base exported once for this module and on head-only packs
signed here (the pack format does not care how the head was trained); host cases use small project
folders made per case. Message texts live with the code that raises them; the class-wide ways out
are ``remedy`` attributes in ``device_runtime/errors.py``, appended by the CLI.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest

from conftest import run_cli

REMEDY = ("--", "KM_EDGE_", "`km-edge ")  # a flag, an environment variable, a `command`


@dataclass
class World:
    root: Path
    base: Path
    keys: Path
    manifest: dict
    device: Path  # base/, keys/signing.pub, the packs and images every device case uses


def _body(manifest: dict, **changes) -> dict:
    features = manifest["feature_size"]
    body = {
        "task": "birds", "pack_version": 3, "base_id": manifest["base_id"], "labels": ["finch", "robin"],
        "preprocess": manifest["preprocess"], "method": "head", "modulator": None, "layers": [],
        "head": {"weight": np.full((2, features), 0.01, np.float32), "bias": np.zeros(2, np.float32)},
        "bn": [], "metrics": {}, "trainer": {},
    }
    body.update(changes)
    return body


def _resigned(data: bytes, private_key, **body_changes) -> bytes:
    """The pack's body with fields replaced, signed again: a validly signed pack no writer makes."""
    from device_runtime.pack import seal
    from device_runtime.pack.codec import pack_canonical

    envelope = msgpack.unpackb(data, raw=False)
    body = msgpack.unpackb(envelope["payload"], raw=False)
    body.update(body_changes)
    return seal(pack_canonical(body), private_key)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from PIL import Image

    from device_runtime.keys import generate_keypair, load_private_key
    from device_runtime.pack import build_pack, seal
    from km_edge.export import export_base
    from km_edge.models import build_base

    root = tmp_path_factory.mktemp("remedies")
    base = root / "host" / "base"
    export_base(build_base("demo", None, input_size=32), base)
    keys = root / "host" / "keys"
    generate_keypair(keys)
    generate_keypair(keys, name="other")
    manifest = json.loads((base / "manifest.json").read_text())
    signing, other = load_private_key(keys / "signing.key"), load_private_key(keys / "other.key")

    device = root / "device"
    shutil.copytree(base, device / "base")
    (device / "keys").mkdir()
    shutil.copy(keys / "signing.pub", device / "keys" / "signing.pub")
    good = build_pack(_body(manifest), signing)
    packs = {
        "good.kmp": good,
        "other-base.kmp": build_pack(_body(manifest, base_id="ab" * 32), signing),
        "wrong-shape.kmp": build_pack(_body(manifest, head={
            "weight": np.zeros((2, manifest["feature_size"] + 1), np.float32),
            "bias": np.zeros(2, np.float32)}), signing),
        "untrusted.kmp": build_pack(_body(manifest), other),
        "expired.kmp": build_pack(_body(manifest, created="2020-01-01T00:00:00Z",
                                        expires="2021-01-01T00:00:00Z"), signing),
        "garbage.kmp": b"this is not a pack\n",
        "empty.kmp": b"",
        "tampered.kmp": good[:-1] + bytes([good[-1] ^ 1]),
        "format1.kmp": seal(msgpack.unpackb(good, raw=False)["payload"], signing, format_version=1),
        "empty-preprocess.kmp": _resigned(good, signing, preprocess={}),
        "local-time.kmp": _resigned(good, signing, created="2026-11-28T09:00:00+05:00"),
    }
    for name, data in packs.items():
        (device / name).write_bytes(data)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(device / "photo.png")
    (device / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for label in ("finch", "zzz"):
        (device / "labelled" / label).mkdir(parents=True)
        shutil.copy(device / "photo.png", device / "labelled" / label / "one.png")
    return World(root, base, keys, manifest, device)


def _key_id(world: World) -> str:
    from device_runtime.keys import key_id, load_public_key

    return key_id(load_public_key(world.keys / "signing.pub"))


def _folder(world: World, name: str) -> Path:
    folder = world.root / "cases" / name
    folder.mkdir(parents=True)
    return folder


def _host_project(world: World, name: str, *, base: bool = False, keys: bool = False,
                  data: bool = True, toml: str = "") -> Path:
    """A host project folder: km-edge.toml on the demo base, data/birds/, optionally base/ and keys/."""
    project = _folder(world, name)
    (project / "km-edge.toml").write_text('[base]\narch = "demo"\nweights = "none"\ninput_size = 32\n' + toml)
    if data:
        (project / "data" / "birds").mkdir(parents=True)
    if base:
        shutil.copytree(world.base, project / "base")
    if keys:
        shutil.copytree(world.keys, project / "keys")
    return project


# --- the cases: name -> (world -> (working folder, arguments, words the message must hold)) ----------------
def case_missing_public_key(world):
    folder = _folder(world, "no-key")
    shutil.copy(world.device / "good.kmp", folder / "good.kmp")
    return folder, ["verify", "good.kmp"], ["signing.pub", "--pubkey", "KM_EDGE_PUBKEY"]


def case_private_key_given_as_public(world):
    return world.device, ["verify", "good.kmp", "--pubkey", str(world.keys / "signing.key")], \
        ["signing.key", "public key", "--pubkey"]


def case_missing_base(world):
    folder = _folder(world, "no-base")
    shutil.copytree(world.device / "keys", folder / "keys")
    shutil.copy(world.device / "good.kmp", folder / "good.kmp")
    shutil.copy(world.device / "photo.png", folder / "photo.png")
    return folder, ["run", "--pack", "good.kmp", "photo.png"], \
        ["manifest.json", "`km-edge export-base`", "--base", "KM_EDGE_BASE"]


def case_pack_for_another_base(world):
    return world.device, ["verify", "other-base.kmp"], ["other-base.kmp", "made for base", "--base", "--retrain"]


def case_pack_that_does_not_fit_the_base(world):
    return world.device, ["run", "--pack", "wrong-shape.kmp", "photo.png"], \
        ["wrong-shape.kmp", "head weight", "--base", "--retrain"]


def case_untrusted_key(world):
    return world.device, ["verify", "untrusted.kmp"], ["untrusted.kmp", "not trusted", "--pubkey", "KM_EDGE_PUBKEY"]


def case_revoked_key(world):
    revoked = world.device / "revoked.json"
    revoked.write_text(json.dumps({"revoked": [{"key_id": _key_id(world), "reason": "laptop stolen"}]}))
    return world.device, ["verify", "good.kmp", "--revoked", str(revoked)], \
        ["good.kmp", "revoked", "laptop stolen", "--key"]


def case_key_past_its_window(world):
    trust = world.device / "trust-expired.json"
    trust.write_text(json.dumps({"keys": [{"public_key": "keys/signing.pub", "expires": "2021-01-01T00:00:00Z"}]}))
    return world.device, ["verify", "good.kmp", "--trust", str(trust)], ["good.kmp", "expired at", "--key", "--trust"]


def case_unreadable_trust_file(world):
    trust = world.device / "trust-broken.json"
    trust.write_text("{not json")
    return world.device, ["verify", "good.kmp", "--trust", str(trust)], ["trust-broken.json", "--trust"]


def case_expired_pack(world):
    return world.device, ["verify", "expired.kmp"], ["expired.kmp", "expired at", "`km-edge pack", "--expires"]


def case_not_a_pack(world):
    return world.device, ["run", "--pack", "garbage.kmp", "photo.png"], ["garbage.kmp", "not a km-edge pack",
                                                                         "`km-edge pack"]


def case_empty_pack(world):
    return world.device, ["verify", "empty.kmp"], ["empty.kmp", "empty", "`km-edge pack"]


def case_missing_pack(world):
    return world.device, ["verify", "nosuch.kmp"], ["nosuch.kmp", "no such file", "`km-edge pack"]


def case_tampered_pack(world):
    return world.device, ["verify", "tampered.kmp"], ["tampered.kmp", "signature", "`km-edge pack"]


def case_old_format(world):
    return world.device, ["verify", "format1.kmp"], ["format1.kmp", "format version 1", "`km-edge pack"]


def case_signed_pack_with_empty_preprocess(world):
    """`preprocess: {}` is refused even when validly signed (issue 15)."""
    return world.device, ["verify", "empty-preprocess.kmp"], ["empty-preprocess.kmp", "preprocess", "`km-edge pack"]


def case_signed_pack_with_a_local_time(world):
    """`created` must be a UTC time spelled YYYY-MM-DDTHH:MM:SSZ, not any ISO string (issue 15)."""
    return world.device, ["verify", "local-time.kmp"], ["local-time.kmp", "created", "UTC", "`km-edge pack"]


def case_rollback(world):
    state = world.device / "state-ahead.json"
    state.write_text(json.dumps({"format": "km-edge-rollback-state", "format_version": 1,
                                 "highest": {"birds": {_key_id(world): 9}}}))
    return world.device, ["run", "--pack", "good.kmp", "photo.png", "--state", str(state)], \
        ["good.kmp", "version 3", "version 9", "km-edge pack --task birds --version 10"]


def case_corrupt_state(world):
    state = world.device / "state-corrupt.json"
    state.write_text("{")
    return world.device, ["verify", "good.kmp", "--state", str(state)], \
        ["state-corrupt.json", "corrupt", "--state", "KM_EDGE_STATE"]


def case_eval_folder_with_other_labels(world):
    return world.device, ["eval", "--pack", "good.kmp", "labelled"], ["labelled", "zzz", "finch, robin"]


def case_bad_flag_value(world):
    return world.device, ["run", "--pack", "good.kmp", "photo.png", "--top-k", "0"], \
        ["--top-k", "0", "km-edge run --help"]


def case_gpu_provider_missing(world):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: --provider cuda is not refused here")
    return world.device, ["run", "--pack", "good.kmp", "photo.png", "--provider", "cuda"], ["cuda", "--provider cpu"]


# --- host cases -------------------------------------------------------------------------------------------
def case_unknown_config_key(world):
    project = _host_project(world, "config-key", toml="[train]\nepoch = 3\n")
    return project, ["train", "--task", "birds"], ["km-edge.toml", "[train]", "epoch", "known:", "epochs"]


def case_config_value_of_the_wrong_type(world):
    project = _host_project(world, "config-type", toml='[train]\nepochs = "many"\n')
    return project, ["train", "--task", "birds"], ["km-edge.toml", "epochs", "a whole number", "'many'"]


def case_bad_task_name(world):
    project = _host_project(world, "task-name")
    return project, ["train", "--task", "../evil"], ["--task", "../evil", "A-Z a-z 0-9"]


def case_unknown_task(world):
    project = _host_project(world, "task-unknown", data=False)
    return project, ["pack", "--task", "birds"], ["birds", "[tasks.birds]", "data/birds/train/<class>"]


def case_task_data_without_classes(world):
    project = _host_project(world, "task-empty")
    return project, ["train", "--task", "birds"], ["birds", "<class>"]


def case_existing_config(world):
    project = _host_project(world, "init-again")
    return project, ["init", "."], ["km-edge.toml", "--force"]


def case_existing_key_pair(world):
    project = _host_project(world, "keygen-again", keys=True)
    return project, ["keygen"], ["signing.key", "--force"]


def case_bad_expiry_time(world):
    project = _host_project(world, "expires")
    return project, ["pack", "--task", "birds", "--expires", "tomorrow"], ["--expires", "'tomorrow'"]


def case_unreadable_previous_pack(world):
    """`pack` numbers a new pack after the one it replaces; one it cannot read is refused, not
    silently restarted at version 1 (devices would refuse that pack as older) (issue 15)."""
    project = _host_project(world, "previous-pack", keys=True)
    (project / "packs").mkdir()
    (project / "packs" / "birds.kmp").write_bytes(b"not a pack")
    return project, ["pack", "--task", "birds"], ["birds.kmp", "previous pack", "--version"]


def _checkpoint(path: Path, fingerprint: str) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "km-edge-checkpoint", "version": 1, "task": "birds", "method": "head",
                "labels": ["finch", "robin"], "base": {"arch": "demo", "fingerprint": fingerprint}}, path)


def case_checkpoint_for_another_base(world):
    project = _host_project(world, "checkpoint-base", base=True, keys=True)
    _checkpoint(project / "checkpoints" / "birds.pt", "0" * 64)
    return project, ["pack", "--task", "birds"], ["base", "birds", "`km-edge export-base`", "--retrain"]


def case_checkpoint_that_is_not_one(world):
    project = _host_project(world, "checkpoint-garbage", base=True, keys=True)
    (project / "checkpoints").mkdir()
    (project / "checkpoints" / "birds.pt").write_bytes(b"garbage")
    return project, ["pack", "--task", "birds"], ["birds.pt", "not a km-edge checkpoint", "`km-edge train"]


def case_modulators_too_big_for_the_base(world):
    """`pack` refuses, on the host, modulators every device would refuse (hidden > 16 x d)."""
    from km_edge.demodata import write_demo_data

    project = _host_project(world, "too-big", keys=True, data=False,
                            toml='[train]\ndevice = "cpu"\nbatch_size = 8\nmax_steps = 1\n')
    write_demo_data(project / "demo", seed=0, scale=0.2)
    shutil.copytree(project / "demo" / "letters", project / "data" / "birds")
    run_cli("export-base", cwd=project, check=True)
    return project, ["pack", "--task", "birds", "--kernel-hidden", "200"], \
        ["birds.kmp", "hidden size 200", "--kernel-hidden", "--retrain"]


def case_unknown_architecture(world):
    project = _host_project(world, "arch")
    return project, ["export-base", "--arch", "nosuchnet"], ["nosuchnet", "choose one of", "demo"]


def case_unknown_weights(world):
    project = _host_project(world, "weights")
    return project, ["export-base", "--arch", "demo", "--weights", "nosuch"], ["nosuch", "--weights", "none"]


CASES = {name.removeprefix("case_"): case for name, case in globals().items() if name.startswith("case_")}
# refusals whose way out is no flag, variable or command, and what the message offers instead
NO_COMMAND_REMEDY = {
    "eval_folder_with_other_labels": "the pack's labels, which the class folders must be named after",
    "task_data_without_classes": "the folder layout it needs",
    "unknown_config_key": "the known keys of the table",
    "config_value_of_the_wrong_type": "the type and range the key takes",
    "unknown_architecture": "the architectures to choose from",
    "unknown_task": "the [tasks.NAME] table or data folder to add",
}


# cases whose command imports torch (host commands that build or pack): seconds each, so slow
TORCH_CASES = {"unknown_task", "bad_expiry_time", "unreadable_previous_pack", "checkpoint_for_another_base",
               "checkpoint_that_is_not_one", "unknown_architecture", "unknown_weights",
               "modulators_too_big_for_the_base"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TORCH_CASES else n
                                  for n in sorted(CASES)])
def test_refusal_names_the_input_and_the_way_out(world, name):
    cwd, args, words = CASES[name](world)
    ran = run_cli(*args, cwd=cwd)
    assert ran.returncode == 2, (name, ran.returncode, ran.stdout, ran.stderr)
    assert "Traceback" not in ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("km-edge: error: ")]
    assert len(lines) == 1, ran.stderr
    message = lines[0].removeprefix("km-edge: error: ")
    missing = [word for word in words if word not in message]
    assert not missing, f"{name}: {missing} not in: {message}"
    if name not in NO_COMMAND_REMEDY:
        assert any(marker in message for marker in REMEDY), f"{name}: no flag, variable or command in: {message}"


def test_unreadable_images_are_named_with_the_reason_and_the_others_still_predicted(world):
    ran = run_cli("run", "--pack", "good.kmp", "photo.png", "broken.jpg", cwd=world.device)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("km-edge: error: ")]
    assert len(errors) == 1 and errors[0].startswith("km-edge: error: broken.jpg: cannot read image (")
    assert ran.stdout.startswith("photo.png: ")


def test_pack_refusals_start_with_the_file_name(world):
    """packs/README.md section 7: every refusal is one line starting with the file's name."""
    from device_runtime.errors import PackError
    from device_runtime.pack.trust import load_trust
    from device_runtime.runtime import Runtime

    runtime = Runtime(world.device / "base", load_trust([world.device / "keys" / "signing.pub"]))
    refused = 0
    for path in sorted(world.device.glob("*.kmp")):
        if path.name == "good.kmp":
            continue
        with pytest.raises(PackError) as caught:
            runtime.check_pack(path)
        assert str(caught.value).startswith(f"{path.name}: "), str(caught.value)
        refused += 1
    assert refused == 10


def test_every_error_class_the_cli_shows_has_a_way_out_or_says_why_not():
    """A new KmEdgeError subclass must say its way out (``remedy``) or be listed here with the reason
    its messages carry their own."""
    import device_runtime.errors as errors

    own_messages = {
        "KmEdgeError": "the base class",
        "PackError": "abstract: every pack refusal is a subclass",
        "PackLimitError": "inherits MalformedPackError's",
        "ImageError": "the way out is the named image file (its reason is in the message)",
        "ConfigError": "each message names the flag or km-edge.toml key and the valid choices",
        "OutputError": "each message names the path that cannot be written and the OS reason",
    }
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.KmEdgeError)]
    assert len(classes) >= 20
    for cls in classes:
        if cls.__name__ in own_messages:
            continue
        assert cls.remedy and any(marker in cls.remedy for marker in REMEDY), cls.__name__


def test_a_message_that_names_its_way_out_gets_no_second_one():
    from device_runtime.errors import BaseError, UntrustedKeyError, with_remedy

    assert with_remedy(BaseError("base/x: point --base at it")) == "base/x: point --base at it"
    extended = with_remedy(UntrustedKeyError("p.kmp: signed by key 0123456789abcdef, which is not trusted"))
    assert extended.startswith("p.kmp: signed by key") and "--pubkey" in extended and "KM_EDGE_PUBKEY" in extended
