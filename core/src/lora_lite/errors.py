"""Typed errors. Every message says what happened and what to do about it."""

from __future__ import annotations


class LoraLiteError(Exception):
    """Base class of every error lora-lite raises on purpose."""


class ConfigError(LoraLiteError, ValueError):
    """A config field or variant knob is unknown, of the wrong type or out of range."""


class UnknownVariantError(LoraLiteError, KeyError):
    """The requested variant is not installed or registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PluginError(LoraLiteError):
    """A variant plugin is malformed (missing name, bad hook signature, missing hooks)."""


class TargetingError(LoraLiteError):
    """No layer matched the targeting rules, or a filter is malformed."""


class AttachError(LoraLiteError):
    """Attaching failed; the model was rolled back to what it was before."""


class AlreadyAttachedError(AttachError):
    """A target layer already carries an adapter."""


class NotAttachedError(LoraLiteError):
    """detach/save was called on a model that carries no adapter."""


class WeightAccessError(LoraLiteError):
    """A layer's dense weight cannot be read or written (unknown kind, quantized storage)."""


class CalibrationError(LoraLiteError):
    """Calibration data is missing, empty or not finite."""


class CheckpointError(LoraLiteError):
    """A checkpoint cannot be written or read, or it does not fit the model it is loaded into."""


class CheckpointFormatError(CheckpointError):
    """The file is not a lora-lite safetensors checkpoint (corrupt, truncated, pickle, empty)."""


class CheckpointMismatchError(CheckpointError):
    """Keys, shapes, dtypes, targets or base weights differ between the file and the model."""


class MergeError(LoraLiteError):
    """A merge or unmerge cannot be done (no merge hook, quantized storage, already merged, not merged)."""


class ForwardError(LoraLiteError):
    """An adapted layer was called in a way the adapter cannot handle."""


class PeftInteropError(LoraLiteError):
    """An adapter cannot be converted to or from PEFT's format without changing its math."""


class MissingDependencyError(LoraLiteError, ImportError):
    """An optional dependency (transformers, matplotlib, tqdm, ...) is not installed."""


class ModelLoadError(LoraLiteError):
    """A base model could not be loaded (no such path, not cached while offline, bad files)."""


def add_context(err: LoraLiteError, context: str) -> LoraLiteError:
    """Prefix ``err``'s message with ``context`` (which target, which file), keeping its type."""
    if err.args and isinstance(err.args[0], str) and not err.args[0].startswith(context):
        err.args = (f"{context}: {err.args[0]}", *err.args[1:])
    return err
