"""save / load: safetensors adapter files that reload exactly or fail loudly.

A file holds every persistent ``lora_*`` tensor under its full module path and, in the
safetensors metadata, one JSON record per attachment: config, variant, plugin
distribution and version, target paths, tensor keys and a fingerprint of each target's
base weight. ``load`` re-attaches each config (no calibration: calibrated choices are in
the tensors), then checks targets, base fingerprint, keys, shapes and dtypes before
copying anything; any failure leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoraLiteConfig
from .errors import CheckpointFormatError, CheckpointMismatchError
from .runtime import Attachment, _state, attach

FORMAT = "lora-lite"
FORMAT_VERSION = 1
# relative tolerance for the base-weight fingerprint (float64 sums; tolerant of
# reduction order across devices, not of a different checkpoint)
FINGERPRINT_RTOL = 1e-6


def _core_version() -> str:
    from . import __version__

    return __version__


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every live adapter on ``model`` to ``path`` (safetensors, any extension), atomically."""
    atts = _state(model).attachments
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for att in atts:
        owned = att.adapter_tensors(persistent_only=True)
        tensors.update({k: v.detach().to("cpu").contiguous() for k, v in owned.items()})
        records.append({
            "variant": att.variant.name,
            "config": att.cfg.to_dict(),
            "plugin_distribution": att.variant.distribution,
            "plugin_version": att.variant.version,
            "targets": att.target_names,
            "keys": sorted(owned),
            "base_fingerprint": att.fingerprint,
        })
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "core_version": _core_version(),
        "adapters": json.dumps(records),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Parse and validate a checkpoint file; return ``(adapter records, tensors)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise CheckpointFormatError(f"{path} is empty; it is not a lora-lite checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        # sniff only what safetensors rejected: a valid file's first bytes are its header
        # length, which may well be 0x80 or "PK"
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise CheckpointFormatError(
                f"{path} looks like a pickle/torch.save file. lora-lite never unpickles (it can execute code); "
                "checkpoints are safetensors written by lora_lite.save."
            ) from None
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}."
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{path} is a safetensors file but not a lora-lite checkpoint (metadata format={metadata.get('format')!r})."
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path} has checkpoint format version {metadata.get('format_version')!r} (written by lora-lite-core "
            f"{metadata.get('core_version')}); this lora-lite-core {_core_version()} reads version {FORMAT_VERSION}. "
            "Install a matching lora-lite-core."
        )
    try:
        records = json.loads(metadata["adapters"])
        if not isinstance(records, list) or not records:
            raise ValueError("no adapter records")
        for rec in records:
            rec["config"], rec["targets"], rec["keys"], rec["base_fingerprint"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointFormatError(f"{path} has malformed lora-lite metadata: {err!r}.") from None
    return records, tensors


def load(model: nn.Module, path: str | os.PathLike) -> list[Attachment]:
    """Attach and fill the adapters saved in ``path``; exact, or an error and an untouched model."""
    records, tensors = read_checkpoint(path)
    done: list[Attachment] = []
    try:
        for rec in records:
            cfg = LoraLiteConfig.from_dict(rec["config"])
            att = attach(model, cfg, _loading=True)
            done.append(att)
            _check_targets(att, rec, path)
        expected = {k: v for att in done for k, v in att.adapter_tensors(persistent_only=True).items()}
        _check_tensors(expected, tensors, path)
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(tensors[key])
    except BaseException:
        for att in reversed(done):
            if att.live:
                att.detach()
        raise
    return done


def _check_targets(att: Attachment, rec: dict[str, Any], path) -> None:
    if att.target_names != list(rec["targets"]):
        saved, now = set(rec["targets"]), set(att.target_names)
        raise CheckpointMismatchError(
            f"{path}: the {att.variant.name} adapter was saved for {len(saved)} target(s) but its config selects "
            f"{len(now)} here; missing here: {sorted(saved - now)[:5]}, extra here: {sorted(now - saved)[:5]}. "
            "Load it into the same architecture it was trained on."
        )
    bad = []
    for name, (s, ss) in rec["base_fingerprint"].items():
        s2, ss2 = att.fingerprint[name]
        if not (math.isclose(s, s2, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6)
                and math.isclose(ss, ss2, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6)):
            bad.append(name)
    if bad:
        raise CheckpointMismatchError(
            f"{path}: the base weights of {len(bad)} target(s) differ from the ones the adapter was trained on "
            f"(first: {bad[0]}). Load it into the same base model (same checkpoint, before any fine-tuning)."
        )


def _check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path}: adapter keys do not match the model. Missing from the file: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; in the file but not in the model: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}."
        )
    for key, param in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointMismatchError(
                f"{path}: {key} has shape {tuple(t.shape)} in the file but {tuple(param.shape)} in the model."
            )
        if t.dtype != param.dtype:
            raise CheckpointMismatchError(
                f"{path}: {key} is {t.dtype} in the file but {param.dtype} in the model; "
                "the file was written with a different dtype setting."
            )

