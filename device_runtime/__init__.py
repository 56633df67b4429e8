"""km-edge device runtime: verify signed task packs, rebuild modulated kernels, infer.

Everything a Jetson or Raspberry Pi needs, without torch: the pack format, the KM math in numpy,
base loading, onnxruntime / onnx.reference backends, preprocessing and the pack-switching Runtime.
"""

from .errors import KmEdgeError, PackError
from .runtime import LoadedPack, Runtime

__all__ = ["KmEdgeError", "LoadedPack", "PackError", "Runtime"]
