"""The task pack format (``*.kmp``), version 2; the specification is ``packs/README.md``.

One module per job: ``limits`` (every bound, once), ``codec`` (strict msgpack and value checks),
``tensors`` (the tensor index and the data blob), ``records`` (the body as typed records, each
validating itself for writer and reader alike), ``trust`` (which keys a device accepts, when),
``envelope`` (the signed container and key judgement) and ``packfile`` (the order of the checks, file reading and atomic writing). Which
packs to trust beyond that (base id, shapes against the base, rollbacks) is the Runtime's call.
"""

from .envelope import Envelope, seal
from .limits import FORMAT_VERSION, MAGIC, MAX_PACK_BYTES, STORAGE_DTYPES
from .packfile import build_pack, parse_body, read_pack, read_pack_file, write_pack
from .records import BN_TENSORS, HEAD_TENSORS, METHODS, BnEntry, Layer, Pack
from .tensors import TensorEntry, decode_tensors, encode_tensors
from .trust import TrustedKey, load_trust

__all__ = [
    "BN_TENSORS", "FORMAT_VERSION", "HEAD_TENSORS", "MAGIC", "MAX_PACK_BYTES", "METHODS",
    "STORAGE_DTYPES", "BnEntry", "Envelope", "Layer", "Pack", "TensorEntry", "TrustedKey", "build_pack",
    "decode_tensors", "encode_tensors", "load_trust", "parse_body", "read_pack", "read_pack_file", "seal",
    "write_pack",
]
