"""Every refusal km-edge makes, as one small hierarchy.

The CLI catches `KmEdgeError` and prints its message as one line with exit code 2 (bad input);
anything else escaping is an internal failure (exit 1). Subclasses name the exact refusal so tests
and callers can tell a tampered pack from a pack for another base.

A message names the file or value it refuses. Where the way out is the same for every message of a
class, it is written once, in :data:`REMEDIES` (the class's ``remedy``): the CLI appends it to a
message that does not already name a flag, an environment variable or a command
(:func:`with_remedy`).
"""

REMEDY_MARKERS = ("--", "KM_EDGE_", "`km-edge ")  # a flag, a variable, a `command`


class KmEdgeError(Exception):
    """Base of every error caused by the user's input (files, flags, data)."""

    remedy = ""  # the way out shared by every message of the class ("" where each message says its own)


def with_remedy(exc: KmEdgeError) -> str:
    """``exc``'s message, followed by its class's remedy unless the message already names a flag, an
    environment variable or a command (one of ``REMEDY_MARKERS``)."""
    message = str(exc)
    remedy = getattr(exc, "remedy", "")
    if remedy and not any(marker in message for marker in REMEDY_MARKERS):
        message = f"{message}; {remedy}"
    return message


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


# --- the way out of each refusal -------------------------------------------------------------
# One table, so every remedy a user can be shown reads in one place; with_remedy appends a class's
# remedy (inherited by its subclasses) to a message that does not already name a way out.
REMEDIES: dict[type[KmEdgeError], str] = {
    MalformedPackError: "copy the pack from the host again, or rebuild it there with `km-edge pack --task TASK`",
    ExpiredPackError: "make a new pack on the host: `km-edge pack --task TASK` (with a later --expires, or none)",
    UnknownFormatError: "rebuild it on the host with this version: `km-edge pack --task TASK`",
    BadSignatureError: "copy the pack from the host again, or rebuild it there with `km-edge pack --task TASK`",
    UntrustedKeyError: (
        "trust the signer's public key here with --pubkey FILE (or KM_EDGE_PUBKEY) or a trust file "
        "(--trust), or sign the pack on the host with a trusted key: `km-edge pack --task TASK --key NAME`"
    ),
    RevokedKeyError: (
        "sign the pack again on the host with a key that is not revoked: "
        "`km-edge pack --task TASK --key NAME`"
    ),
    KeyWindowError: (
        "sign the pack again with a key valid now (`km-edge pack --task TASK --key NAME`), or correct the "
        "window in the trust file (--trust) or this device's clock"
    ),
    BaseMismatchError: (
        "point --base (or KM_EDGE_BASE) at the base the pack was made for, or pack the task for this "
        "base on the host: `km-edge pack --task TASK --retrain`"
    ),
    ShapeMismatchError: (
        "the pack does not fit this base: point --base (or KM_EDGE_BASE) at the base it was made for, or "
        "pack the task for this base on the host: `km-edge pack --task TASK --retrain`"
    ),
    DowngradeError: (
        "use the newest pack of the task, or pack it on the host with a higher version: "
        "`km-edge pack --task TASK --version N`"
    ),
    NotNewerError: "pack the task on the host with a higher version: `km-edge pack --task TASK --version N`",
    NonFiniteError: "train the task again on the host: `km-edge pack --task TASK --retrain`",
    BaseError: (
        "export the base on the host with `km-edge export-base`, copy the whole base/ folder here, and "
        "point --base (or KM_EDGE_BASE) at it"
    ),
    KeyFileError: (
        "make a key pair on the host with `km-edge keygen`; a device trusts its .pub file (--pubkey or "
        "KM_EDGE_PUBKEY) or a trust file (--trust)"
    ),
    DataError: (
        "an image folder holds one subfolder of images per class, DIR/<class>/<image>; a task's data "
        "folder holds train/ (and val/, test/) such folders (`km-edge demo-data DIR` writes examples)"
    ),
    StateError: "point --state (or KM_EDGE_STATE) at the right state file",
    CheckpointError: "train the task again: `km-edge train --task TASK`",
    ProviderError: "run on the CPU with --provider cpu (or KM_EDGE_PROVIDER=cpu)",
}
for _error, _remedy in REMEDIES.items():
    _error.remedy = _remedy
del _error, _remedy
