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
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoraLiteConfig
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    ConfigError,
    LoraLiteError,
    NotAttachedError,
    PluginError,
    add_context,
)
from .runtime import DEFAULT_NAME, Attachment, _state, attach_for_load, attachments

FORMAT = "lora-lite"
FORMAT_VERSION = 1
# relative tolerance for the base-weight fingerprint (float64 sums; tolerant of
# reduction order across devices, not of a different checkpoint)
FINGERPRINT_RTOL = 1e-6


def _core_version() -> str:
    from . import __version__

    return __version__


def _is_sharded(t: torch.Tensor) -> bool:
    """A DTensor, e.g. a parameter of a model sharded with FSDP2 ``fully_shard``."""
    return callable(getattr(t, "full_tensor", None))


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU; a DTensor is gathered (a collective every rank must join)."""
    if _is_sharded(t):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def _write_once(sharded: bool, write: Callable[[], Any]) -> None:
    """Gathered sharded state is the same on every rank: rank 0 writes, the others wait for it."""
    if not (sharded and torch.distributed.is_initialized()):
        write()
        return
    try:
        if torch.distributed.get_rank() == 0:
            write()
    finally:
        torch.distributed.barrier()


def save(model: nn.Module, path: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Write every live adapter on ``model`` (or only the attachments called ``names``) to
    ``path`` (safetensors, any extension), atomically.

    On a model sharded with FSDP2 (``fully_shard``) the adapter tensors are DTensors:
    ``save`` gathers them, so every rank must call it (with the same path); rank 0
    writes the file and all ranks return once it is written.
    """
    atts = _state(model).attachments
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - {a.name for a in atts})
        if unknown or not names:
            raise NotAttachedError(
                f"save(names={names}): no attachment named {unknown or 'at all'}; attachments: {[a.name for a in atts]}."
            )
        atts = [a for a in atts if a.name in names]
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    records = []
    sharded = False
    for att in atts:
        owned = att.adapter_tensors(persistent_only=True)
        sharded |= any(_is_sharded(v) for v in owned.values())
        for k, v in owned.items():
            t = _full_cpu(v)
            # safetensors refuses aliased tensors; one tensor shared by several layers
            # (VeRA's saved projections) is written once per key
            ptr = t.untyped_storage().data_ptr()
            tensors[k] = t.clone() if ptr in storages else t
            storages.add(ptr)
        records.append({
            "name": att.name,
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
    _write_once(sharded, lambda: _write_atomically(tensors, metadata, path))
    return path


def _write_atomically(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # created with 0o666 so the umask sets its mode, as for any file open() writes; O_EXCL
        # keeps the unique name ours. safetensors rewrites the file as 0600: put the mode back.
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(
            f"could not write {path}: {type(err).__name__}: {err}. Any previous file at that path is unchanged. "
            "Check free space and write permission there, or save to another path."
        ) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Parse and validate a checkpoint file; return ``(adapter records, tensors)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path} does not exist or is not a file; check the path.")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise CheckpointFormatError(
            f"{path} is empty; it is not a lora-lite checkpoint. Load a file written by lora_lite.save."
        )
    # safetensors: 8-byte little-endian header length, then the JSON header. Its first byte
    # can be 0x80 (a pickle's first byte) or its first two "PK" (a zip's), so sniff for a
    # pickle or torch.save zip only when the JSON header is not where safetensors puts it.
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise CheckpointFormatError(
            f"{path} looks like a pickle/torch.save file. lora-lite never unpickles (it can execute code); "
            "checkpoints are safetensors written by lora_lite.save: load the adapter the way it was written and "
            "re-save it with lora_lite.save."
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointFormatError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}. "
            "Save it again with lora_lite.save, or restore an intact copy."
        ) from None
    if metadata.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"{path} is a safetensors file but not a lora-lite checkpoint (metadata format={metadata.get('format')!r}). "
            "lora_lite.load reads files written by lora_lite.save."
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        fix = ("upgrade lora-lite-core (pip install -U lora-lite-core)" if version > FORMAT_VERSION
               else "install a lora-lite-core release that reads it")
        raise CheckpointFormatError(
            f"{path} has checkpoint format version {metadata.get('format_version')!r} (written by lora-lite-core "
            f"{metadata.get('core_version')}); this lora-lite-core {_core_version()} reads version {FORMAT_VERSION}; "
            f"{fix}."
        )
    try:
        records = json.loads(metadata["adapters"])
        if not isinstance(records, list) or not records:
            raise ValueError("no adapter records")
        for rec in records:
            rec["config"], rec["targets"], rec["keys"], rec["base_fingerprint"]  # noqa: B018
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointFormatError(
            f"{path} has malformed lora-lite metadata: {err!r}. Save the adapter again with lora_lite.save."
        ) from None
    return records, tensors


def _config(rec: dict[str, Any], path) -> LoraLiteConfig:
    try:
        return LoraLiteConfig.from_dict(rec["config"])
    except LoraLiteError as err:  # unknown variant, or a knob this plugin version lacks
        raise add_context(err, f"{path} was written with {rec.get('plugin_distribution')} "
                               f"{rec.get('plugin_version')} (install that version if yours differs)")


def _file_keys(att: Attachment, rec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{key in the file: the attachment's tensor}``. A key is ``<target>[.lora_<slot>].<tensor>``;
    the slot part depends on what else sat on the layer when it was saved, so keys are
    matched on (target, tensor name) within the attachment's record."""
    mine = {}
    for key, param in att.adapter_tensors(persistent_only=True).items():
        target, pname = _split_key(key, att.target_names)
        mine[(target, pname)] = param
    out = {}
    for key in rec["keys"]:
        param = mine.pop(_split_key(key, rec["targets"]), None)
        if param is not None:
            out[key] = param
    for (target, pname), param in mine.items():  # not in the record: reported missing under the model's key
        out[f"{target}.{pname}"] = param
    return out


def _split_key(key: str, targets: list[str]) -> tuple[str, str]:
    stem, _, pname = key.rpartition(".")
    target = max((t for t in targets if stem == t or stem.startswith(t + ".")), key=len, default=stem)
    return target, pname


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> list[Attachment]:
    """Attach and fill the adapters saved in ``path``; exact, or an error and an untouched model.

    ``name``: attach the file's one adapter under this name. If the model already has an
    attachment of that name with the same config, its tensors are replaced in place
    (hot-swap: no new tensors, no new hooks, so a ``torch.compile``d model does not recompile).
    """
    records, tensors = read_checkpoint(path)
    if name is not None:
        if len(records) != 1:
            raise CheckpointMismatchError(
                f"{path} holds {len(records)} adapters ({[r.get('name') for r in records]}); load(name=...) takes a "
                "file with one. Load it without name=, or save one attachment per file (save(names=[...]))."
            )
        existing = [a for a in attachments(model) if a.name == name]
        if existing:
            return [_hot_swap(existing[0], records[0], tensors, path)]
    done: list[Attachment] = []
    try:
        for rec in records:
            saved_name = rec.get("name")
            # a default name taken here is re-chosen (as an unnamed attach would); a chosen one is kept
            auto = saved_name is None or saved_name == DEFAULT_NAME or saved_name.startswith(DEFAULT_NAME + "_")
            att = attach_for_load(model, _config(rec, path), name if name is not None else None if auto else saved_name)
            done.append(att)
            _check_targets(att, rec, path)
        expected = {k: v for att, rec in zip(done, records) for k, v in _file_keys(att, rec).items()}
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


def _hot_swap(att: Attachment, rec: dict[str, Any], tensors: dict[str, torch.Tensor], path) -> Attachment:
    """Copy a saved adapter into an existing attachment in place: of the same config, or of
    another config of the same variant through the variant's ``hotswap`` hook."""
    cfg = _config(rec, path)
    if type(cfg) is not type(att.cfg) or cfg.to_dict() != att.cfg.to_dict():
        hook = att.variant.hook("hotswap") if cfg.variant == att.cfg.variant else None
        if hook is None:
            differ = sorted(k for k, v in cfg.to_dict().items() if att.cfg.to_dict().get(k) != v)
            raise CheckpointMismatchError(
                f"{path}: hot-swapping into attachment {att.name!r} needs the same config; these differ: {differ} "
                f"(variant {att.variant.name!r} has no hotswap hook to map other configs). Detach it and load the "
                f"file instead (attachment {att.name!r} would then be rebuilt)."
            )
        return _hot_swap_mapped(att, rec, cfg, hook, tensors, path)
    _check_targets(att, rec, path)
    expected = _file_keys(att, rec)
    _check_tensors(expected, tensors, path)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return att


def _hot_swap_mapped(att: Attachment, rec: dict[str, Any], cfg: LoraLiteConfig, hook, tensors, path) -> Attachment:
    """Hot-swap a file of another config through the variant's ``hotswap`` hook: every
    target's tensors are mapped and checked first, then copied (all or nothing)."""
    _check_targets(att, rec, path)
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key in rec["keys"]:
        if key not in tensors:
            raise CheckpointMismatchError(f"{path}: {key} is listed in the file's record but missing. {_REWRITE_HINT}")
        target, pname = _split_key(key, rec["targets"])
        saved.setdefault(target, {})[pname] = tensors[key]
    plan = []
    for t in att.targets:
        mine = {n: getattr(t.layer, n) for n, spec in att.specs[t.name].items() if spec.persistent}
        try:
            with torch.no_grad():
                got = hook(t.layer, att.cfg, cfg, saved.get(t.name, {}))
        except ConfigError as err:
            raise CheckpointMismatchError(f"{path}: cannot hot-swap into attachment {att.name!r} at {t.name}: {err}") from err
        if not isinstance(got, dict) or set(got) != set(mine):
            raise PluginError(
                f"variant {att.variant.name!r}: hotswap on {t.name} must return tensors for {sorted(mine)}, got "
                f"{sorted(got) if isinstance(got, dict) else type(got).__name__}."
            )
        for n, value in got.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(mine[n].shape):
                raise PluginError(
                    f"variant {att.variant.name!r}: hotswap on {t.name} returned {n} of shape "
                    f"{tuple(getattr(value, 'shape', ()))}; the layer's is {tuple(mine[n].shape)}."
                )
            plan.append((mine[n], value))
    with torch.no_grad():
        for param, value in plan:
            param.copy_(value)
    return att


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


_REWRITE_HINT = (
    "The file does not hold what the installed variant declares for its saved config: it was edited, or "
    "written by another version of the variant plugin. Install the plugin version that wrote it (see "
    "lora_lite.read_checkpoint(path)[0]) or save the adapter again."
)


def _check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{path}: adapter keys do not match the model. Missing from the file: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; in the file but not in the model: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}. {_REWRITE_HINT}"
        )
    for key, param in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointMismatchError(
                f"{path}: {key} has shape {tuple(t.shape)} in the file but {tuple(param.shape)} in the model. "
                f"{_REWRITE_HINT}"
            )
        if t.dtype != param.dtype:
            raise CheckpointMismatchError(
                f"{path}: {key} is {t.dtype} in the file but {param.dtype} in the model. {_REWRITE_HINT}"
            )

