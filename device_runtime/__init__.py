"""km-edge device runtime: verify signed task packs, rebuild modulated kernels, infer.

Everything a Jetson or Raspberry Pi needs, without torch: the pack format, the KM math in numpy,
base loading, onnxruntime / onnx.reference backends, preprocessing and the pack-switching Runtime.

Importing the package (or ``device_runtime.errors`` / ``device_runtime.km``, which every host
process does) stays cheap: onnxruntime, onnx and Pillow load only when ``Runtime`` is first used.
"""

from .errors import KmEdgeError, PackError

__all__ = ["KmEdgeError", "LoadedPack", "PackError", "Runtime"]


def __getattr__(name: str):
    if name in ("LoadedPack", "Runtime"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'device_runtime' has no attribute {name!r}")
