"""Every refusal km-edge makes, as one small hierarchy.

The CLI catches `KmEdgeError` and prints its message as one line with exit code 2 (bad input);
anything else escaping is an internal failure (exit 1). Subclasses name the exact refusal so tests
and callers can tell a tampered pack from a pack for another base.
"""


class KmEdgeError(Exception):
    """Base of every error caused by the user's input (files, flags, data)."""


# --- task packs -----------------------------------------------------------------------------
class PackError(KmEdgeError):
    """A task pack is refused; nothing of it is used."""


class MalformedPackError(PackError):
    """Not a pack at all: empty, truncated, not msgpack, wrong magic or missing fields."""


class UnknownFormatError(PackError):
    """The pack declares a format version this runtime does not read."""


class BadSignatureError(PackError):
    """The Ed25519 signature does not match the pack's bytes (tampered or corrupt)."""


class UntrustedKeyError(PackError):
    """The pack was signed by a key that is not among the trusted public keys."""


class BaseMismatchError(PackError):
    """The pack was made for another frozen base (its base_id differs)."""


class ShapeMismatchError(PackError):
    """A tensor or layer in the pack disagrees with the base manifest."""


class DowngradeError(PackError):
    """A pack older than one already loaded for the same task."""


# --- bases, keys, images, data, config ------------------------------------------------------
class BaseError(KmEdgeError):
    """The exported base directory is missing, incomplete or inconsistent."""


class KeyFileError(KmEdgeError):
    """A signing or public key file is missing, unreadable or would be overwritten."""


class ImageError(KmEdgeError):
    """An input image cannot be read or decoded."""


class DataError(KmEdgeError):
    """A dataset folder is missing, empty or malformed."""


class ConfigError(KmEdgeError):
    """km-edge.toml or a flag asks for something that does not exist."""


class CheckpointError(KmEdgeError):
    """A task checkpoint or base weights file is missing or does not fit the model."""


class ProviderError(KmEdgeError):
    """An onnxruntime execution provider (cuda, tensorrt) was asked for but cannot run here."""
