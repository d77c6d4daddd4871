"""Typed errors. Every message says what happened, why, and what to do about it.

All IdGlow errors derive from :class:`IdGlowError`; each also derives from the closest builtin
(``ValueError``, ``FileNotFoundError``, ...) so that callers who catch builtins keep working.
"""
from __future__ import annotations


class IdGlowError(Exception):
    """Base class of every error IdGlow raises on purpose."""


class InputError(IdGlowError, ValueError):
    """An argument or a piece of user data is malformed (wrong shape, range, type, option)."""


class ImageReadError(IdGlowError, ValueError):
    """A file could not be read as an image."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than IdGlow accepts (``idglow_core.images.MAX_IMAGE_PIXELS``)."""


class OutputError(IdGlowError, OSError):
    """An output folder or file cannot be written, or holds results that must not be replaced."""


class NoFaceError(IdGlowError, ValueError):
    """No face was found where one is required (a reference image, a training target)."""


class ModelNotFoundError(IdGlowError, FileNotFoundError):
    """Model files are missing from the folder where they were looked for."""


class ModelFormatError(IdGlowError, ValueError):
    """A model file exists but its contents are not what IdGlow expects."""


class IncompatibleAdapterError(IdGlowError, ValueError):
    """An adapter file does not fit the model it is being loaded into."""


class ManifestError(IdGlowError, ValueError):
    """A JSONL manifest (evaluation, training, preference data) has bad or missing entries."""


class ConfigError(IdGlowError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class DependencyError(IdGlowError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class TrainingDivergedError(IdGlowError, RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing non-finite was saved."""


class CheckpointWriteError(IdGlowError, OSError):
    """A checkpoint or the final weights could not be written (full disk, read-only folder); the previous
    checkpoint is intact."""


class ServerError(IdGlowError, RuntimeError):
    """A server IdGlow talks to (a ComfyUI instance over HTTP) refused a request or reported a failure."""
