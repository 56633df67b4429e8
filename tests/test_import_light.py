"""Every host process imports device_runtime.errors and device_runtime.km (and the CLI imports the
settings schema): those imports must not drag in onnxruntime, onnx or Pillow (about 330 ms), nor
torch. A fresh interpreter per case, so nothing imported by the test session can hide a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "onnx", "PIL", "torch")


def _heavy_modules_after(statement: str) -> list[str]:
    probe = f"import json, sys; {statement}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("statement", [
    "import device_runtime",
    "import device_runtime.errors",
    "import device_runtime.km",
    "from device_runtime import KmEdgeError, PackError",
    "import km_edge.options, km_edge.config",
    "import km_edge.cli",
])
def test_light_imports_load_no_inference_stack(statement):
    assert _heavy_modules_after(statement) == []


def test_runtime_is_still_reachable_from_the_package():
    """The lazy attribute really loads the runtime (and never torch)."""
    loaded = _heavy_modules_after("from device_runtime import Runtime")
    assert "onnxruntime" in loaded and "torch" not in loaded
