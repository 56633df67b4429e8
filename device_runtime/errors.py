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


class PackLimitError(MalformedPackError):
    """A field of a pack (signed or not) is outside a documented limit, in the format
    (device_runtime.pack.limits) or against the base (device_runtime.limits, sizes and work);
    every limit is listed in packs/README.md."""


class ExpiredPackError(PackError):
    """The pack's own ``expires`` time has passed."""


class UnknownFormatError(PackError):
    """The pack declares a format version this runtime does not read."""


class BadSignatureError(PackError):
    """The Ed25519 signature does not match the pack's bytes (tampered or corrupt)."""


class UntrustedKeyError(PackError):
    """The pack was signed by a key that is not among the trusted public keys."""


class RevokedKeyError(UntrustedKeyError):
    """The pack's signing key is on the device's revocation list."""


class KeyWindowError(UntrustedKeyError):
    """The signing key is trusted only in a window (not_before, expires) that excludes now or the
    pack's creation time."""


class BaseMismatchError(PackError):
    """The pack was made for another frozen base (its base_id differs)."""


class ShapeMismatchError(PackError):
    """A tensor or layer in the pack disagrees with the base manifest."""


class DowngradeError(PackError):
    """A pack older than one already loaded for the same task."""


class RollbackError(DowngradeError):
    """A pack older than the version this device recorded as accepted (persistent state)."""


class NotNewerError(PackError):
    """A hot update whose version is not above the version being served (equal or older)."""


class NonFiniteError(PackError):
    """A pack's rebuilt kernels or its scores are not finite (NaN or infinity)."""


# --- bases, keys, images, data, config ------------------------------------------------------
class BaseError(KmEdgeError):
    """The exported base directory is missing, incomplete or inconsistent."""


class KeyFileError(KmEdgeError):
    """A signing or public key file is missing, unreadable or would be overwritten."""


class ImageError(KmEdgeError):
    """An input image cannot be read or decoded."""


class DataError(KmEdgeError):
    """A dataset folder is missing, empty or malformed."""


class StateError(KmEdgeError):
    """The device's anti-rollback state file is unreadable, corrupt or cannot be written."""


class ConfigError(KmEdgeError):
    """km-edge.toml or a flag asks for something that does not exist."""


class OutputError(KmEdgeError):
    """An output file or folder cannot be written (permissions, a file in the way, disk full)."""


class CheckpointError(KmEdgeError):
    """A task checkpoint or base weights file is missing or does not fit the model."""


class ProviderError(KmEdgeError):
    """An onnxruntime execution provider (cuda, tensorrt) was asked for but cannot run here."""
