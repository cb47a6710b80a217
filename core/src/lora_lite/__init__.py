"""lora-lite: LoRA-family adapters on forward hooks, variants as plugins.

    import torch, lora_lite as ll
    cfg = ll.LoraLiteConfig(variant="lora", r=8, alpha=16, dtype=torch.bfloat16)
    handles = ll.attach(model, cfg)
    ll.save(model, "adapter.safetensors"); ll.detach(model); ll.load(model, "adapter.safetensors")
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .checkpoint import load, read_checkpoint, save
from .config import ROLES, LoraLiteConfig
from .errors import (
    AlreadyAttachedError,
    AttachError,
    CalibrationError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    ConfigError,
    ForwardError,
    LoraLiteError,
    MergeError,
    MissingDependencyError,
    ModelLoadError,
    NotAttachedError,
    PeftInteropError,
    PluginError,
    TargetingError,
    UnknownVariantError,
    WeightAccessError,
)
from .calibration import run_calibration, run_model_on
from .functional import low_rank_update
from .merging import merge, merge_and_unload, save_merged, unmerge
from .hookspecs import hookimpl, hookspec
from .params import ParamSpec
from .integrations.peft import LoraExport, PeftFormat, export_peft, import_peft
from .plugins import broken_plugins, get_variant, list_variants, register, reload_plugins, unregister
from .runtime import Attachment, adapter_batch, attach, attachments, detach, regularization_loss, set_active, step
from .targeting import Target, find_targets
from .weights import (
    LayerKind,
    dense_weight,
    is_quantized,
    layer_kind,
    kind_name,
    layer_kinds,
    original_weight,
    register_layer_kind,
    replace_dense_weight,
    unregister_layer_kind,
)

try:
    __version__ = _version("lora-lite-core")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "run_calibration", "run_model_on",
    "AlreadyAttachedError", "AttachError", "Attachment", "CalibrationError", "CheckpointError",
    "CheckpointFormatError", "CheckpointMismatchError", "ConfigError", "ForwardError", "LayerKind", "LoraExport",
    "LoraLiteConfig", "LoraLiteError", "MergeError", "MissingDependencyError", "ModelLoadError",
    "NotAttachedError", "ParamSpec", "PeftFormat", "PeftInteropError", "PluginError", "ROLES", "Target", "TargetingError",
    "UnknownVariantError", "WeightAccessError", "adapter_batch", "attach", "attachments", "broken_plugins", "dense_weight",
    "detach", "export_peft", "find_targets", "get_variant", "hookimpl", "hookspec", "import_peft",
    "is_quantized", "kind_name", "layer_kind", "layer_kinds", "list_variants", "load", "low_rank_update",
    "merge", "merge_and_unload", "original_weight", "read_checkpoint", "register", "register_layer_kind",
    "regularization_loss", "reload_plugins", "replace_dense_weight", "save", "save_merged", "set_active", "step", "unmerge", "unregister",
    "unregister_layer_kind", "__version__",
]
