"""Execution providers: ``--provider cpu|cuda|tensorrt|auto`` (and KM_EDGE_PROVIDER) on the device
commands and in ``Runtime``. Without a GPU, cuda and tensorrt are refused with one line (exit 2);
auto resolves to the CPU and predicts exactly what ``cpu`` does. The CUDA parity test runs only
where onnxruntime offers the CUDA provider.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_device_runtime import device_folder, make_pack, random_images

from device_runtime.backends import ORT_PROVIDERS, ProviderConfig, make_backend, resolve_provider
from device_runtime.errors import KmEdgeError, ProviderError
from device_runtime.keys import load_trusted_keys
from device_runtime.runtime import Runtime

KM_EDGE = str(Path(sys.executable).with_name("km-edge"))
AVAILABLE = ort.get_available_providers()
HAS_CUDA = "CUDAExecutionProvider" in AVAILABLE
HAS_TENSORRT = "TensorrtExecutionProvider" in AVAILABLE


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("providers")
    pack = make_pack(root / "task.kmp", *device_folder(root))
    images = []
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return root, pack, images


def cli(root, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "KM_EDGE_PROVIDER"}
    full_env.update(env or {})
    return subprocess.run([KM_EDGE, *map(str, args)], cwd=root, capture_output=True, text=True, env=full_env)


def test_auto_takes_the_best_available_provider():
    expected = "tensorrt" if HAS_TENSORRT else "cuda" if HAS_CUDA else "cpu"
    assert resolve_provider("auto") == expected
    assert resolve_provider(None) == "cpu" and resolve_provider("CPU") == "cpu"
    with pytest.raises(ProviderError, match="one of"):
        resolve_provider("npu")


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime offers CUDA")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_gpu_is_a_clear_refusal(project, provider):
    root, pack, images = project
    with pytest.raises(ProviderError) as caught:
        Runtime(root / "base", load_trusted_keys([root / "keys" / "signing.pub"]), provider=provider)
    assert isinstance(caught.value, KmEdgeError) and provider in str(caught.value)
    assert "--provider cpu" in str(caught.value)
    for command in (["run", "--pack", pack, *images], ["eval", "--pack", pack, root],
                    ["bench", "--pack", pack]):
        result = cli(root, *command, "--provider", provider)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("km-edge: error:") and provider in lines[0]
    result = cli(root, "run", "--pack", pack, *images, env={"KM_EDGE_PROVIDER": provider})  # the env var
    assert result.returncode == 2 and provider in result.stderr


def test_cpu_and_auto_predict_the_same(project):
    root, pack, images = project
    outputs = {}
    for provider in ("cpu", "auto"):
        result = cli(root, "run", "--pack", pack, *images, "--provider", provider, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["provider"] == resolve_provider(provider)
        outputs[provider] = report["predictions"]
    if not HAS_CUDA:
        assert outputs["auto"] == outputs["cpu"]
    result = cli(root, "run", "--pack", pack, *images, "--json", env={"KM_EDGE_PROVIDER": "auto"})
    assert result.returncode == 0 and json.loads(result.stdout)["provider"] == resolve_provider("auto")


def test_tensorrt_options_cache_engines_per_pack(tmp_path):
    config = ProviderConfig("cpu", trt_fp16=True, trt_cache_dir=tmp_path)
    config.name = "tensorrt"  # the option wiring, independent of whether TensorRT is installed
    chain = config.for_key("pack1-base1").ort_providers()
    name, options = chain[0]
    assert name == ORT_PROVIDERS["tensorrt"] and chain[1:] == [ORT_PROVIDERS["cuda"], ORT_PROVIDERS["cpu"]]
    assert options["trt_fp16_enable"] is True and options["trt_engine_cache_enable"] is True
    assert Path(options["trt_engine_cache_path"]) == tmp_path / "pack1-base1"
    other = config.for_key("pack2-base1").ort_providers()[0][1]
    assert other["trt_engine_cache_path"] != options["trt_engine_cache_path"]
    assert ProviderConfig("cpu").ort_providers() == [ORT_PROVIDERS["cpu"]]


def test_runtime_keys_the_engine_cache_by_pack_and_base(project):
    root, pack, _ = project
    runtime = Runtime(root / "base", load_trusted_keys([root / "keys" / "signing.pub"]))
    loaded = runtime.load_pack(pack)
    key = loaded.backend.provider.cache_key
    assert key == f"{loaded.sha256[:16]}-{runtime.base.base_id[:16]}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device (not run here)")
def test_cuda_logits_match_the_cpu(project):
    root, pack, _ = project
    trusted = load_trusted_keys([root / "keys" / "signing.pub"])
    images = random_images(4)
    logits = {}
    for provider in ("cpu", "cuda"):
        runtime = Runtime(root / "base", trusted, provider=provider)
        runtime.load_pack(pack)
        logits[provider] = runtime.logits(images)
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], atol=1e-3, rtol=1e-3)
    assert make_backend("ort", root / "base" / "base.onnx", {}, provider="cuda").session.get_providers()[0] == \
        "CUDAExecutionProvider"


def test_cli_offers_exactly_the_runtime_providers():
    import click

    from device_runtime.backends import PROVIDERS
    from km_edge.cli import provider_options

    @click.command()
    @provider_options[0]
    def probe(provider):
        pass

    choice = next(p for p in probe.params if p.name == "provider").type
    assert tuple(choice.choices) == PROVIDERS
